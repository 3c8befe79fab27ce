"""The synthetic world: deterministic, readable as folder datasets and as map data, and
built so MS separates classes that RGB confuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from pyogrio.raw import read as read_vector

from asymkd import cli
from asymkd.data import landcover, synth
from asymkd.data.patches import load_folder, match_pairs
from asymkd.errors import ConfigError, DataError
from asymkd.palette import EUROSAT_COLORS, class_color, class_colors, hex_to_rgb

TINY = dict(size=16, ms_per_class=4, rgb_per_class=3, test_per_class=2, unlabeled_per_class=1,
            paired=4, classes=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    return synth.make_world(tmp_path_factory.mktemp("world"), synth.SynthConfig(**TINY))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    again = synth.make_world(tmp_path / "again", synth.SynthConfig(**TINY))
    first, second = _files(Path(world["root"])), _files(Path(again["root"]))
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    import pyogrio  # the pinned GeoPackage timestamp must not leak into other writers
    assert pyogrio.get_gdal_config_option("OGR_CURRENT_DATE") is None
    other = synth.make_world(tmp_path / "other", synth.SynthConfig(**{**TINY, "seed": 1}))
    a = load_folder(world["ms"], "ms").images
    b = load_folder(other["ms"], "ms").images
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_patch_does_not_depend_on_other_counts():
    cfg = synth.SynthConfig(**TINY)
    big = synth.SynthConfig(**{**TINY, "ms_per_class": 9, "classes": "all"})
    small = [p.data for p in synth._patches(cfg, "ms", cfg.ms_per_class, 0, synth.MS_PLACE)]
    large = [p.data for p in synth._patches(big, "ms", big.ms_per_class, 0, synth.MS_PLACE)]
    assert np.array_equal(small[0], large[0]) and np.array_equal(small[4], large[9])


def test_folders_read_by_load_folder(world):
    names = synth.CLASSES[:3]
    ms = load_folder(world["ms"], "ms")
    assert ms.images.shape == (12, 13, 16, 16)
    assert ms.band_names == synth.BAND_NAMES and ms.class_names == names
    assert ms.class_counts() == {n: 4 for n in names}
    assert ms.images.min() >= 1 and ms.images.max() < 10000
    for key, count in (("rgb_train", 9), ("rgb_test", 6)):
        rgb = load_folder(world[key], "rgb")  # another camera: 2x the pixels over the same ground
        assert rgb.images.shape == (count, 3, 32, 32) and rgb.class_names == names
    unlabeled = load_folder(world["rgb_unlabeled"], "rgb")
    assert len(unlabeled) == 3 and (unlabeled.labels == -1).all()
    # RGB sets come from other places: no stem shared with the MS set (no accidental pairs)
    train_stems = set(load_folder(world["rgb_train"], "rgb").stems)
    assert train_stems.isdisjoint(ms.stems)


def test_ms_patch_georeference(world):
    path = next(Path(world["ms"]).rglob("*.tif"))
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() == 32632 and src.res == (10.0, 10.0)
        assert src.dtypes[0] == "uint16" and src.count == 13
        assert list(src.descriptions) == synth.BAND_NAMES


def test_paired_are_the_same_target(world):
    ms = load_folder(world["ms"], "ms")
    paired = load_folder(world["rgb_paired"], "rgb")
    ms_idx, rgb_idx = match_pairs(ms, paired)
    assert len(ms_idx) == len(paired) == 4
    # round-robin over classes: every class has a pair
    assert sorted(set(paired.labels.tolist())) == [0, 1, 2]
    for i, j in zip(ms_idx, rgb_idx, strict=True):
        assert ms.labels[i] == paired.labels[j]
        expected = landcover.sensor_rgb(ms.images[i].astype(np.uint16), landcover.AERIAL,
                                        synth._same_target_rng(0, ms.stems[i]))
        assert np.array_equal(paired.images[j], expected.astype(np.float32))


def test_the_ms_sensors_own_true_colour_on_request(tmp_path):
    world = synth.make_world(tmp_path / "s2", synth.SynthConfig(**{**TINY, "rgb_sensor": "sentinel2"}))
    ms = load_folder(world["ms"], "ms")
    paired = load_folder(world["rgb_paired"], "rgb")
    ms_idx, rgb_idx = match_pairs(ms, paired)
    for i, j in zip(ms_idx, rgb_idx, strict=True):
        expected = landcover.render_rgb(ms.images[i].astype(np.uint16))
        assert np.array_equal(paired.images[j], expected.astype(np.float32))
    assert load_folder(world["rgb_train"], "rgb").images.shape[-1] == 16
    with rasterio.open(world["rgb_scene"]) as src:
        assert src.res == (10.0, 10.0)
    with pytest.raises(ConfigError, match="--rgb-sensor"):
        synth.SynthConfig(rgb_sensor="drone").validate()


def test_another_camera_sees_other_colours_of_the_same_ground():
    rng = np.random.default_rng(0)
    ms = landcover.render_patch("Forest", rng, 16, landcover.MS_PLACE)
    aerial = landcover.sensor_rgb(ms, landcover.AERIAL).astype(float)
    true_colour = landcover.render_rgb(ms).astype(float)
    assert aerial.shape == (3, 32, 32)
    # the same ground: a 2x2 block of fine pixels averages to about one coarse pixel's colour
    coarse = aerial.reshape(3, 16, 2, 16, 2).mean((2, 4))
    assert np.corrcoef(coarse[1].ravel(), true_colour[1].ravel())[0, 1] > 0.9
    assert abs(coarse.mean((1, 2)) - true_colour.mean((1, 2))).max() > 5  # but not its colours


def test_render_rgb_uses_true_colour_bands_and_eurosat_scale():
    ms = np.zeros((13, 2, 2), np.uint16)
    ms[3], ms[2], ms[1] = 2750, 1375, 10  # B04 red, B03 green, B02 blue
    ms[0] = 9999  # coastal: must not leak into "blue"
    rgb = landcover.render_rgb(ms)
    assert rgb[:, 0, 0].tolist() == [255, 128, 1]


def _labels(path: str) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    meta, _, geometry, fields = read_vector(path, layer="labels")
    geoms = shapely.from_wkb(geometry)
    return geoms, dict(zip(meta["fields"], fields, strict=True)), meta["crs"]


def test_scenes_georeferenced_with_labels(world):
    size = TINY["size"]
    with rasterio.open(world["ms_scene"]) as src:
        assert src.crs.to_epsg() == 32632 and src.res == (10.0, 10.0) and src.nodata == 0
        assert src.count == 13 and list(src.descriptions) == synth.BAND_NAMES
        assert (src.bounds.left, src.bounds.top) == synth.SCENE_ORIGIN
        geoms, fields, crs = _labels(world["ms_labels"])
        assert crs == "EPSG:32632" and len(geoms) == 12
        assert {"class", "row", "col", "source"} <= set(fields)
        # each polygon is exactly its cell, and the cell holds the MS patch named in `source`
        for g, cls, row, col, stem in zip(geoms, fields["class"], fields["row"], fields["col"], fields["source"],
                                          strict=True):
            x0 = src.bounds.left + col * size * 10
            y1 = src.bounds.top - row * size * 10
            assert shapely.equals(g, shapely.box(x0, y1 - size * 10, x0 + size * 10, y1))
            cell = src.read(window=rasterio.windows.Window(col * size, row * size, size, size))
            with rasterio.open(Path(world["ms"]) / cls / f"{stem}.tif") as patch:
                assert np.array_equal(cell, patch.read())
                assert patch.bounds == tuple(g.bounds)
    for key in ("rgb_scene", "rgb_test_scene"):
        with rasterio.open(world[key]) as src:
            assert src.count == 3 and src.dtypes[0] == "uint8" and src.nodata == 0
            assert [c.name for c in src.colorinterp] == ["red", "green", "blue"]


def test_rgb_scene_overlaps_ms_scene_with_same_content(world):
    ms_stems = set(load_folder(world["ms"], "ms").stems)
    geoms, fields, _ = _labels(world["rgb_labels"])
    overlap = 0
    with rasterio.open(world["ms_scene"]) as ms, rasterio.open(world["rgb_scene"]) as rgb:
        assert rgb.res == (5.0, 5.0)  # the other camera's pixels
        assert ms.bounds.left < rgb.bounds.left < ms.bounds.right < rgb.bounds.right  # a partial overlap
        for g, stem in zip(geoms, fields["source"], strict=True):
            if stem not in ms_stems:
                continue
            overlap += 1  # a cell over the MS scene shows that cell's target, as the camera sees it
            ms_cell = ms.read(window=ms.window(*g.bounds))
            rgb_cell = rgb.read(window=rgb.window(*g.bounds))
            assert ms_cell.shape[1:] == (16, 16) and rgb_cell.shape[1:] == (32, 32)
            expected = landcover.sensor_rgb(ms_cell, landcover.AERIAL, synth._same_target_rng(0, stem))
            assert np.array_equal(rgb_cell, expected)
    with rasterio.open(world["rgb_test_scene"]) as test:
        assert test.bounds.top <= ms.bounds.bottom and test.res == (5.0, 5.0)  # elsewhere
    info = json.loads(Path(world["world"]).read_text())
    assert overlap > 0 and info["map"]["rgb_scene"]["overlap_cells"] == overlap
    assert len(geoms) == 9 + overlap
    assert info["rgb_gsd_m"] == 5.0 and info["rgb_patch_size"] == 32


def test_world_json_counts(world):
    info = json.loads(Path(world["world"]).read_text())
    assert info["counts"]["ms"] == {n: 4 for n in synth.CLASSES[:3]}
    assert info["counts"]["rgb_paired"] == 4 and info["counts"]["rgb_unlabeled"] == 3
    assert info["band_names"] == synth.BAND_NAMES


def test_ms_separates_what_rgb_confuses():
    """Per-band patch means of the same targets: MS clearly beats RGB; RGB is above chance."""
    per_class = 16
    ms, labels = [], []
    for ci, name in enumerate(synth.CLASSES):
        for i in range(per_class):
            ms.append(landcover.render_patch(name, synth._rng(0, "ms", ci, i), 16, synth.MS_PLACE))
            labels.append(ci)
    ms_arr = np.stack(ms).astype(np.float64)
    rgb_arr = np.stack([landcover.render_rgb(m) for m in ms]).astype(np.float64)
    y = np.array(labels)
    train = np.arange(len(y)) % 2 == 0
    acc = {}
    for key, arr in (("ms", ms_arr), ("rgb", rgb_arr)):
        f = landcover.patch_mean_features(arr)
        acc[key] = landcover.nearest_mean_accuracy(f[train], y[train], f[~train], y[~train])
    assert acc["ms"] >= 0.8, acc
    assert acc["ms"] - acc["rgb"] >= 0.25, acc
    assert acc["rgb"] >= 0.25, acc  # chance is 0.1: RGB keeps some signal


def test_cli_synth_and_its_errors(tmp_path, capsys):
    out = tmp_path / "w"
    events = tmp_path / "events.jsonl"
    rc = cli.main(["synth", "--out", str(out), "--size", "16", "--ms-per-class", "2",
                   "--rgb-per-class", "2", "--test-per-class", "1", "--unlabeled-per-class", "0",
                   "--paired", "2", "--classes", "2", "--events", str(events)])
    assert rc == 0
    records = [json.loads(line) for line in events.read_text().splitlines()]
    result = [r for r in records if r["event"] == "result"][0]
    assert Path(result["paths"]["ms_scene"]).is_file() and "rgb_unlabeled" not in result["paths"]
    # rerun into the same world replaces it; a foreign non-empty folder is refused
    assert cli.main(["synth", "--out", str(out), "--size", "16", "--classes", "2",
                     "--ms-per-class", "1", "--rgb-per-class", "1", "--test-per-class", "1"]) == 0
    assert len(load_folder(out / "ms", "ms")) == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli.main(["synth", "--out", str(foreign)]) == 2
    assert "not a synthetic world" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs", [{"classes": "1"}, {"classes": "many"}, {"size": 4},
                                    {"ms_per_class": 0}, {"paired": -1}])
def test_bad_config(kwargs, tmp_path):
    with pytest.raises(ConfigError):
        synth.make_world(tmp_path, synth.SynthConfig(**kwargs))


def test_foreign_folder_is_data_error(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError):
        synth.make_world(tmp_path, synth.SynthConfig(**TINY))


def test_palette():
    assert class_color("Forest") == EUROSAT_COLORS["Forest"]
    assert class_color("sea lake") == EUROSAT_COLORS["SeaLake"]
    other = class_color("Vineyard")
    assert other == class_color("Vineyard") and other.startswith("#") and len(other) == 7
    assert other not in EUROSAT_COLORS.values()
    assert len(set(EUROSAT_COLORS.values())) == len(EUROSAT_COLORS)
    assert class_colors(["Pasture", "Vineyard"]) == [EUROSAT_COLORS["Pasture"], other]
    assert hex_to_rgb("#1a7a32") == (26, 122, 50)
