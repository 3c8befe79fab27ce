"""Outputs of classification beyond the tiles' classes: the field table, uncertainty marking,
per-class area statistics, and the GeoPackage version that every supported QGIS reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
from pyproj import Transformer
from rasterio.transform import from_origin

import test_classify as tc
from asymkd.classify import classify
from asymkd.classify.writer import TILE_FIELDS, fields_markdown, tile_fields

README = Path(__file__).resolve().parents[2] / "README.md"
T = tc.T
model = tc.model  # the tiny exported student of the classify tests (module-scoped fixture)
OGR_DTYPES = {"Integer": "int32", "Real": "float64", "String": "object"}


def readme_table(header: str) -> str:
    """The README's markdown table that starts with `header` (indentation removed)."""
    lines = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()]
    start = lines.index(header)
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


# -- the one table of tile fields ------------------------------------------------------
def test_readme_lists_exactly_the_tile_fields():
    assert readme_table("| field | type | value |") == fields_markdown()
    assert len({f.name for f in TILE_FIELDS}) == len(TILE_FIELDS)


def _schema(path: Path) -> list[tuple[str, str]]:
    info = pyogrio.read_info(str(path), layer="tiles")
    return [(str(n), str(d)) for n, d in zip(info["fields"], info["dtypes"], strict=True)]


def test_layer_schema_is_the_field_table_on_both_grids(model, tmp_path):
    src = tc.write_raster(tmp_path / "r.tif", tc.texture(2 * T, 3 * T))
    classify(model[0], src, tmp_path / "pixel.gpkg")
    assert _schema(tmp_path / "pixel.gpkg") == [(f.name, OGR_DTYPES[f.ogr]) for f in tile_fields("pixel")]
    x0, y1 = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(9.0, 47.0)
    merc = tc.write_raster(tmp_path / "m.tif", tc.texture(160, 160), crs="EPSG:3857",
                           transform=from_origin(x0, y1 + 160 * 25.0, 25.0, 25.0))
    classify(model[0], merc, tmp_path / "xyz.gpkg", xyz_zoom=14, min_valid=0.01)
    assert _schema(tmp_path / "xyz.gpkg") == [(f.name, OGR_DTYPES[f.ogr]) for f in tile_fields("xyz")]
    # an empty layer (nothing classified) has the same schema
    classify(model[0], tc.write_raster(tmp_path / "e.tif", np.zeros((3, T, T), np.uint8), nodata=0),
             tmp_path / "empty.gpkg")
    assert _schema(tmp_path / "empty.gpkg") == _schema(tmp_path / "pixel.gpkg")
    assert pyogrio.read_info(str(tmp_path / "empty.gpkg"), layer="tiles")["features"] == 0
