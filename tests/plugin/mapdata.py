"""Small georeferenced rasters and label layers for plugin tests, written with GDAL/OGR
(QGIS's own bindings; no engine needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from osgeo import gdal, ogr, osr

gdal.UseExceptions()
ogr.UseExceptions()

EPSG = 32632
ORIGIN = (500000.0, 5200000.0)
GSD = 10.0


def write_raster(path: Path, bands: int, width: int = 64, height: int = 64, origin=ORIGIN,
                 gsd: float = GSD, dtype=np.uint8, seed: int = 0, nodata: float | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gdal_type = gdal.GDT_Byte if dtype == np.uint8 else gdal.GDT_UInt16
    ds = gdal.GetDriverByName("GTiff").Create(str(path), width, height, bands, gdal_type)
    ds.SetGeoTransform((origin[0], gsd, 0.0, origin[1], 0.0, -gsd))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(EPSG)
    ds.SetProjection(srs.ExportToWkt())
    rng = np.random.default_rng(seed)
    high = 255 if dtype == np.uint8 else 4000
    for b in range(bands):
        band = ds.GetRasterBand(b + 1)
        band.WriteArray(rng.integers(1, high, size=(height, width)).astype(dtype))
        if nodata is not None:
            band.SetNoDataValue(nodata)
    ds.FlushCache()
    ds = None
    return path


def write_labels(path: Path, cells: Sequence[tuple[int, int, str]], cell_px: int = 32, origin=ORIGIN,
                 gsd: float = GSD, field: str = "class", layer: str = "labels") -> Path:
    """One square polygon per (row, col, class) cell of `cell_px` pixels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(EPSG)
    lyr = ds.CreateLayer(layer, srs, ogr.wkbPolygon)
    lyr.CreateField(ogr.FieldDefn(field, ogr.OFTString))
    size = cell_px * gsd
    for row, col, name in cells:
        x0, y0 = origin[0] + col * size, origin[1] - row * size
        ring = ogr.Geometry(ogr.wkbLinearRing)
        for x, y in ((x0, y0), (x0 + size, y0), (x0 + size, y0 - size), (x0, y0 - size), (x0, y0)):
            ring.AddPoint_2D(x, y)
        polygon = ogr.Geometry(ogr.wkbPolygon)
        polygon.AddGeometry(ring)
        feature = ogr.Feature(lyr.GetLayerDefn())
        feature.SetField(field, name)
        feature.SetGeometry(polygon)
        lyr.CreateFeature(feature)
    ds = None
    return path


def write_xyz_tiles(folder: Path, zoom: int = 15, lon: float = 9.0, lat: float = 46.9, count: int = 2):
    """count x count PNG tiles of coloured squares in an XYZ folder (z/x/y.png).

    Returns (uri of a QGIS XYZ layer, (minx, miny, maxx, maxy) of the tiles in EPSG:3857).
    """
    import math

    from qgis.PyQt.QtGui import QColor, QImage, QPainter
    n = 2 ** zoom
    x0 = int((lon + 180.0) / 360.0 * n)
    rad = math.radians(lat)
    y0 = int((1.0 - math.log(math.tan(rad) + 1.0 / math.cos(rad)) / math.pi) / 2.0 * n)
    rng = np.random.default_rng(7)
    for dx in range(count):
        for dy in range(count):
            image = QImage(256, 256, QImage.Format_RGB32)
            painter = QPainter(image)
            for i in range(0, 256, 16):
                for j in range(0, 256, 16):
                    painter.fillRect(i, j, 16, 16, QColor(*[int(v) for v in rng.integers(0, 256, 3)]))
            painter.end()
            path = Path(folder) / str(zoom) / str(x0 + dx) / f"{y0 + dy}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(str(path))
    shift = 20037508.342789244
    size = 2 * shift / n
    minx, maxy = x0 * size - shift, shift - y0 * size
    uri = f"type=xyz&url=file://{Path(folder).resolve()}/{{z}}/{{x}}/{{y}}.png&zmin={zoom}&zmax={zoom}"
    return uri, (minx, maxy - count * size, minx + count * size, maxy)
