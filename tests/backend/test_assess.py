"""Sampled accuracy assessment and area estimation: Olofsson et al. (2014)'s worked example,
the allocation rules, reproducible draws, and `asymkd sample` -> labels -> `asymkd assess`
on a small synthetic map, with bad inputs refused (exit 2, nothing written)."""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS

from asymkd.assess import allocate, draw_sample, estimate, estimate_from_counts
from asymkd.assess.layers import ASSESSMENT_TABLE, SAMPLE_LAYER, STRATA_TABLE
from asymkd.classify.grid import Grid
from asymkd.classify.infer import Summary
from asymkd.classify.writer import TileLayerWriter
from asymkd.cli import main
from asymkd.errors import DataError
from asymkd.fileio import write_gpkg_layer

# -- Olofsson et al. (2014), section 5: Tables 8 and 9 and the estimates given with them ----------
STRATA = ["Deforestation", "Forest gain", "Stable forest", "Stable non-forest"]
TABLE8 = np.array([[66, 0, 5, 4],      # rows: map class; columns: reference class (sample counts)
                   [0, 55, 8, 12],
                   [1, 0, 153, 11],
                   [2, 1, 9, 313]])
MAPPED_PIXELS = [200_000, 150_000, 3_200_000, 6_450_000]
HA_PER_PIXEL = 0.09  # 30 m Landsat pixels
TABLE9 = np.array([[0.0176, 0.0000, 0.0013, 0.0011],   # estimated area proportions p_ij
                   [0.0000, 0.0110, 0.0016, 0.0024],
                   [0.0019, 0.0000, 0.2967, 0.0213],
                   [0.0040, 0.0020, 0.0179, 0.6212]])
TABLE9_TOTALS = [0.0235, 0.0130, 0.3175, 0.6460]
USERS = [(0.88, 0.07), (0.73, 0.10), (0.93, 0.04), (0.96, 0.02)]       # estimate, 95 % half width
PRODUCERS = [0.75, 0.85, 0.93, 0.96]
OVERALL = (0.95, 0.02)
AREA_HA = [(21_158, 6_158), (11_686, 3_756), (285_770, 15_510), (581_386, 16_282)]
AREA_PIXELS_DEFORESTATION = (235_086, 68_418)


def _producers_half_width_eq7(j: int) -> float:
    """Eq. 7 in the paper's own terms (pixel counts N_i., estimated N.j), written out
    independently of the code under test."""
    n_i = TABLE8.sum(axis=1)
    big_n = np.array(MAPPED_PIXELS, float)
    n_hat_j = float(np.sum(big_n / n_i * TABLE8[:, j]))
    users_j = TABLE8[j, j] / n_i[j]
    pa = big_n[j] / n_i[j] * TABLE8[j, j] / n_hat_j
    own = big_n[j] ** 2 * (1 - pa) ** 2 * users_j * (1 - users_j) / (n_i[j] - 1)
    others = sum(big_n[i] ** 2 * (TABLE8[i, j] / n_i[i]) * (1 - TABLE8[i, j] / n_i[i]) / (n_i[i] - 1)
                 for i in range(4) if i != j)
    return 1.96 * math.sqrt((own + pa ** 2 * others) / n_hat_j ** 2)


@pytest.fixture(scope="module")
def olofsson():
    return estimate_from_counts(STRATA, TABLE8, [p * HA_PER_PIXEL for p in MAPPED_PIXELS])


def test_olofsson_error_matrix_in_area_proportions(olofsson):
    np.testing.assert_array_equal(olofsson.counts, TABLE8)
    np.testing.assert_array_equal(np.round(olofsson.proportions, 4), TABLE9)
    np.testing.assert_array_equal(np.round(olofsson.proportions.sum(axis=0), 4), TABLE9_TOTALS)


def test_olofsson_accuracies_and_their_intervals(olofsson):
    assert round(olofsson.overall.value, 2) == OVERALL[0]
    assert round(olofsson.overall.half_width, 2) == OVERALL[1]
    for c, (ua, ua_hw), pa in zip(olofsson.per_class, USERS, PRODUCERS, strict=True):
        assert (round(c.users.value, 2), round(c.users.half_width, 2)) == (ua, ua_hw), c.name
        assert round(c.producers.value, 2) == pa, c.name
        assert c.users.low == pytest.approx(c.users.value - c.users.half_width)
    # producer's accuracy intervals: the paper prints +-0.21, 0.23, 0.03, 0.01; eq. 7 on Table 8 gives
    # 0.2133, 0.2544, 0.0343, 0.0184, so the second and fourth printed values do not follow from the
    # paper's own formula and data. The first and third are reproduced; all four are eq. 7's.
    hw = [c.producers.half_width for c in olofsson.per_class]
    assert (round(hw[0], 2), round(hw[2], 2)) == (0.21, 0.03)
    for j in range(4):
        assert hw[j] == pytest.approx(_producers_half_width_eq7(j), rel=1e-12)


def test_olofsson_area_estimates_and_intervals(olofsson):
    for c, (area, hw) in zip(olofsson.per_class, AREA_HA, strict=True):
        assert (round(c.area.value), round(c.area.half_width)) == (area, hw), c.name
        assert c.area.low == pytest.approx(c.area.value - c.area.half_width)
    assert olofsson.by_name("Deforestation").mapped_area == pytest.approx(18_000)
    pixels = estimate_from_counts(STRATA, TABLE8, MAPPED_PIXELS, area_unit="pixels").by_name("Deforestation")
    assert (round(pixels.area.value), round(pixels.area.half_width)) == AREA_PIXELS_DEFORESTATION


def test_sample_pairs_give_the_same_result_as_the_matrix(olofsson):
    rows, cols = np.nonzero(TABLE8)
    reps = TABLE8[rows, cols]
    map_labels = np.repeat([STRATA[i] for i in rows], reps).tolist()
    ref_labels = np.repeat([STRATA[j] for j in cols], reps).tolist()
    areas = {s: p * HA_PER_PIXEL for s, p in zip(STRATA, MAPPED_PIXELS, strict=True)}
    again = estimate(areas, map_labels, ref_labels)
    np.testing.assert_allclose(again.proportions, olofsson.proportions)
    assert again.overall == olofsson.overall and again.per_class == olofsson.per_class
    assert again.notes == () and again.labels == 640


# -- what the formulas cannot give is reported, never NaN -------------------------------------------
def _no_nan(result) -> dict:
    text = result.to_json()
    json.loads(text)
    assert "NaN" not in text and "Infinity" not in text
    for row in result.to_rows():
        for key in ("value", "se", "ci_low", "ci_high"):
            assert row[key] is None or math.isfinite(row[key]), row
    return json.loads(text)


def test_one_label_in_a_stratum_leaves_the_standard_errors_undefined():
    r = estimate({"a": 50.0, "b": 40.0, "c": 10.0}, ["a"] * 5 + ["b"] * 4 + ["c"],
                 ["a", "a", "a", "a", "b", "b", "b", "b", "a", "c"])
    assert r.overall.value is not None and r.overall.se is None and r.overall.low is None
    assert r.by_name("c").users.value == 1.0 and r.by_name("c").users.se is None
    assert r.by_name("a").users.se is not None  # a stratum with enough labels keeps its own
    assert all(c.area.se is None and c.producers.se is None for c in r.per_class)
    assert any("'c' has only 1 label" in n for n in r.notes)
    assert _no_nan(r)["overall_accuracy"]["se"] is None


def test_an_unsampled_stratum_and_a_reference_class_missing_from_the_map():
    r = estimate({"a": 60.0, "b": 30.0, "gap": 10.0}, ["a"] * 4 + ["b"] * 4,
                 ["a", "a", "a", "new", "b", "b", "a", "b"])
    assert r.classes == ("a", "b", "gap", "new")
    assert r.covered_area == 90.0 and r.map_area == 100.0
    gap, new = r.by_name("gap"), r.by_name("new")
    assert gap.sample == 0 and gap.users.value is None and gap.producers.value is None
    assert new.in_map is False and new.users.value is None and new.producers.value == 0.0
    assert new.area.value == pytest.approx(60.0 / 90.0 * 0.25 * 90.0)  # W_a * 1/4 of the covered area
    assert sum(c.proportion.value for c in r.per_class) == pytest.approx(1.0)
    text = " ".join(r.notes)
    assert "'gap' (10.0 % of the mapped area) has no labeled sample" in text
    assert "reference class 'new' is not a class of the map" in text
    _no_nan(r)


def test_no_labels_and_a_unit_outside_the_strata_are_errors():
    with pytest.raises(DataError, match="no labeled sample"):
        estimate({"a": 1.0}, [], [])
    with pytest.raises(DataError, match="no mapped area: b"):
        estimate({"a": 1.0}, ["b"], ["a"])


def test_random_design_is_post_stratified():
    r = estimate({"a": 3.0, "b": 1.0}, ["a", "a", "b", "b"], ["a", "b", "b", "b"], design="random")
    assert "post-stratified" in r.estimator and r.overall.value == pytest.approx(0.75 * 0.5 + 0.25)


# -- allocation and draws ------------------------------------------------------------------------
def test_allocation_minimum_then_proportional_to_area():
    sizes = allocate([1000, 500, 40, 10], [1000.0, 500.0, 40.0, 10.0], n=200, min_per_class=30)
    # 30, 30, 30 and all 10 of the small class; the other 100 by area among the classes with room
    # (1000 : 500 : 40 -> 64.9, 32.5, 2.6 -> largest remainders 65, 32, 3)
    assert sizes.tolist() == [95, 62, 33, 10]
    assert allocate([100, 300], [1.0, 3.0], n=40, min_per_class=0).tolist() == [10, 30]
    # a class's share beyond its tiles goes to the others
    assert allocate([5, 1000], [5000.0, 1000.0], n=100, min_per_class=2).tolist() == [5, 95]


def test_allocation_too_small_for_the_minimum_is_shared_equally():
    assert allocate([100, 100, 100], [3.0, 2.0, 1.0], n=10, min_per_class=30).tolist() == [4, 3, 3]
    assert allocate([2, 100, 100], [3.0, 2.0, 1.0], n=12, min_per_class=30).tolist() == [2, 5, 5]
    with pytest.raises(ValueError):
        allocate([2, 3], [1.0, 1.0], n=6, min_per_class=1)
    with pytest.raises(ValueError):
        allocate([2, 3], [1.0, 1.0], n=0, min_per_class=1)


def test_draws_are_reproducible_and_follow_the_allocation():
    rng = np.random.default_rng(5)
    classes = rng.choice(np.array(["a", "b", "c"], dtype=object), 500, p=[0.7, 0.25, 0.05])
    areas = np.ones(500)
    first, design = draw_sample(classes, areas, 60, min_per_class=10, seed=3)
    again, _ = draw_sample(classes, areas, 60, min_per_class=10, seed=3)
    other, _ = draw_sample(classes, areas, 60, min_per_class=10, seed=4)
    np.testing.assert_array_equal(first, again)
    assert set(first.tolist()) != set(other.tolist())
    assert len(set(first.tolist())) == 60
    counts = dict(zip(design.classes, design.sizes, strict=True))
    assert counts == {c: int(np.sum(classes[first] == c)) for c in design.classes}
    assert design.sizes == tuple(allocate(design.tiles, design.areas, 60, 10).tolist())
    random, rdesign = draw_sample(classes, areas, 60, design="random", seed=3)
    assert len(set(random.tolist())) == 60 and sum(rdesign.sizes) == 60
    np.testing.assert_array_equal(random, draw_sample(classes, areas, 60, design="random", seed=3)[0])


# -- a small classified map ----------------------------------------------------------------------
CLASSES = ["Forest", "Water", "Urban", "Crop"]
ROWS, COLS, T = 24, 30, 32
UTM = CRS.from_epsg(32632)
ORIGIN = (500_000.0, 5_200_000.0)


def _truth_and_map() -> tuple[np.ndarray, np.ndarray]:
    """Class ids of the truth and of a map that gets about 1 tile in 6 wrong (more for Urban)."""
    rng = np.random.default_rng(0)
    truth = rng.choice(4, ROWS * COLS, p=[0.5, 0.15, 0.05, 0.3])
    wrong = rng.random(ROWS * COLS) < np.where(truth == 2, 0.4, 0.15)
    mapped = np.where(wrong, (truth + rng.integers(1, 4, ROWS * COLS)) % 4, truth)
    return truth, mapped


def write_tiles(path: Path, class_id: np.ndarray) -> Path:
    """A tile layer exactly as classify writes it (no model needed)."""
    grid = Grid(kind="pixel", crs=UTM, transform=Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1]), width=COLS * T,
                height=ROWS * T, tile=T, stride=T, rows=ROWS, cols=COLS, warp=False)
    writer = TileLayerWriter(path, grid, CLASSES)
    rows, cols = np.divmod(np.arange(ROWS * COLS), COLS)
    n = len(class_id)
    writer.add(rows, cols, Summary(class_id, np.full(n, 0.9), (class_id + 1) % 4, np.full(n, 0.05),
                                   np.full(n, 0.2)), np.ones(n))
    writer.close()
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("assess")
    truth, mapped = _truth_and_map()
    return write_tiles(root / "tiles.gpkg", mapped), truth, mapped


def _read(path: Path, layer: str) -> dict[str, np.ndarray]:
    meta, _, _, values = pyogrio.raw.read(str(path), layer=layer, read_geometry=False)
    return dict(zip(meta["fields"], values, strict=True))


def label_sample(path: Path, labels: dict[str, str]) -> None:
    """Fill the `reference` field in place by tile key, as an edit in QGIS would. The
    GeoPackage's R-tree triggers name SpatiaLite functions; they only run on geometry edits."""
    con = sqlite3.connect(path)
    try:
        for name in ("ST_IsEmpty", "ST_MinX", "ST_MaxX", "ST_MinY", "ST_MaxY"):
            con.create_function(name, 1, lambda g: 0)
        con.executemany(f"UPDATE {SAMPLE_LAYER} SET reference = ? WHERE tile_key = ?",
                        [(v, k) for k, v in labels.items()])
        con.commit()
    finally:
        con.close()


def _true_accuracy(tiles: Path, truth: np.ndarray, mapped: np.ndarray) -> float:
    """The map's accuracy over all its tiles, each weighted by its area (what is estimated)."""
    _, _, wkb, _ = pyogrio.raw.read(str(tiles), layer="tiles")
    from asymkd.classify.stats import ClassAreas
    areas = ClassAreas(UTM, CLASSES).tile_areas_m2(*shapely.bounds(shapely.from_wkb(wkb)).T)
    return float(np.sum(areas * (truth == mapped)) / areas.sum())


def _key_truth(truth: np.ndarray) -> dict[str, str]:
    rows, cols = np.divmod(np.arange(ROWS * COLS), COLS)
    return {f"{r}/{c}": CLASSES[t] for r, c, t in zip(rows, cols, truth, strict=True)}


def test_sample_then_label_then_assess(world, tmp_path, capsys):
    tiles, truth, mapped = world
    sample = tmp_path / "sample.gpkg"
    assert main(["sample", str(tiles), "--n", "120", "--min-per-class", "20", "--seed", "1",
                 "--out", str(sample)]) == 0
    out = capsys.readouterr().out
    assert "stratified sample of 120 of 720 classified tiles" in out
    fields = _read(sample, SAMPLE_LAYER)
    assert len(fields["sample_id"]) == 120 and all(v is None for v in fields["reference"])
    strata = _read(sample, STRATA_TABLE)
    tiles_per_class = np.bincount(mapped, minlength=4)[[CLASSES.index(c) for c in strata["map_class"]]]
    assert strata["tiles"].tolist() == tiles_per_class.tolist()
    assert strata["sample_size"].sum() == 120 and np.all(strata["sample_size"] >= np.minimum(tiles_per_class, 20))
    assert strata["weight"].sum() == pytest.approx(1.0)
    truth_of = _key_truth(truth)
    label_sample(sample, {k: truth_of[k] for k in fields["tile_key"]})

    report = tmp_path / "report"
    assert main(["assess", str(tiles), "--reference", str(sample), "--out", str(report)]) == 0
    out = capsys.readouterr().out
    assert "overall accuracy" in out and "Urban" in out
    result = json.loads((report / "assessment.json").read_text())
    oa = result["overall_accuracy"]
    true_oa = _true_accuracy(tiles, truth, mapped)
    assert oa["ci_low"] <= true_oa <= oa["ci_high"], (oa, true_oa)
    assert result["labels"] == 120 and result["design"] == "stratified" and result["notes"] == []
    for c in result["per_class"]:  # every class's estimated area brackets its true area
        k = CLASSES.index(c["class"])
        true_area = c["mapped_area"] / np.sum(mapped == k) * np.sum(truth == k)  # equal tiles: close enough
        assert c["estimated_area"]["ci_low"] <= true_area <= c["estimated_area"]["ci_high"], c
    with open(report / "accuracy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0].keys() == {"measure", "map_class", "reference_class", "value", "se", "ci_low", "ci_high",
                              "unit"}
    assert sum(int(r["value"]) for r in rows if r["measure"] == "count") == 120
    assert len(_read(report / "assessment.gpkg", ASSESSMENT_TABLE)["measure"]) == len(rows)
    assert pyogrio.read_info(str(tiles), layer="tiles")["features"] == ROWS * COLS  # the map is untouched


def test_same_seed_same_sample_and_events_on_stdout(world, tmp_path, capsys):
    tiles = world[0]
    keys = []
    for name in ("a.gpkg", "b.gpkg"):
        assert main(["sample", str(tiles), "--n", "40", "--seed", "7", "--design", "random",
                     "--out", str(tmp_path / name), "--events", "-"]) == 0
        keys.append(_read(tmp_path / name, SAMPLE_LAYER)["tile_key"].tolist())
    assert keys[0] == keys[1]
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {e["event"] for e in events} == {"metrics", "result"}
    assert events[-1]["paths"]["gpkg"].endswith("b.gpkg")


def test_any_reference_layer_is_joined_to_the_tiles_in_their_crs(world, tmp_path, capsys):
    tiles, truth, mapped = world
    truth_of = _key_truth(truth)
    to_wgs84 = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    picks = [(3, 4), (10, 20), (23, 29), (0, 0), (12, 7)]
    x = np.array([ORIGIN[0] + (c + 0.5) * T * 10 for _, c in picks] + [ORIGIN[0] - 5000.0])  # last: off the map
    y = np.array([ORIGIN[1] - (r + 0.5) * T * 10 for r, _ in picks] + [ORIGIN[1] + 5000.0])
    lon, lat = to_wgs84.transform(x, y)
    labels = [truth_of[f"{r}/{c}"].lower() for r, c in picks] + ["Water"]  # case differs from the map's
    ref = tmp_path / "points.gpkg"
    write_gpkg_layer(ref, shapely.to_wkb(shapely.points(lon, lat)), [np.array(labels, object)], ["class"],
                     layer="field_points", crs="EPSG:4326", geometry_type="Point")
    report = tmp_path / "report"
    assert main(["assess", str(tiles), "--reference", str(ref), "--field", "class", "--out", str(report)]) == 0
    err = capsys.readouterr().err
    assert "probability sample" in err and "1 of the 6 labeled reference features lie outside" in err
    assert "read as map classes" in err
    result = json.loads((report / "assessment.json").read_text())
    assert result["labels"] == 5 and result["design"] == "external"
    expected = np.zeros((4, 4), int)
    for r, c in picks:
        expected[mapped[r * COLS + c], CLASSES.index(truth_of[f"{r}/{c}"])] += 1
    order = [CLASSES.index(name) for name in result["classes"]]
    np.testing.assert_array_equal(np.array(result["error_matrix_counts"]), expected[np.ix_(order, order)])
    # polygons count where their centroid is: the same tiles, drawn as a second layer of the file
    squares = shapely.buffer(shapely.points(x[:-1], y[:-1]), 100.0, cap_style="square")
    write_gpkg_layer(ref, shapely.to_wkb(squares), [np.array(labels[:-1], object)], ["class"], layer="squares",
                     crs="EPSG:32632", geometry_type="Polygon", append=True)
    assert main(["assess", str(tiles), "--reference", str(ref), "--reference-layer", "squares", "--field", "class",
                 "--out", str(report)]) == 0
    again = json.loads((report / "assessment.json").read_text())
    assert again["labels"] == 5 and again["error_matrix_counts"] == result["error_matrix_counts"]
    # coordinates that do not exist in the tiles' CRS are refused with the reason
    bad = tmp_path / "bad.gpkg"
    write_gpkg_layer(bad, shapely.to_wkb(shapely.points([9.0], [95.0])), [np.array(["Forest"], object)], ["class"],
                     layer="pts", crs="EPSG:4326", geometry_type="Point")
    capsys.readouterr()
    assert main(["assess", str(tiles), "--reference", str(bad), "--field", "class", "--out",
                 str(tmp_path / "bad_report")]) == 2
    assert "do not exist there" in capsys.readouterr().err and not (tmp_path / "bad_report").exists()


def test_tiles_without_a_class_are_not_sampled(tmp_path):
    boxes = shapely.box(np.arange(6.0), 0.0, np.arange(6.0) + 1, 1.0)
    path = tmp_path / "t.gpkg"
    write_gpkg_layer(path, shapely.to_wkb(boxes), [np.array(["a", "b", None, "a", "b", "a"], object),
                                                   np.array([f"0/{i}" for i in range(6)], object)],
                     ["class_name", "tile_key"], layer="tiles", crs="EPSG:32632", geometry_type="Polygon")
    assert main(["sample", str(path), "--n", "5", "--out", str(tmp_path / "s.gpkg")]) == 0
    assert "0/2" not in _read(tmp_path / "s.gpkg", SAMPLE_LAYER)["tile_key"].tolist()
    assert main(["sample", str(path), "--n", "6", "--out", str(tmp_path / "s6.gpkg")]) == 2


# -- bad input: exit 2, a message with a hint, nothing written ----------------------------------------
def _fails(capsys, argv: list[str], needle: str, absent: Path) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "hint:" in err, err
    assert not absent.exists()
    assert not [p for p in absent.parent.iterdir() if p.name.startswith(f".{absent.name}")]


def test_bad_sample_input(world, tmp_path, capsys):
    tiles = str(world[0])
    out = tmp_path / "s.gpkg"
    _fails(capsys, ["sample", tiles, "--n", "0", "--out", str(out)], "--n must be at least 1", out)
    _fails(capsys, ["sample", tiles, "--n", "721", "--out", str(out)], "more than the 720 classified tiles", out)
    _fails(capsys, ["sample", str(tmp_path / "none.gpkg"), "--n", "5", "--out", str(out)], "does not exist", out)
    _fails(capsys, ["sample", tiles, "--n", "5", "--layer", "other", "--out", str(out)], "no layer 'other'", out)
    other = tmp_path / "other.gpkg"
    write_gpkg_layer(other, shapely.to_wkb(shapely.points([0.0], [0.0])), [np.array(["x"], object)], ["c"],
                     layer="pts", crs="EPSG:4326", geometry_type="Point")
    _fails(capsys, ["sample", str(other), "--n", "1", "--out", str(out)], "has no layer 'tiles'", out)
    _fails(capsys, ["sample", tiles, "--n", "5", "--min-per-class", "-1", "--out", str(out)], "negative", out)
    _fails(capsys, ["sample", tiles, "--n", "5", "--out", str(tmp_path / "s.txt")], "not a .gpkg",
           tmp_path / "s.txt")
    before = world[0].stat().st_mtime_ns
    assert main(["sample", tiles, "--n", "5", "--out", tiles]) == 2
    assert "it would be overwritten" in capsys.readouterr().err and world[0].stat().st_mtime_ns == before
    assert main(["sample", tiles, "--n", "5", "--out", str(out)]) == 0
    labels = _read(out, SAMPLE_LAYER)["tile_key"].tolist()
    assert main(["sample", tiles, "--n", "9", "--out", str(out)]) == 2  # a sample is never replaced unasked
    assert "already exists" in capsys.readouterr().err and _read(out, SAMPLE_LAYER)["tile_key"].tolist() == labels


def test_bad_assess_input(world, tmp_path, capsys):
    tiles = str(world[0])
    sample = tmp_path / "sample.gpkg"
    assert main(["sample", tiles, "--n", "12", "--min-per-class", "3", "--out", str(sample)]) == 0
    capsys.readouterr()
    report = tmp_path / "report"
    base = ["assess", tiles, "--out", str(report)]
    _fails(capsys, base + ["--reference", str(tmp_path / "none.gpkg")], "does not exist", report)
    _fails(capsys, base + ["--reference", str(sample), "--field", "label"],
           "reference field 'label' is not in", report)
    _fails(capsys, base + ["--reference", str(sample)], "has a label in its field 'reference'", report)
    empty = tmp_path / "empty.gpkg"
    write_gpkg_layer(empty, np.array([], object), [np.array([], object)], ["reference"], layer="refs",
                     crs="EPSG:32632", geometry_type="Point")
    _fails(capsys, base + ["--reference", str(empty)], "is empty", report)
    before = world[0].stat().st_mtime_ns
    assert main(["assess", tiles, "--reference", str(sample), "--out", tiles]) == 2
    assert "is a file" in capsys.readouterr().err and world[0].stat().st_mtime_ns == before
    # a reference class unknown to the map is reported and kept
    keys = _read(sample, SAMPLE_LAYER)["tile_key"].tolist()
    label_sample(sample, {k: ("Wetland" if i == 0 else "Forest") for i, k in enumerate(keys)})
    assert main(base + ["--reference", str(sample)]) == 0
    assert "reference class 'Wetland' is not a class of the map" in capsys.readouterr().out
    assert "Wetland" in json.loads((report / "assessment.json").read_text())["classes"]
