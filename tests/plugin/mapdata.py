"""Small georeferenced rasters and label layers for plugin tests, written with GDAL/OGR
(QGIS's own bindings; no engine needed)."""

from __future__ import annotations

import shutil
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


# -- classification outputs -------------------------------------------------------------------
CLASSES = ("Forest", "River", "Urban")


def tile_rows(rows: int = 4, cols: int = 4) -> list[dict]:
    """Attributes of a rows x cols grid of classified tiles: classes and confidences vary, the
    tiles below 0.6 are marked uncertain except one (marked by another rule, e.g. entropy)."""
    out = []
    for r in range(rows):
        for c in range(cols):
            k = r * cols + c
            class_id, second_id = k % 3, (k + 1) % 3
            confidence = round(0.35 + 0.04 * ((k * 7) % 16), 2)
            out.append({"row": r, "col": c, "class_id": class_id, "class_name": CLASSES[class_id],
                        "confidence": confidence, "second_id": second_id, "second_name": CLASSES[second_id],
                        "second_prob": round(1 - confidence, 2), "entropy": 0.5, "tile_key": f"r{r}_c{c}",
                        "valid_fraction": 1.0, "uncertain": int(confidence < 0.6)})
    return out


def _square(x0: float, y0: float, size: float):
    ring = ogr.Geometry(ogr.wkbLinearRing)
    for x, y in ((x0, y0), (x0 + size, y0), (x0 + size, y0 - size), (x0, y0 - size), (x0, y0)):
        ring.AddPoint_2D(x, y)
    polygon = ogr.Geometry(ogr.wkbPolygon)
    polygon.AddGeometry(ring)
    return polygon


_TILE_FIELDS = {"class_id": ogr.OFTInteger, "class_name": ogr.OFTString, "confidence": ogr.OFTReal,
                "second_id": ogr.OFTInteger, "second_name": ogr.OFTString, "second_prob": ogr.OFTReal,
                "entropy": ogr.OFTReal, "tile_key": ogr.OFTString, "valid_fraction": ogr.OFTReal}
_REVIEW_FIELDS = {"uncertain": ogr.OFTInteger, "reviewed_class": ogr.OFTInteger, "reviewed_by": ogr.OFTString,
                  "reviewed_at": ogr.OFTString}


def write_tiles(path: Path, rows: list[dict] | None = None, tile_px: int = 16, origin=ORIGIN, gsd: float = GSD,
                current: bool = True, regions: bool = False) -> Path:
    """A classification GeoPackage as the engine writes it: layer `tiles`, table `class_areas`
    (and layer `regions`). `current=False`: an older output (no uncertain/review fields, no table)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = tile_rows() if rows is None else rows
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(EPSG)
    lyr = ds.CreateLayer("tiles", srs, ogr.wkbPolygon)
    fields = _TILE_FIELDS | (_REVIEW_FIELDS if current else {})
    for name, kind in fields.items():
        lyr.CreateField(ogr.FieldDefn(name, kind))
    size = tile_px * gsd
    for row in rows:
        feature = ogr.Feature(lyr.GetLayerDefn())
        for name in fields:
            if name in row:
                feature.SetField(name, row[name])
        feature.SetGeometry(_square(origin[0] + row["col"] * size, origin[1] - row["row"] * size, size))
        lyr.CreateFeature(feature)
    if current:
        _write_areas(ds, rows, size * size / 10000.0)
    if regions:
        _write_regions(ds, srs, rows, origin, size)
    ds = None
    return path


def _write_areas(ds, rows: list[dict], tile_ha: float) -> None:
    table = ds.CreateLayer("class_areas", None, ogr.wkbNone)
    for name, kind in (("class_id", ogr.OFTInteger), ("class_name", ogr.OFTString), ("tiles", ogr.OFTInteger),
                       ("hectares", ogr.OFTReal), ("share", ogr.OFTReal), ("mean_confidence", ogr.OFTReal),
                       ("uncertain_tiles", ogr.OFTInteger)):
        table.CreateField(ogr.FieldDefn(name, kind))
    for class_id, name in enumerate(CLASSES):
        mine = [r for r in rows if r["class_id"] == class_id]
        feature = ogr.Feature(table.GetLayerDefn())
        values = {"class_id": class_id, "class_name": name, "tiles": len(mine), "hectares": len(mine) * tile_ha,
                  "share": len(mine) / len(rows),
                  "mean_confidence": sum(r["confidence"] for r in mine) / max(1, len(mine)),
                  "uncertain_tiles": sum(r.get("uncertain", 0) for r in mine)}
        for key, value in values.items():
            feature.SetField(key, value)
        table.CreateFeature(feature)


def _write_regions(ds, srs, rows: list[dict], origin, size: float) -> None:
    layer = ds.CreateLayer("regions", srs, ogr.wkbMultiPolygon)
    for name, kind in (("class_id", ogr.OFTInteger), ("class_name", ogr.OFTString), ("tiles", ogr.OFTInteger),
                       ("area_ha", ogr.OFTReal)):
        layer.CreateField(ogr.FieldDefn(name, kind))
    for class_id, name in enumerate(CLASSES):
        mine = [r for r in rows if r["class_id"] == class_id]
        union = ogr.Geometry(ogr.wkbMultiPolygon)
        for r in mine:
            union.AddGeometry(_square(origin[0] + r["col"] * size, origin[1] - r["row"] * size, size))
        feature = ogr.Feature(layer.GetLayerDefn())
        for key, value in (("class_id", class_id), ("class_name", name), ("tiles", len(mine)),
                           ("area_ha", len(mine) * size * size / 10000.0)):
            feature.SetField(key, value)
        feature.SetGeometry(union.UnionCascaded())
        layer.CreateFeature(feature)


def qgis_process() -> str:
    # Debian's qgis_process wrapper passes --noversioncheck, which qgis_process 3.22 rejects.
    for name in ("qgis_process.bin", "qgis_process"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if path:
            return path
    import pytest
    pytest.skip("qgis_process is not installed")
