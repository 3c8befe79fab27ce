"""Tile classification: grids, fields, style, nodata, areas, bad input, atomic output."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import shapely
import torch
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

from asymkd import cli
from asymkd.classify import classify
from asymkd.classify.reader import resolve_bands
from asymkd.errors import ConfigError, DataError, ModelFileError
from asymkd.events import Events
from asymkd.export import export_onnx
from asymkd.models.backbones import SceneClassifier
from asymkd.models.files import load_model, save_model
from asymkd.models.metadata import ModelMeta

torch.set_num_threads(1)
T = 32  # the test model's patch size
CLASSES = ["Forest", "Water", "Urban", "Crop"]
UTM = "EPSG:32632"


# -- fixtures and helpers ------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random student (peaked head so classes are stable), exported to ONNX."""
    torch.manual_seed(0)
    net = SceneClassifier("resnet18_w16", 3, len(CLASSES))
    net.head.weight.data *= 20
    root = tmp_path_factory.mktemp("model")
    meta = ModelMeta(backbone="resnet18_w16", class_names=CLASSES, band_names=["R", "G", "B"],
                     mean=[100.0, 100.0, 100.0], std=[50.0, 50.0, 50.0], patch_size=T, gsd=10.0)
    folder = save_model(root / "student", net, meta)
    onnx_path = export_onnx(folder, root / "student.onnx", check_samples=8).path
    return onnx_path, folder


def texture(h: int, w: int, seed: int = 0, bands: int = 3) -> np.ndarray:
    """uint8 image with 8-px blocks of random colour plus noise, so tiles differ."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(20, 220, (bands, h // 8 + 1, w // 8 + 1)).astype(np.uint8)
    img = np.repeat(np.repeat(coarse, 8, 1), 8, 2)[:, :h, :w]
    return (img + rng.integers(0, 30, (bands, h, w))).astype(np.uint8)


def write_raster(path: Path, data: np.ndarray, crs=UTM, transform=None, nodata=None, interp=None) -> Path:
    transform = transform or from_origin(500000, 5200000, 10, 10)
    count, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=count, dtype=data.dtype.name, crs=crs,
                       transform=transform, nodata=nodata) as dst:
        dst.write(data)
        if interp is not None:
            dst.colorinterp = interp
    return path


def read_layer(path: Path):
    meta, _, wkb, values = pyogrio.raw.read(str(path), layer="tiles")
    fields = dict(zip(meta["fields"], values, strict=True))
    return shapely.from_wkb(wkb), fields, meta


def torch_probs(folder: Path, tiles: np.ndarray) -> np.ndarray:
    net, meta = load_model(folder)
    mean = np.asarray(meta.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta.std, np.float32).reshape(1, -1, 1, 1)
    with torch.no_grad():
        return torch.softmax(net(torch.from_numpy((tiles.astype(np.float32) - mean) / std)), 1).numpy()


def only_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# -- grid geometry -------------------------------------------------------------------
def test_tile_polygons_equal_window_bounds(model, tmp_path):
    transform = from_origin(500123.5, 5200456.25, 10, 10)
    src = write_raster(tmp_path / "r.tif", texture(5 * T, 7 * T), transform=transform)
    res = classify(model[0], src, tmp_path / "out.gpkg")
    geoms, f, meta = read_layer(tmp_path / "out.gpkg")
    assert res.tiles_total == 35 and res.tiles_classified == 35 and len(geoms) == 35
    assert CRS.from_user_input(meta["crs"]) == CRS.from_user_input(UTM)
    seen = set()
    for g, r, c, key in zip(geoms, f["row"], f["col"], f["tile_key"], strict=True):
        assert g.bounds == window_bounds(Window(c * T, r * T, T, T), transform)  # exact
        assert key == f"{r}/{c}"
        seen.add((r, c))
    assert seen == {(r, c) for r in range(5) for c in range(7)}
    np.testing.assert_array_equal(f["valid_fraction"], 1.0)


def test_stride_edge_tiles_and_min_valid(model, tmp_path):
    src = write_raster(tmp_path / "r.tif", texture(70, 100))
    res = classify(model[0], src, tmp_path / "a.gpkg", stride=16, min_valid=0.4)
    # cols: starts 0,16,..,80 (6), rows: 0,16,32,48 (4); edge tiles run past the raster
    assert res.tiles_total == 24 and res.tiles_classified == 24
    geoms, f, _ = read_layer(tmp_path / "a.gpkg")
    last = {(r, c): (g, v) for g, r, c, v in zip(geoms, f["row"], f["col"], f["valid_fraction"], strict=True)}
    g, v = last[(3, 5)]
    assert g.bounds == window_bounds(Window(80, 48, T, T), from_origin(500000, 5200000, 10, 10))
    assert v == pytest.approx((20 / 32) * (22 / 32))
    res = classify(model[0], src, tmp_path / "b.gpkg", stride=16, min_valid=0.7)
    assert res.tiles_skipped == 4 + 6 - 1 and res.tiles_classified == 15  # last row and last column
    res = classify(model[0], src, tmp_path / "c.gpkg", stride=16)  # default 0.5: only the corner goes
    assert res.tiles_skipped == 1


def slippy(lon: float, lat: float, z: int) -> tuple[int, int]:
    """The standard OSM slippy-map formula, written independently of the code under test."""
    n = 2 ** z
    x = math.floor((lon + 180.0) / 360.0 * n)
    lat_r = math.radians(lat)
    y = math.floor((1.0 - math.log(math.tan(lat_r) + 1.0 / math.cos(lat_r)) / math.pi) / 2.0 * n)
    return x, y


def slippy_bounds(x: int, y: int, z: int) -> tuple[float, float, float, float]:
    n = 2 ** z

    def lon(i: int) -> float:
        return i / n * 360.0 - 180.0

    def lat(j: int) -> float:
        return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * j / n))))

    return lon(x), lat(y + 1), lon(x + 1), lat(y)


def test_xyz_keys_match_the_slippy_map_formula(model, tmp_path):
    z = 14
    to_merc = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    to_ll = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
    x0, y1 = to_merc.transform(9.0, 47.0)
    res = 25.0
    w, h = 320, 280
    transform = from_origin(x0, y1 + h * res, res, res)
    src = write_raster(tmp_path / "merc.tif", texture(h, w), crs="EPSG:3857", transform=transform)
    result = classify(model[0], src, tmp_path / "xyz.gpkg", xyz_zoom=z, min_valid=0.01)
    geoms, f, meta = read_layer(tmp_path / "xyz.gpkg")
    assert CRS.from_user_input(meta["crs"]).to_epsg() == 3857
    # expected tiles from the raster's lon/lat corners (a rectangle in EPSG:3857 stays one)
    lon0, lat0 = to_ll.transform(x0, y1)
    lon1, lat1 = to_ll.transform(x0 + w * res, y1 + h * res)
    tx0, ty0 = slippy(lon0, lat1, z)
    tx1, ty1 = slippy(lon1, lat0, z)
    expected = {(x, y) for x in range(tx0, tx1 + 1) for y in range(ty0, ty1 + 1)}
    assert result.tiles_total == len(expected) > 1
    assert len(geoms) > 0
    for g, zz, x, y, key in zip(geoms, f["z"], f["x"], f["y"], f["tile_key"], strict=True):
        lon, lat = to_ll.transform(g.centroid.x, g.centroid.y)
        assert (zz, x, y) == (z, *slippy(lon, lat, z))
        assert key == f"{z}/{x}/{y}"
        bx0, by0 = to_merc.transform(*slippy_bounds(x, y, z)[:2])
        bx1, by1 = to_merc.transform(*slippy_bounds(x, y, z)[2:])
        np.testing.assert_allclose(g.bounds, (bx0, by0, bx1, by1), rtol=0, atol=1e-3)
    # every tile that really overlaps the raster is there
    raster_box = shapely.box(x0, y1, x0 + w * res, y1 + h * res)
    got = set(zip(f["x"].tolist(), f["y"].tolist(), strict=True))
    for x, y in expected:
        b = slippy_bounds(x, y, z)
        tile = shapely.box(*to_merc.transform(b[0], b[1]), *to_merc.transform(b[2], b[3]))
        if tile.intersection(raster_box).area / tile.area > 0.1:
            assert (x, y) in got


# -- fields, style, class raster -----------------------------------------------------
def test_fields_match_running_the_model_directly(model, tmp_path):
    data = texture(3 * T, 4 * T, seed=3)
    src = write_raster(tmp_path / "r.tif", data)
    classify(model[0], src, tmp_path / "out.gpkg", batch_size=5, chunk=4)  # several background writes
    _, f, _ = read_layer(tmp_path / "out.gpkg")
    assert len(f["class_id"]) == 12
    tiles = np.stack([data[:, r * T:(r + 1) * T, c * T:(c + 1) * T] for r, c in zip(f["row"], f["col"], strict=True)])
    probs = torch_probs(model[1], tiles)
    order = np.argsort(-probs, axis=1)
    np.testing.assert_array_equal(f["class_id"], order[:, 0])
    np.testing.assert_array_equal(f["second_id"], order[:, 1])
    np.testing.assert_allclose(f["confidence"], probs.max(1), atol=1e-4)
    np.testing.assert_allclose(f["second_prob"], np.sort(probs, 1)[:, -2], atol=1e-4)
    ent = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(1) / np.log(len(CLASSES))
    np.testing.assert_allclose(f["entropy"], ent, atol=1e-4)
    assert list(f["class_name"]) == [CLASSES[i] for i in f["class_id"]]
    assert list(f["second_name"]) == [CLASSES[i] for i in f["second_id"]]
    assert len(set(f["class_id"].tolist())) > 1  # the test raster is not one class


def test_batches_classified_at_once_give_the_same_layer_in_the_same_order(model, tmp_path, monkeypatch):
    import threading
    import time

    from asymkd.classify.infer import OnnxClassifier
    src = write_raster(tmp_path / "r.tif", texture(3 * T, 5 * T, seed=5))
    running, most = [0], [0]
    lock = threading.Lock()
    predict = OnnxClassifier.predict

    def slow_predict(self, images):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)  # every run lasts long enough to meet the others
        try:
            return predict(self, images)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(OnnxClassifier, "predict", slow_predict)
    layers = {}
    for streams in (1, 3):
        most[0] = 0
        classify(model[0], src, tmp_path / f"s{streams}.gpkg", batch_size=2, streams=streams, threads=3)
        assert most[0] == streams
        layers[streams] = read_layer(tmp_path / f"s{streams}.gpkg")
    (geoms, fields, _), (geoms1, fields1, _) = layers[3], layers[1]
    assert shapely.to_wkb(geoms).tolist() == shapely.to_wkb(geoms1).tolist()  # same tiles, same order
    for name, values in fields.items():
        if values.dtype.kind == "f":  # 1 and 3 threads per run sum in other orders
            np.testing.assert_allclose(values, fields1[name], atol=1e-6, err_msg=name)
        else:
            assert values.tolist() == fields1[name].tolist(), name


def test_threads_are_shared_between_the_batches_classified_at_once(monkeypatch):
    from asymkd.classify import MAX_STREAMS, infer
    monkeypatch.setattr(infer, "available_cores", lambda: 6)
    cpu, gpu = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert infer.stream_threads(cpu, 0, 0) == (6, 1)      # one batch per core
    assert infer.stream_threads(cpu, 4, 0) == (4, 1)
    assert infer.stream_threads(cpu, 4, 2) == (2, 2)
    assert infer.stream_threads(cpu, 64, 0) == (MAX_STREAMS, 64 // MAX_STREAMS)
    assert infer.stream_threads(cpu, 1, 3) == (3, 1)      # never 0 threads: onnxruntime would take every core
    assert infer.stream_threads(gpu, 0, 0) == (1, 0)      # a GPU: one at a time unless asked


def test_band_mapping_by_colour_interpretation_and_explicit(model, tmp_path):
    data = texture(2 * T, 3 * T, seed=4)
    rgb = write_raster(tmp_path / "rgb.tif", data)
    bgr = write_raster(tmp_path / "bgr.tif", data[::-1].copy(),
                       interp=[ColorInterp.blue, ColorInterp.green, ColorInterp.red])
    plain = write_raster(tmp_path / "plain.tif", data[::-1].copy(),
                         interp=[ColorInterp.gray, ColorInterp.undefined, ColorInterp.undefined])
    classify(model[0], rgb, tmp_path / "rgb.gpkg")
    res = classify(model[0], bgr, tmp_path / "bgr.gpkg")
    classify(model[0], plain, tmp_path / "plain.gpkg", bands="3,2,1")
    assert res.bands == [3, 2, 1]
    ref = read_layer(tmp_path / "rgb.gpkg")[1]
    for name in ("bgr", "plain"):
        got = read_layer(tmp_path / f"{name}.gpkg")[1]
        np.testing.assert_array_equal(got["class_id"], ref["class_id"])
        np.testing.assert_allclose(got["confidence"], ref["confidence"], atol=1e-6)


def test_a_vrt_is_classified_like_its_source(model, tmp_path):
    data = texture(2 * T, 2 * T, seed=9)
    write_raster(tmp_path / "src.tif", data)
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{i}"><ColorInterp>{c}</ColorInterp><SimpleSource>'
        f'<SourceFilename relativeToVRT="1">src.tif</SourceFilename><SourceBand>{i}</SourceBand></SimpleSource>'
        f'</VRTRasterBand>' for i, c in ((1, "Red"), (2, "Green"), (3, "Blue")))
    (tmp_path / "r.vrt").write_text(
        f'<VRTDataset rasterXSize="{2 * T}" rasterYSize="{2 * T}"><SRS>{UTM}</SRS>'
        f'<GeoTransform>500000, 10, 0, 5200000, 0, -10</GeoTransform>{bands}</VRTDataset>')
    classify(model[0], tmp_path / "src.tif", tmp_path / "a.gpkg")
    classify(model[0], tmp_path / "r.vrt", tmp_path / "b.gpkg")
    a, b = read_layer(tmp_path / "a.gpkg")[1], read_layer(tmp_path / "b.gpkg")[1]
    assert len(b["class_id"]) == 4
    np.testing.assert_array_equal(a["class_id"], b["class_id"])
    np.testing.assert_array_equal(a["confidence"], b["confidence"])


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32", "float64"])
def test_raster_value_types_give_the_same_result(model, tmp_path, dtype):
    data = texture(T, 3 * T, seed=11)
    classify(model[0], write_raster(tmp_path / "u8.tif", data), tmp_path / "u8.gpkg")
    other = classify(model[0], write_raster(tmp_path / "x.tif", data.astype(dtype)), tmp_path / "x.gpkg")
    a, b = read_layer(tmp_path / "u8.gpkg")[1], read_layer(other.gpkg)[1]
    np.testing.assert_array_equal(a["class_id"], b["class_id"])
    np.testing.assert_allclose(a["confidence"], b["confidence"], atol=1e-6)


def test_band_mapping_by_description(tmp_path):
    data = texture(8, 8, bands=4)
    path = write_raster(tmp_path / "d.tif", data)
    with rasterio.open(path, "r+") as ds:
        for i, d in enumerate(["nir", "b", "g", "r"], 1):
            ds.set_band_description(i, d)
    with rasterio.open(path) as ds:
        assert resolve_bands(ds, ["R", "G", "B"]) == ([4, 3, 2], "band descriptions")


def test_qml_is_a_categorized_style_with_the_model_colours(model, tmp_path):
    from asymkd.models.onnx_file import read_onnx_metadata
    colors = read_onnx_metadata(model[0]).class_colors
    src = write_raster(tmp_path / "r.tif", texture(T, 2 * T))
    res = classify(model[0], src, tmp_path / "out.gpkg")
    assert res.qml == tmp_path / "out.qml"
    root = ET.parse(res.qml).getroot()
    assert root.tag == "qgis"
    renderer = root.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class_name"
    cats = renderer.findall("categories/category")
    assert [c.get("value") for c in cats] == CLASSES and [c.get("label") for c in cats] == CLASSES
    symbols = {s.get("name"): s for s in renderer.findall("symbols/symbol")}
    for cat, color in zip(cats, colors, strict=True):
        sym = symbols[cat.get("symbol")]
        assert sym.get("type") == "fill"
        fill = sym.find("layer").find("prop[@k='color']").get("v").split(",")
        assert "#" + "".join(f"{int(v):02x}" for v in fill[:3]) == color
    # the same style is the layer's default inside the GeoPackage
    _, _, _, values = pyogrio.raw.read(str(res.gpkg), layer="layer_styles", read_geometry=False)
    meta = pyogrio.read_info(str(res.gpkg), layer="layer_styles")
    row = dict(zip(meta["fields"], [v[0] for v in values], strict=True))
    assert row["f_table_name"] == "tiles" and row["useAsDefault"] == 1
    assert row["styleQML"] == res.qml.read_text(encoding="utf-8")


def test_class_raster_has_one_pixel_per_tile_and_a_colour_table(model, tmp_path):
    data = texture(3 * T, 4 * T, seed=5)
    data[:, :T, :T] = 0
    src = write_raster(tmp_path / "r.tif", data, nodata=0)
    res = classify(model[0], src, tmp_path / "out.gpkg", class_raster=tmp_path / "classes.tif")
    geoms, f, _ = read_layer(res.gpkg)
    with rasterio.open(tmp_path / "classes.tif") as ds:
        arr = ds.read(1)
        assert arr.shape == (3, 4) and ds.nodata == 255 and arr[0, 0] == 255
        for g, r, c, k in zip(geoms, f["row"], f["col"], f["class_id"], strict=True):
            assert arr[r, c] == k
            assert tuple(ds.window_bounds(Window(c, r, 1, 1))) == pytest.approx(g.bounds)
        cmap = ds.colormap(1)
    from asymkd.models.onnx_file import read_onnx_metadata
    for i, color in enumerate(read_onnx_metadata(model[0]).class_colors):
        assert "#" + "".join(f"{v:02x}" for v in cmap[i][:3]) == color


# -- nodata, small and odd rasters ------------------------------------------------------
def test_nodata_tiles_are_skipped_and_partial_tiles_filled(model, tmp_path):
    data = texture(2 * T, 4 * T, seed=6)
    data[:, :, :2 * T] = 0                     # left half: nodata
    data[:, :, 2 * T:2 * T + 10] = 0           # tile (r, 2): 10 of 32 columns nodata -> valid 0.6875
    data[:, T:, 3 * T:3 * T + 20] = 0          # tile (1, 3): 20 of 32 columns nodata -> valid 0.375
    src = write_raster(tmp_path / "r.tif", data, nodata=0)
    stream = io.StringIO()
    res = classify(model[0], src, tmp_path / "out.gpkg", events=Events(stream=stream, progress_bars=False))
    assert res.tiles_total == 8 and res.tiles_skipped == 5 and res.tiles_classified == 3
    _, f, _ = read_layer(res.gpkg)
    assert sorted(zip(f["row"].tolist(), f["col"].tolist(), strict=True)) == [(0, 2), (0, 3), (1, 2)]
    got = dict(zip(zip(f["row"].tolist(), f["col"].tolist(), strict=True),
                   zip(f["valid_fraction"], f["confidence"], strict=True), strict=True))
    assert got[(0, 2)][0] == pytest.approx(22 / 32)
    tile = data[:, :T, 2 * T:3 * T].astype(np.float32)
    tile[:, :, :10] = 100.0  # invalid pixels are fed as the training mean
    assert got[(0, 2)][1] == pytest.approx(torch_probs(model[1], tile[None]).max(), abs=1e-4)
    progress = [json.loads(line) for line in stream.getvalue().splitlines() if '"progress"' in line]
    assert progress[-1]["done"] == progress[-1]["total"] == 8 and progress[-1]["skipped"] == 5
    assert progress[-1]["provider"] == "CPUExecutionProvider" and "eta_s" in progress[-1]


def test_alpha_band_masks_tiles(model, tmp_path):
    rgb = texture(T, 3 * T, seed=10)
    alpha = np.full((1, T, 3 * T), 255, np.uint8)
    alpha[:, :, :T + 8] = 0  # tile 0 fully, tile 1 a quarter transparent
    src = write_raster(tmp_path / "rgba.tif", np.concatenate([rgb, alpha]),
                       interp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha])
    res = classify(model[0], src, tmp_path / "out.gpkg")
    _, f, _ = read_layer(res.gpkg)
    assert res.bands == [1, 2, 3] and res.tiles_skipped == 1
    assert list(f["col"]) == [1, 2] and list(f["valid_fraction"]) == [0.75, 1.0]


def test_nan_pixels_count_as_nodata(model, tmp_path):
    data = texture(T, 2 * T, seed=7).astype(np.float32)
    data[:, :, :T] = np.nan
    src = write_raster(tmp_path / "f.tif", data)
    res = classify(model[0], src, tmp_path / "out.gpkg")
    _, f, _ = read_layer(res.gpkg)
    assert res.tiles_skipped == 1 and list(f["col"]) == [1] and np.isfinite(f["confidence"]).all()


def test_all_nodata_raster_gives_an_empty_layer_and_a_message(model, tmp_path, capsys):
    src = write_raster(tmp_path / "r.tif", np.zeros((3, 2 * T, 2 * T), np.uint8), nodata=0)
    events = tmp_path / "ev.jsonl"
    rc = cli.main(["classify", str(model[0]), str(src), "--out", str(tmp_path / "out.gpkg"), "--events", str(events)])
    assert rc == 0
    info = pyogrio.read_info(str(tmp_path / "out.gpkg"), layer="tiles")
    assert info["features"] == 0 and "class_name" in list(info["fields"])
    assert (tmp_path / "out.qml").exists()
    warnings = [json.loads(line)["message"] for line in events.read_text().splitlines() if '"warning"' in line]
    assert any("no tile was classified" in w and "4 skipped" in w for w in warnings)


def test_raster_smaller_than_one_tile(model, tmp_path):
    src = write_raster(tmp_path / "r.tif", texture(20, 20))
    stream = io.StringIO()
    res = classify(model[0], src, tmp_path / "a.gpkg", events=Events(stream=stream, progress_bars=False))
    assert res.tiles_classified == 0 and res.tiles_skipped == 1
    text = stream.getvalue()
    assert "smaller than one 32-px tile" in text and "lower --min-valid" in text
    res = classify(model[0], src, tmp_path / "b.gpkg", min_valid=0.3)
    geoms, f, _ = read_layer(res.gpkg)
    assert res.tiles_classified == 1
    assert geoms[0].bounds == window_bounds(Window(0, 0, T, T), from_origin(500000, 5200000, 10, 10))
    assert f["valid_fraction"][0] == pytest.approx(400 / 1024)


def test_geographic_raster_is_warped_to_a_metric_grid(model, tmp_path):
    transform = from_origin(9.0, 47.03, 0.0001, 0.0001)
    src = write_raster(tmp_path / "geo.tif", texture(300, 400), crs="EPSG:4326", transform=transform)
    stream = io.StringIO()
    res = classify(model[0], src, tmp_path / "out.gpkg", events=Events(stream=stream, progress_bars=False))
    assert "geographic" in stream.getvalue() and "EPSG:32632" in stream.getvalue()
    geoms, _, meta = read_layer(res.gpkg)
    assert CRS.from_user_input(meta["crs"]).to_epsg() == 32632 and res.crs == "EPSG:32632"
    assert res.tiles_classified > 10
    b = np.array([g.bounds for g in geoms])
    np.testing.assert_allclose(b[:, 2] - b[:, 0], T * 10.0)
    np.testing.assert_allclose(b[:, 3] - b[:, 1], T * 10.0)


def test_other_resolution_is_resampled_to_the_model_gsd(model, tmp_path):
    src = write_raster(tmp_path / "r.tif", texture(96, 128), transform=from_origin(500000, 5200000, 5, 5))
    stream = io.StringIO()
    res = classify(model[0], src, tmp_path / "out.gpkg", events=Events(stream=stream, progress_bars=False))
    assert "resampled" in stream.getvalue()
    geoms, _, _ = read_layer(res.gpkg)
    assert res.tiles_total == 4 and res.tiles_classified == 4  # 64 x 48 px at 10 m
    assert {g.bounds for g in geoms} == {(500000 + c * 320.0, 5200000 - (r + 1) * 320.0,
                                          500000 + (c + 1) * 320.0, 5200000 - r * 320.0)
                                         for r in range(2) for c in range(2)}


# -- areas -----------------------------------------------------------------------------
def test_bbox_selects_the_tiles_inside(model, tmp_path):
    src = write_raster(tmp_path / "r.tif", texture(6 * T, 8 * T))
    x0, y0, s = 500000.0, 5200000.0, T * 10.0
    box = (x0 + 2 * s, y0 - 3 * s, x0 + 5 * s, y0 - 1 * s)  # exactly cols 2..4, rows 1..2
    res = classify(model[0], src, tmp_path / "a.gpkg", bbox=",".join(map(str, box)))
    _, f, _ = read_layer(res.gpkg)
    assert sorted(zip(f["row"].tolist(), f["col"].tolist(), strict=True)) == [(r, c) for r in (1, 2) for c in (2, 3, 4)]
    to_ll = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    ll = (*to_ll.transform(box[0] + 5, box[1] + 5), *to_ll.transform(box[2] - 5, box[3] - 5))
    res = classify(model[0], src, tmp_path / "b.gpkg", bbox=ll, bbox_crs="EPSG:4326")
    _, f, _ = read_layer(res.gpkg)
    assert {(r, c) for r in (1, 2) for c in (2, 3, 4)} <= set(zip(f["row"].tolist(), f["col"].tolist(), strict=True))


def test_mask_selects_tiles_meeting_the_polygons(model, tmp_path):
    src = write_raster(tmp_path / "r.tif", texture(6 * T, 8 * T))
    tri_utm = shapely.Polygon([(500100, 5199950), (502300, 5199300), (500500, 5198200)])
    to_ll = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    tri_ll = shapely.transform(tri_utm, lambda xy: np.column_stack(to_ll.transform(xy[:, 0], xy[:, 1])))
    mask = tmp_path / "mask.gpkg"
    pyogrio.raw.write(str(mask), geometry=shapely.to_wkb(np.array([tri_ll])), field_data=[np.array([1])],
                      fields=["id"], driver="GPKG", geometry_type="Polygon", crs="EPSG:4326")
    res = classify(model[0], src, tmp_path / "out.gpkg", mask=mask)
    _, f, _ = read_layer(res.gpkg)
    t = from_origin(500000, 5200000, 10, 10)
    expected = set()
    for r in range(6):
        for c in range(8):
            tile = shapely.box(*window_bounds(Window(c * T, r * T, T, T), t))
            if tile.intersection(tri_utm).area > 1.0:
                expected.add((r, c))
    assert set(zip(f["row"].tolist(), f["col"].tolist(), strict=True)) == expected
    assert 3 < len(expected) < 48


# -- bad input ---------------------------------------------------------------------------
def test_raster_with_fewer_bands_than_the_model_needs(model, tmp_path):
    src = write_raster(tmp_path / "two.tif", texture(T, T, bands=2))
    with pytest.raises(DataError, match="has 2 band.* needs 3"):
        classify(model[0], src, tmp_path / "out.gpkg")
    src3 = write_raster(tmp_path / "three.tif", texture(T, T))
    with pytest.raises(DataError, match=r"band\(s\) \[5\]"):
        classify(model[0], src3, tmp_path / "out.gpkg", bands="1,2,5")
    with pytest.raises(ConfigError, match="needs 3"):
        classify(model[0], src3, tmp_path / "out.gpkg", bands="1,2")
    assert only_files(tmp_path) == {"two.tif", "three.tif"}


def test_raster_without_crs(model, tmp_path):
    path = tmp_path / "nocrs.tif"
    with rasterio.open(path, "w", driver="GTiff", width=T, height=T, count=3, dtype="uint8") as dst:
        dst.write(texture(T, T))
    with pytest.raises(DataError, match="no coordinate reference system") as info:
        classify(model[0], path, tmp_path / "out.gpkg")
    assert "Set CRS" in info.value.hint


def test_area_that_misses_the_raster(model, tmp_path):
    src = write_raster(tmp_path / "r.tif", texture(2 * T, 2 * T))
    with pytest.raises(DataError, match="does not intersect the raster"):
        classify(model[0], src, tmp_path / "out.gpkg", bbox="600000,5100000,601000,5101000")
    with pytest.raises(DataError, match="does not intersect the raster"):
        classify(model[0], src, tmp_path / "out.gpkg", bbox="10,50,10.1,50.1", bbox_crs="EPSG:4326")
    with pytest.raises(ConfigError, match="not four numbers"):
        classify(model[0], src, tmp_path / "out.gpkg", bbox="1,2,x,4")
    assert only_files(tmp_path) == {"r.tif"}


def test_unwritable_output_path(model, tmp_path):
    src = write_raster(tmp_path / "r.tif", texture(T, T))
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(DataError, match="cannot write output"):
        classify(model[0], src, tmp_path / "afile" / "out.gpkg")
    with pytest.raises(ConfigError, match="not a .gpkg"):
        classify(model[0], src, tmp_path / "out.shp")


def test_existing_output_is_refused_unless_overwrite(model, tmp_path):
    src = write_raster(tmp_path / "r.tif", texture(T, 2 * T))
    out = tmp_path / "out.gpkg"
    out.write_text("precious")
    with pytest.raises(ConfigError, match="already exists") as info:
        classify(model[0], src, out)
    assert "--overwrite" in info.value.hint and out.read_text() == "precious"
    res = classify(model[0], src, out, overwrite=True)
    assert res.tiles_classified == 2 and pyogrio.read_info(str(out), layer="tiles")["features"] == 2


def test_model_file_that_is_not_onnx(tmp_path):
    src = write_raster(tmp_path / "r.tif", texture(T, T))
    bad = tmp_path / "model.onnx"
    bad.write_text("not a model")
    with pytest.raises(ModelFileError, match="not an ONNX model"):
        classify(bad, src, tmp_path / "out.gpkg")
    assert not (tmp_path / "out.gpkg").exists()


def test_cli_reports_bad_input_with_exit_code_2(model, tmp_path, capsys):
    src = write_raster(tmp_path / "two.tif", texture(T, T, bands=2))
    rc = cli.main(["classify", str(model[0]), str(src), "--out", str(tmp_path / "o.gpkg")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "has 2 band(s) but the model needs 3" in err and "hint:" in err


def test_cuda_request_without_cuda_provider(model, tmp_path):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    src = write_raster(tmp_path / "r.tif", texture(T, T))
    with pytest.raises(ConfigError, match="no CUDA provider"):
        classify(model[0], src, tmp_path / "out.gpkg", device="cuda")


# -- nothing half-written ------------------------------------------------------------------
def test_error_mid_run_leaves_nothing_and_keeps_the_old_output(model, tmp_path, monkeypatch):
    from asymkd.classify import infer
    src = write_raster(tmp_path / "r.tif", texture(4 * T, 4 * T))
    out = tmp_path / "out.gpkg"
    classify(model[0], src, out, class_raster=tmp_path / "c.tif")
    before = out.read_bytes()
    files = only_files(tmp_path)
    calls = {"n": 0}
    real = infer.OnnxClassifier.predict

    def failing(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(self, images)

    monkeypatch.setattr(infer.OnnxClassifier, "predict", failing)
    stream = io.StringIO()
    with pytest.raises(RuntimeError, match="disk on fire"):
        classify(model[0], src, out, batch_size=2, overwrite=True, class_raster=tmp_path / "c.tif",
                 events=Events(stream=stream, progress_bars=False))
    assert only_files(tmp_path) == files and out.read_bytes() == before
    assert "no output was written" in stream.getvalue()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cancel_leaves_no_output_and_no_temporary_files(model, tmp_path, sig):
    src = write_raster(tmp_path / "big.tif", texture(48 * T, 64 * T, seed=8))  # 3072 tiles
    events = tmp_path / "ev.jsonl"
    out = tmp_path / "out.gpkg"
    cmd = [sys.executable, "-m", "asymkd.cli", "classify", str(model[0]), str(src), "--out", str(out),
           "--batch-size", "1", "--threads", "1", "--class-raster", str(tmp_path / "c.tif"), "--events", str(events)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if events.exists() and '"progress"' in events.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "classify finished before it could be cancelled"
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "cancelled" in err
    assert only_files(tmp_path) == {"big.tif", "ev.jsonl"}
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert any(e["event"] == "error" and e["kind"] == "Cancelled" for e in lines)
    assert any(e["event"] == "log" and "no output was written" in e["message"] for e in lines)


def test_io_threads_can_run_at_low_priority():
    import threading

    from asymkd.classify.reader import lower_thread_priority
    seen = {}

    def work():
        lower_thread_priority(19)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["nice"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # the caller is untouched


@pytest.mark.parametrize("in_flight", [1, 3])
def test_reused_batch_memory_holds_while_in_flight(tmp_path, in_flight):
    """The reader fills its batch buffers in turn: a slow consumer that classifies
    `in_flight` batches at once still sees each batch intact until it takes the
    in_flight + 1-th batch after it, and every tile's pixels are its own."""
    import time

    import rasterio

    from asymkd.classify.area import plan_tiles, resolve_area
    from asymkd.classify.grid import pixel_grid
    from asymkd.classify.reader import PrefetchReader
    data = texture(4 * T, 9 * T, seed=4)
    path = write_raster(tmp_path / "r.tif", data)
    with rasterio.open(path) as src:
        grid = pixel_grid(src, None, T, T)
        plan = plan_tiles(grid, resolve_area(src, grid, None, None, None, None, warn=print))
    reader = PrefetchReader(path, plan, [1, 2, 3], fill=[0, 0, 0], batch_size=2, prefetch=1, max_strip_tiles=4,
                            dtype=data.dtype, in_flight=in_flight)
    held: list[tuple[np.ndarray, np.ndarray]] = []
    seen = 0
    for batch in reader:
        if len(held) > in_flight:  # the batch in_flight + 1 before this one may be reused now
            held.pop(0)
        for images, copy in held:
            assert np.array_equal(images, copy)
        held.append((batch.images, batch.images.copy()))
        for image, r, c in zip(batch.images, batch.rows, batch.cols, strict=True):
            assert np.array_equal(image, data[:, r * T:(r + 1) * T, c * T:(c + 1) * T])
        seen += len(batch.rows)
        time.sleep(0.01)  # the reader runs ahead and fills every buffer it may
    assert seen == 4 * 9


def test_one_terminal_progress_bar(model, tmp_path, monkeypatch):
    import tqdm
    bars: list[str] = []
    real = tqdm.tqdm

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            bars.append(kwargs.get("desc", ""))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Counting)
    src = write_raster(tmp_path / "r.tif", texture(3 * T, 3 * T))
    classify(model[0], src, tmp_path / "out.gpkg", batch_size=2, events=Events(None, progress_bars=True))
    assert bars == ["classify"]
