"""Outputs of classification beyond the tiles' classes: the field table, uncertainty marking,
per-class area statistics, and the GeoPackage version that every supported QGIS reads."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import shapely
from pyproj import CRS, Transformer
from rasterio.transform import from_origin

import test_classify as tc
from asymkd import choices, cli
from asymkd.classify import classify, stats, style
from asymkd.classify.writer import TILE_FIELDS, fields_markdown, tile_fields
from asymkd.commands.choices import choices_report
from asymkd.errors import ConfigError
from asymkd.events import Events

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


# -- uncertainty -------------------------------------------------------------------------
def _layer(path: Path) -> dict[str, np.ndarray]:
    return tc.read_layer(path)[1]


def _certainty(f: dict[str, np.ndarray], by: str) -> np.ndarray:
    return {"confidence": f["confidence"], "margin": f["confidence"] - f["second_prob"],
            "entropy": 1.0 - f["entropy"]}[by]


@pytest.fixture(scope="module")
def scene(model, tmp_path_factory):
    """A 6 x 8 tile raster and its classification without a threshold."""
    root = tmp_path_factory.mktemp("scene")
    src = tc.write_raster(root / "r.tif", tc.texture(6 * T, 8 * T, seed=11))
    classify(model[0], src, root / "plain.gpkg")
    return src, _layer(root / "plain.gpkg")


@pytest.mark.parametrize("by", ["confidence", "margin", "entropy"])
def test_uncertain_tiles_by_each_measure_keep_their_class(model, scene, tmp_path, by):
    src, plain = scene
    assert not plain["uncertain"].any()  # no threshold: nothing is uncertain
    threshold = float(np.median(_certainty(plain, by)))
    classify(model[0], src, tmp_path / "u.gpkg", uncertain_below=threshold, uncertain_by=by)
    f = _layer(tmp_path / "u.gpkg")
    expected = (f["entropy"] > 1 - threshold) if by == "entropy" else (_certainty(f, by) < threshold)
    np.testing.assert_array_equal(f["uncertain"], expected.astype(np.int32))
    assert 0 < f["uncertain"].sum() < len(f["uncertain"])  # the median splits the tiles
    for name in ("class_id", "second_id", "tile_key"):
        np.testing.assert_array_equal(f[name], plain[name])
    for name in ("confidence", "second_prob", "entropy"):
        np.testing.assert_allclose(f[name], plain[name], rtol=0, atol=1e-12)


def test_thresholds_0_and_1_and_empty_review_fields(model, scene, tmp_path):
    src, plain = scene
    classify(model[0], src, tmp_path / "none.gpkg", uncertain_below=0.0)
    assert not _layer(tmp_path / "none.gpkg")["uncertain"].any()
    classify(model[0], src, tmp_path / "all.gpkg", uncertain_below=1.0, uncertain_by="margin")
    assert _layer(tmp_path / "all.gpkg")["uncertain"].all()  # no margin reaches 1 with a random model
    with sqlite3.connect(tmp_path / "all.gpkg") as db:
        nulls = db.execute("SELECT count(*) FROM tiles WHERE reviewed_class IS NULL AND reviewed_by IS NULL "
                           "AND reviewed_at IS NULL").fetchone()[0]
        types = {row[1]: row[2] for row in db.execute("PRAGMA table_info(tiles)")}
    assert nulls == len(plain["class_id"])
    assert (types["uncertain"], types["reviewed_class"], types["reviewed_by"], types["reviewed_at"]) == (
        "MEDIUMINT", "MEDIUMINT", "TEXT", "TEXT")


@pytest.mark.parametrize("kwargs, match", [
    ({"uncertain_below": 1.5}, "--uncertain-below 1.5 must be between 0 and 1"),
    ({"uncertain_below": -0.1}, "between 0 and 1"),
    ({"uncertain_below": float("nan")}, "between 0 and 1"),
    ({"uncertain_below": 0.5, "uncertain_by": "variance"}, "confidence, margin, entropy"),
])
def test_bad_uncertainty_options_are_refused_before_anything_is_read(tmp_path, kwargs, match):
    # neither the model nor the raster exists: the options are checked first
    with pytest.raises(ConfigError, match=match):
        classify(tmp_path / "missing.onnx", tmp_path / "missing.tif", tmp_path / "out.gpkg", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_uncertainty_flags(model, scene, tmp_path, capsys):
    src, _ = scene
    out = tmp_path / "cli.gpkg"
    code = cli.main(["classify", str(model[0]), str(src), "--out", str(out), "--uncertain-below", "0.9",
                     "--uncertain-by", "margin"])
    assert code == 0
    f = _layer(out)
    np.testing.assert_array_equal(f["uncertain"], (f["confidence"] - f["second_prob"] < 0.9).astype(np.int32))
    assert json.loads(capsys.readouterr().out)["areas_csv"] == str(tmp_path / "cli_areas.csv")
    assert cli.main(["classify", str(model[0]), str(src), "--out", str(out), "--uncertain-below", "2"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["classify", str(model[0]), str(src), "--out", str(out), "--uncertain-by", "variance"])
    assert list(choices.UNCERTAINTY_MEASURES) == list(stats._UNCERTAIN)  # one set of names
    assert choices_report()["classify"]["uncertain_by"] == choices.UNCERTAINTY_MEASURES  # for the plugin's form


def test_style_fades_and_hatches_uncertain_tiles_in_their_class_colour(model, scene, tmp_path):
    from asymkd.models.onnx_file import read_onnx_metadata
    colors = read_onnx_metadata(model[0]).class_colors
    res = classify(model[0], scene[0], tmp_path / "s.gpkg", uncertain_below=0.5)
    renderer = ET.parse(res.qml).getroot().find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class_name"
    symbols = {s.get("name"): s for s in renderer.findall("symbols/symbol")}
    for cat, color in zip(renderer.findall("categories/category"), colors, strict=True):
        fill, hatch = symbols[cat.get("symbol")].findall("layer")
        rgb = ",".join(str(int(color[i:i + 2], 16)) for i in (1, 3, 5))
        expr = fill.find(".//Option[@name='fillColor']/Option[@name='expression']").get("value")
        assert expr == f"if(\"uncertain\" = 1, '{rgb},{style.UNCERTAIN_ALPHA}', '{rgb},{style.FILL_ALPHA}')"
        assert hatch.find("prop[@k='style']").get("v") == "b_diagonal"
        expr = hatch.find(".//Option[@name='fillColor']/Option[@name='expression']").get("value")
        assert expr.startswith("if(\"uncertain\" = 1, ") and expr.endswith(", '0,0,0,0')")


# -- area statistics -----------------------------------------------------------------------
def _geod_hectares(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each tile polygon's ellipsoidal area (ha), class and confidence, computed here with
    pyproj from the polygons read back."""
    geoms, f, meta = tc.read_layer(path)
    crs = CRS.from_user_input(meta["crs"])
    to_ll = Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)
    geod = crs.get_geod()
    ha = [abs(geod.geometry_area_perimeter(shapely.transform(g, lambda xy: np.column_stack(
        to_ll.transform(xy[:, 0], xy[:, 1]))))[0]) / 1e4 for g in geoms]
    return np.array(ha), f["class_id"], f


@pytest.mark.parametrize("epsg,north,size,rel", [(32632, 5.5e6, 64, 1e-9), (32632, 5.5e6, 640, 1e-9),
                                                   (32632, 7.8e6, 640, 1e-9), (32632, 7.8e6, 6400, 1e-7)])
def test_tile_areas_are_the_geodesic_areas_within_the_stated_bound(epsg, north, size, rel):
    """The vectorised equal-area rule against pyproj's geodesic polygon area, per tile."""
    crs = CRS.from_epsg(epsg)
    rng = np.random.default_rng(0)
    minx, miny = 300_000 + rng.uniform(0, 400_000, 50), north + rng.uniform(0, 100_000, 50)
    got = stats.ClassAreas(crs, ["a"]).tile_areas_m2(minx, miny, minx + size, miny + size)
    xs, ys = stats._outlines(minx, miny, minx + size, miny + size)
    lon, lat = Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True).transform(xs, ys)
    want = [abs(crs.get_geod().polygon_area_perimeter(lo, la)[0]) for lo, la in zip(lon, lat, strict=True)]
    assert got == pytest.approx(want, rel=rel)


def test_ring_areas_across_the_antimeridian_and_with_uneven_rings():
    ellipsoid = stats.Ellipsoid(CRS.from_epsg(4326))
    square = ([179.995, 180.005, 180.005, 179.995], [10.0, 10.0, 10.01, 10.01])  # 180.005 is -179.995
    wrapped = ([179.995, -179.995, -179.995, 179.995], square[1])
    tri = ([0.0, 0.01, 0.0, 0.0], [0.0, 0.0, 0.01, 0.0])  # closed ring: first vertex repeated
    lon, lat = np.r_[square[0], wrapped[0], tri[0]], np.r_[square[1], wrapped[1], tri[1]]
    got = ellipsoid.rings_m2(lon, lat, np.array([0, 4, 8, 12]))
    geod = CRS.from_epsg(4326).get_geod()
    want = [geod.polygon_area_perimeter(*ring)[0] for ring in (square, square, tri)]
    assert got == pytest.approx(want, rel=1e-7) and got[0] > 0 and got[2] > 0


def _check_areas(path: Path, table: list[dict], classes: list[str]) -> None:
    ha, cid, f = _geod_hectares(path)
    assert [r["class_id"] for r in table] == list(range(len(classes)))
    assert [r["class_name"] for r in table] == classes
    assert sum(r["tiles"] for r in table) == len(cid) > 0
    for r in table:
        mine = cid == r["class_id"]
        assert r["tiles"] == mine.sum()
        assert r["hectares"] == pytest.approx(ha[mine].sum(), rel=1e-6, abs=1e-9)
        assert r["uncertain_tiles"] == f["uncertain"][mine].sum()
        if mine.any():
            assert r["mean_confidence"] == pytest.approx(f["confidence"][mine].mean(), rel=1e-9)
        else:
            assert r["mean_confidence"] is None and r["share"] == 0
    assert sum(r["share"] for r in table) == pytest.approx(1.0, rel=1e-12)
    assert [r["share"] for r in table] == pytest.approx([r["hectares"] / ha.sum() for r in table], rel=1e-6)


def _gpkg_table(path: Path) -> list[dict]:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(f"SELECT {', '.join(stats.AREA_COLUMNS)} FROM class_areas "
                                                "ORDER BY class_id")]


def _csv_table(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    conv = {"class_id": int, "tiles": int, "uncertain_tiles": int, "hectares": float, "share": float,
            "mean_confidence": lambda v: float(v) if v else None, "class_name": str}
    return [{k: conv[k](v) for k, v in row.items()} for row in rows]


def test_area_table_agrees_with_the_tile_layer(model, scene, tmp_path):
    out = tmp_path / "a.gpkg"
    stream = io.StringIO()
    res = classify(model[0], scene[0], out, uncertain_below=0.6, events=Events(stream=stream, progress_bars=False))
    _check_areas(out, res.class_areas, tc.CLASSES)
    assert res.areas_csv == tmp_path / "a_areas.csv"
    assert res.areas_csv.read_text(encoding="utf-8").splitlines()[0] == ",".join(stats.AREA_COLUMNS)
    assert _csv_table(res.areas_csv) == res.class_areas  # the CSV holds the same numbers (round trip)
    assert _gpkg_table(out) == res.class_areas
    assert pyogrio.read_info(str(out), layer="class_areas")["geometry_type"] is None  # a non-spatial table
    done = [json.loads(line) for line in stream.getvalue().splitlines()]
    result = next(e for e in done if e["event"] == "result" and e["step"] == "classify")
    assert result["class_areas"] == res.class_areas and result["paths"]["areas_csv"] == str(res.areas_csv)


def test_area_table_on_web_mercator_tiles_is_ellipsoidal(model, tmp_path):
    """XYZ tiles at 60 N cover a quarter of their Mercator area: the table must say so."""
    x0, y1 = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(10.0, 60.0)
    merc = tc.write_raster(tmp_path / "m.tif", tc.texture(200, 200, seed=2), crs="EPSG:3857",
                           transform=from_origin(x0, y1 + 200 * 20.0, 20.0, 20.0))
    res = classify(model[0], merc, tmp_path / "xyz.gpkg", xyz_zoom=15, min_valid=0.01)
    _check_areas(tmp_path / "xyz.gpkg", res.class_areas, tc.CLASSES)
    geoms, _, _ = tc.read_layer(tmp_path / "xyz.gpkg")
    planar_ha = shapely.area(geoms).sum() / 1e4
    assert sum(r["hectares"] for r in res.class_areas) == pytest.approx(planar_ha / 4, rel=0.02)


def test_empty_classification_has_a_zero_area_table(model, tmp_path):
    src = tc.write_raster(tmp_path / "e.tif", np.zeros((3, 2 * T, 2 * T), np.uint8), nodata=0)
    res = classify(model[0], src, tmp_path / "e.gpkg")
    assert [(r["tiles"], r["hectares"], r["share"], r["mean_confidence"]) for r in res.class_areas] == [
        (0, 0.0, 0.0, None)] * len(tc.CLASSES)
    assert _gpkg_table(tmp_path / "e.gpkg") == res.class_areas == _csv_table(res.areas_csv)


def test_a_failure_writing_the_area_table_leaves_no_output(model, scene, tmp_path, monkeypatch):
    from asymkd.classify import writer

    def broken(*_args, **_kwargs):
        raise OSError("no space left for the table")

    monkeypatch.setattr(writer, "write_area_table", broken)
    with pytest.raises(OSError, match="no space left"):
        classify(model[0], scene[0], tmp_path / "f.gpkg")
    assert list(tmp_path.iterdir()) == []


# -- GeoPackage version -----------------------------------------------------------------
SYSTEM_PYTHON = Path("/usr/bin/python3")
SYSTEM_GDAL_OPEN = r"""
import json, sys
from osgeo import gdal
gdal.UseExceptions()
seen = []
gdal.PushErrorHandler(lambda cls, no, msg: seen.append(msg))
report = {}
for path in sys.argv[1:]:
    ds = gdal.OpenEx(path, gdal.OF_VECTOR)
    report[path] = {ds.GetLayer(i).GetName(): sum(1 for _ in ds.GetLayer(i)) for i in range(ds.GetLayerCount())}
    ds = None
print(json.dumps({"gdal": gdal.__version__, "layers": report, "warnings": seen}))
"""


def _system_gdal_open(paths: list[Path]) -> dict:
    """Open the files with the system's GDAL (the one Debian's QGIS uses) and collect every
    warning it gives."""
    try:
        proc = subprocess.run([str(SYSTEM_PYTHON), "-c", SYSTEM_GDAL_OPEN, *map(str, paths)], capture_output=True,
                              text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip("no system Python with GDAL bindings (python3-gdal) here")
    if "No module named 'osgeo'" in proc.stderr:
        pytest.skip("the system Python lacks GDAL bindings (python3-gdal)")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _gpkg_version(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA application_id").fetchone()[0], db.execute("PRAGMA user_version").fetchone()[0]


def test_geopackages_are_version_1_2_and_open_without_warnings_in_the_system_gdal(model, scene, tmp_path):
    from asymkd.data.synth import SynthConfig, make_world
    res = classify(model[0], scene[0], tmp_path / "c.gpkg", uncertain_below=0.5)
    world = make_world(tmp_path / "w", SynthConfig(size=16, ms_per_class=2, rgb_per_class=2, test_per_class=1,
                                                   unlabeled_per_class=1, paired=2, classes=2))
    labels = [Path(world[k]) for k in ("ms_labels", "rgb_labels", "rgb_test_labels")]
    for path in (res.gpkg, *labels):
        assert _gpkg_version(path) == (0x47504B47, 10200)  # "GPKG", 1.2.0
    got = _system_gdal_open([res.gpkg, *labels])
    assert got["warnings"] == [], got
    assert got["layers"][str(res.gpkg)] == {"tiles": res.tiles_classified, "layer_styles": 1,
                                            "class_areas": len(tc.CLASSES)}
    assert all(got["layers"][str(p)]["labels"] > 0 for p in labels)
