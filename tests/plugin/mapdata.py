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
