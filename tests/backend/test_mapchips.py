"""Map datasets: raster + labeled polygons/points -> chip folders (and co-located pairs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from pyogrio.raw import write as write_vector
from pyproj import Transformer

from asymkd import cli
from asymkd.data.mapchips import ChipConfig, chip_map
from asymkd.data.patches import load_folder, match_pairs
from asymkd.errors import ConfigError, DataError

X0, Y0, RES, CELL = 500000.0, 5200000.0, 10.0, 16  # 16-px cells of 160 m
UTM = "EPSG:32632"
EUROSAT_MAP = Path(__file__).resolve().parents[3] / "shared" / "data" / "eurosat_map"


def _write_raster(path: Path, data: np.ndarray, transform: Affine, crs: str = UTM,
                  nodata: float | None = 0, rgb: bool = False) -> Path:
    profile = dict(driver="GTiff", dtype=data.dtype.name, count=data.shape[0], width=data.shape[2],
                   height=data.shape[1], crs=crs, transform=transform, nodata=nodata)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if rgb:
            from rasterio.enums import ColorInterp
            dst.colorinterp = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
    return path


def _positional(bands: int, height: int, width: int, dtype=np.uint16) -> np.ndarray:
    """Band 0 = row + 1, band 1 = col + 1, others constant: a chip tells where it came from."""
    rows, cols = np.mgrid[0:height, 0:width]
    layers = [rows + 1, cols + 1] + [np.full((height, width), 100 + b) for b in range(bands - 2)]
    return np.stack(layers).astype(dtype)


def _cell_box(row: int, col: int, shrink: float = 0.0) -> shapely.Polygon:
    x = X0 + col * CELL * RES
    y = Y0 - row * CELL * RES
    return shapely.box(x + shrink, y - CELL * RES + shrink, x + CELL * RES - shrink, y - shrink)


def _write_labels(path: Path, geoms: list, classes: list, crs: str = UTM, layer: str = "labels",
                  extra: dict | None = None) -> Path:
    fields = {"class": np.array(classes, dtype=object), **(extra or {})}
    kinds = {g.geom_type for g in geoms}
    write_vector(str(path), np.array(shapely.to_wkb(geoms), dtype=object), list(fields.values()),
                 list(fields), layer=layer, driver="GPKG", crs=crs,
                 geometry_type=kinds.pop() if len(kinds) == 1 else "Unknown")
    return path


@pytest.fixture()
def scene(tmp_path) -> dict[str, Path]:
    """A 4-band 48 x 64 px raster (3 x 4 cells), cell (2, 3) all nodata, labeled cells."""
    data = _positional(4, 48, 64)
    data[:, 32:48, 48:64] = 0
    raster = _write_raster(tmp_path / "ms.tif", data, Affine(RES, 0, X0, 0, -RES, Y0))
    cells = {(0, 0): "Forest", (0, 1): "Forest", (1, 2): "Water", (2, 3): "Water", (1, 0): "Urban"}
    geoms = [_cell_box(r, c) for r, c in cells]
    # a polygon over two cells: (2,0) fully, (2,1) only 30 %: one chip
    geoms.append(shapely.box(X0, Y0 - 48 * RES, X0 + (16 + 0.3 * 16) * RES, Y0 - 32 * RES))
    labels = _write_labels(tmp_path / "labels.gpkg", geoms, list(cells.values()) + ["Urban"])
    return {"raster": raster, "labels": labels, "dir": tmp_path}


def _bounds(path: Path) -> tuple[float, ...]:
    with rasterio.open(path) as src:
        return tuple(src.bounds)


def test_polygon_chips_exact_windows_and_classes(scene):
    out = scene["dir"] / "chips"
    res = chip_map(scene["raster"], scene["labels"], out, ChipConfig(size=CELL))
    assert res.chips == 5 and res.skipped["nodata"] == 1  # cell (2,3) is nodata
    assert res.counts == {"Forest": 2, "Urban": 2, "Water": 1}
    expected = {("Forest", 0, 0), ("Forest", 0, 1), ("Water", 1, 2), ("Urban", 1, 0), ("Urban", 2, 0)}
    found = set()
    for path in out.rglob("*.tif"):
        cls = path.parent.name
        row, col = (int(t[1:]) for t in path.stem.split("_")[1:])
        found.add((cls, row, col))
        assert _bounds(path) == tuple(_cell_box(row, col).bounds)
        with rasterio.open(path) as src:
            chip = src.read()
            assert src.crs.to_epsg() == 32632 and src.res == (RES, RES)
        # band 0 is row + 1, band 1 is col + 1: the chip is exactly its window
        assert chip[0, 0, 0] == row * CELL + 1 and chip[1, 0, 0] == col * CELL + 1
        assert chip[0, -1, -1] == (row + 1) * CELL and chip.shape == (4, CELL, CELL)
    assert found == expected
    data = load_folder(out, "ms")
    assert data.class_names == ["Forest", "Urban", "Water"] and data.images.shape == (5, 4, CELL, CELL)
    manifest = json.loads((out / "chips.json").read_text())
    assert manifest["skipped"]["nodata"] == 1 and len(manifest["chips"]) == 5


def test_min_cover_decides_partial_cells(scene):
    res = chip_map(scene["raster"], scene["labels"], scene["dir"] / "c", ChipConfig(size=CELL, min_cover=0.25))
    assert res.counts["Urban"] == 3  # the 30 % cell now counts


def test_labels_in_another_crs_are_reprojected(scene, tmp_path):
    to_wgs84 = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    cells = [(0, 0, "Forest"), (1, 2, "Water"), (1, 0, "Urban")]
    geoms = [shapely.transform(_cell_box(r, c, shrink=1.0),
                               lambda xy: np.column_stack(to_wgs84.transform(xy[:, 0], xy[:, 1])))
             for r, c, _ in cells]
    labels = _write_labels(tmp_path / "wgs84.gpkg", geoms, [c for *_, c in cells], crs="EPSG:4326")
    out = tmp_path / "chips"
    res = chip_map(scene["raster"], labels, out, ChipConfig(size=CELL))
    assert res.chips == 3
    assert sorted(p.stem for p in out.rglob("*.tif")) == ["Forest_r0_c0", "Urban_r1_c0", "Water_r1_c2"]
    assert _bounds(out / "Water" / "Water_r1_c2.tif") == tuple(_cell_box(1, 2).bounds)


def test_points_give_centred_chips_and_edge_points_are_skipped(scene, tmp_path):
    # pixel (col 30, row 20) centre; chip of 16 px starts at (22, 12)
    inside = shapely.Point(X0 + 30.5 * RES, Y0 - 20.5 * RES)
    other = shapely.Point(X0 + 10.2 * RES, Y0 - 25.7 * RES)
    edge = shapely.Point(X0 + 2 * RES, Y0 - 2 * RES)
    labels = _write_labels(tmp_path / "points.gpkg", [inside, other, edge], ["Crop", "Grass", "Crop"])
    out = tmp_path / "chips"
    res = chip_map(scene["raster"], labels, out, ChipConfig(size=CELL))
    assert res.chips == 2 and res.skipped["point_at_edge"] == 1
    crop = next((out / "Crop").glob("*.tif"))
    with rasterio.open(crop) as src:
        chip = src.read()
        assert src.bounds.left == X0 + 22 * RES and src.bounds.top == Y0 - 12 * RES
    assert chip[0, 0, 0] == 13 and chip[1, 0, 0] == 23
    assert chip[0, 8, 8] == 21 and chip[1, 8, 8] == 31  # the point's pixel is at the centre


def test_pair_raster_on_an_offset_grid_gives_same_stem_pairs(scene, tmp_path):
    # RGB covering columns 2..5 of cells (offset by 2 cells: partial overlap)
    rgb = _positional(3, 48, 64, np.uint8)
    pair = _write_raster(tmp_path / "rgb.tif", rgb, Affine(RES, 0, X0 + 32 * RES, 0, -RES, Y0), rgb=True)
    out, pout = tmp_path / "ms_chips", tmp_path / "rgb_chips"
    res = chip_map(scene["raster"], scene["labels"], out, ChipConfig(size=CELL),
                   pair_raster=pair, pair_out=pout)
    assert res.pairs == 1 and res.skipped["pair_nodata"] == 4  # only cell (1,2) overlaps
    ms, paired = load_folder(out, "ms"), load_folder(pout, "rgb")
    ms_idx, rgb_idx = match_pairs(ms, paired)
    assert [ms.stems[i] for i in ms_idx] == ["Water_r1_c2"]
    chip = paired.images[rgb_idx[0]]
    assert chip[0, 0, 0] == 17 and chip[1, 0, 0] == 1  # rgb row 16, col 0 (= ms col 32)
    assert _bounds(pout / "Water" / "Water_r1_c2.tif") == _bounds(out / "Water" / "Water_r1_c2.tif")
    with rasterio.open(pout / "Water" / "Water_r1_c2.tif") as src:
        assert [c.name for c in src.colorinterp] == ["red", "green", "blue"]


def test_pair_raster_at_another_resolution_is_warped_onto_the_grid(scene, tmp_path):
    rows, cols = np.mgrid[0:96, 0:128]
    fine = np.stack([rows // 2 + 1, cols // 2 + 1, np.full_like(rows, 7)]).astype(np.uint8)
    pair = _write_raster(tmp_path / "fine.tif", fine, Affine(RES / 2, 0, X0, 0, -RES / 2, Y0))
    out, pout = tmp_path / "a", tmp_path / "b"
    res = chip_map(scene["raster"], scene["labels"], out, ChipConfig(size=CELL), pair_raster=pair, pair_out=pout)
    assert res.pairs == res.chips == 5
    with rasterio.open(pout / "Water" / "Water_r1_c2.tif") as src:
        chip = src.read()
        assert src.res == (RES, RES) and tuple(src.bounds) == tuple(_cell_box(1, 2).bounds)
    assert chip[0, 0, 0] == 17 and chip[1, 0, 0] == 33 and (chip[2] == 7).all()


def test_resolution_resamples(scene):
    out = scene["dir"] / "coarse"
    res = chip_map(scene["raster"], scene["labels"], out, ChipConfig(size=CELL // 2, resolution=2 * RES))
    assert res.chips == 5
    with rasterio.open(out / "Forest" / "Forest_r0_c1.tif") as src:
        chip = src.read()
        assert src.res == (2 * RES, 2 * RES) and tuple(src.bounds) == tuple(_cell_box(0, 1).bounds)
    # average of rows 1,2 (values) -> 1.5, cols 17,18 -> 17.5 (rounded by the uint16 cast)
    assert abs(float(chip[0, 0, 0]) - 1.5) <= 0.5 and abs(float(chip[1, 0, 0]) - 17.5) <= 0.5


def test_band_names_written_and_rerun_replaces(scene):
    out = scene["dir"] / "chips"
    chip_map(scene["raster"], scene["labels"], out, ChipConfig(size=CELL, bands="B02,B03,B04,B08"))
    assert load_folder(out, "ms").band_names == ["B02", "B03", "B04", "B08"]
    (out / "Forest" / "stale.tif").write_bytes(b"")
    chip_map(scene["raster"], scene["labels"], out, ChipConfig(size=CELL))
    assert not (out / "Forest" / "stale.tif").exists()
    assert not any(p.name.startswith(".") for p in scene["dir"].iterdir())


# -- errors --------------------------------------------------------------------------
def test_missing_field_lists_the_fields(scene):
    with pytest.raises(DataError, match=r"'landuse' is not in .*fields are: class"):
        chip_map(scene["raster"], scene["labels"], scene["dir"] / "o", ChipConfig(size=CELL, field="landuse"))


def test_single_class_is_refused(scene, tmp_path):
    labels = _write_labels(tmp_path / "one.gpkg", [_cell_box(0, 0), _cell_box(1, 1)], ["Forest", "Forest"])
    with pytest.raises(DataError, match="only one class"):
        chip_map(scene["raster"], labels, tmp_path / "o", ChipConfig(size=CELL))


def test_no_features_over_the_raster(scene, tmp_path):
    far = [shapely.box(0, 0, 100, 100), shapely.box(200, 0, 300, 100)]
    labels = _write_labels(tmp_path / "far.gpkg", far, ["A", "B"])
    with pytest.raises(DataError, match="no label features"):
        chip_map(scene["raster"], labels, tmp_path / "o", ChipConfig(size=CELL))


def test_unreadable_raster_and_labels(scene, tmp_path):
    junk = tmp_path / "junk.tif"
    junk.write_text("not a raster")
    with pytest.raises(DataError, match="cannot read raster"):
        chip_map(junk, scene["labels"], tmp_path / "o", ChipConfig(size=CELL))
    with pytest.raises(DataError, match="cannot read raster"):
        chip_map(tmp_path / "missing.tif", scene["labels"], tmp_path / "o", ChipConfig(size=CELL))
    bad = tmp_path / "junk.gpkg"
    bad.write_text("not a vector file")
    with pytest.raises(DataError, match="cannot read labels"):
        chip_map(scene["raster"], bad, tmp_path / "o", ChipConfig(size=CELL))
    with pytest.raises(DataError, match="no layer 'nope'.*labels"):
        chip_map(scene["raster"], scene["labels"], tmp_path / "o", ChipConfig(size=CELL, layer="nope"))


def test_pair_raster_that_does_not_overlap(scene, tmp_path):
    far = _write_raster(tmp_path / "far.tif", _positional(3, 16, 16, np.uint8),
                        Affine(RES, 0, X0 + 100000, 0, -RES, Y0))
    with pytest.raises(DataError, match="does not overlap"):
        chip_map(scene["raster"], scene["labels"], tmp_path / "o", ChipConfig(size=CELL),
                 pair_raster=far, pair_out=tmp_path / "p")
    assert not (tmp_path / "o").exists()


def test_bad_options(scene, tmp_path):
    with pytest.raises(ConfigError):
        chip_map(scene["raster"], scene["labels"], tmp_path / "o", ChipConfig(size=CELL),
                 pair_raster=scene["raster"])
    with pytest.raises(ConfigError):
        chip_map(scene["raster"], scene["labels"], tmp_path / "o", ChipConfig(size=0))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "a.txt").write_text("keep")
    with pytest.raises(DataError, match="not a chip folder"):
        chip_map(scene["raster"], scene["labels"], foreign, ChipConfig(size=CELL))


def test_line_labels_are_refused(scene, tmp_path):
    lines = [shapely.LineString([(X0, Y0 - 10), (X0 + 100, Y0 - 100)]),
             shapely.LineString([(X0 + 50, Y0 - 10), (X0 + 200, Y0 - 100)])]
    labels = _write_labels(tmp_path / "lines.gpkg", lines, ["A", "B"])
    with pytest.raises(DataError, match="polygons .* or points"):
        chip_map(scene["raster"], labels, tmp_path / "o", ChipConfig(size=CELL))


def test_cli_chips(scene, tmp_path, capsys):
    events = tmp_path / "ev.jsonl"
    rc = cli.main(["chips", "--raster", str(scene["raster"]), "--labels", str(scene["labels"]),
                   "--size", str(CELL), "--out", str(tmp_path / "o"), "--events", str(events)])
    assert rc == 0
    records = [json.loads(line) for line in events.read_text().splitlines()]
    assert any(r["event"] == "result" and r["paths"]["chips"] == str(tmp_path / "o") for r in records)
    assert any(r["event"] == "warning" and "nodata" in r["message"] for r in records)
    rc = cli.main(["chips", "--raster", str(scene["raster"]), "--labels", str(scene["labels"]),
                   "--field", "klass", "--out", str(tmp_path / "x")])
    assert rc == 2 and "fields are: class" in capsys.readouterr().err


@pytest.mark.skipif(not (EUROSAT_MAP / "ms_scene.tif").is_file(), reason="eurosat_map data not present")
def test_real_eurosat_map(tmp_path):
    res = chip_map(EUROSAT_MAP / "ms_scene.tif", EUROSAT_MAP / "ms_labels.gpkg", tmp_path / "ms",
                   ChipConfig(size=64), pair_raster=EUROSAT_MAP / "rgb_overlap.tif",
                   pair_out=tmp_path / "rgb")
    assert res.chips == 270 and res.pairs == 270
    ms, rgb = load_folder(tmp_path / "ms", "ms"), load_folder(tmp_path / "rgb", "rgb")
    assert len(match_pairs(ms, rgb)[0]) == 270 and ms.num_bands == 13 and rgb.num_bands == 3


def test_synthetic_world_map_round_trip(tmp_path):
    """Chips of the synthetic MS scene are its MS patches; the RGB scene's overlap gives pairs."""
    from asymkd.data.landcover import render_rgb
    from asymkd.data.synth import SynthConfig, make_world
    world = make_world(tmp_path / "w", SynthConfig(size=16, ms_per_class=3, rgb_per_class=2,
                                                   test_per_class=1, unlabeled_per_class=0,
                                                   paired=0, classes=3, rgb_sensor="sentinel2"))
    res = chip_map(world["ms_scene"], world["ms_labels"], tmp_path / "ms", ChipConfig(size=16),
                   pair_raster=world["rgb_scene"], pair_out=tmp_path / "rgb")
    info = json.loads(Path(world["world"]).read_text())
    assert res.chips == 9 and res.pairs == info["map"]["rgb_scene"]["overlap_cells"] > 0
    chips, patches = load_folder(tmp_path / "ms", "ms"), load_folder(world["ms"], "ms")
    by_bounds = {_bounds(Path(p)): i for i, p in enumerate(patches.paths)}
    for i, path in enumerate(chips.paths):
        j = by_bounds[_bounds(Path(path))]
        assert np.array_equal(chips.images[i], patches.images[j]) and chips.labels[i] == patches.labels[j]
    pairs = load_folder(tmp_path / "rgb", "rgb", class_names=chips.class_names)
    ms_idx, rgb_idx = match_pairs(chips, pairs)
    for i, j in zip(ms_idx, rgb_idx, strict=True):
        assert np.array_equal(render_rgb(chips.images[i].astype(np.uint16)), pairs.images[j].astype(np.uint8))


def test_a_class_name_too_long_for_a_file_name_is_refused_before_writing(scene, tmp_path, capsys):
    long = "F" * 255  # a folder name of 255 bytes, and chip files "<class>_r0_c0.tif" beyond it
    labels = _write_labels(tmp_path / "long.gpkg", [_cell_box(0, 0, shrink=1.0), _cell_box(1, 1, shrink=1.0)],
                           [long, "Forest"])
    out = tmp_path / "chips"
    assert cli.main(["chips", "--raster", str(scene["raster"]), "--labels", str(labels), "--field", "class",
                     "--size", str(CELL), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "too long" in err and "hint:" in err and "Traceback" not in err
    assert not out.exists()
