"""Guards of `asymkd classify` before and at the start of the work: outputs that would
overwrite a file behind an input, models that do not give probabilities, out-of-range
metadata, jobs too large to start unasked, options that do nothing, rasters scaled unlike the
training data, and geographic rasters across the antimeridian."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pyogrio.raw
import pytest
import rasterio
from onnx import TensorProto, helper, numpy_helper
from rasterio.transform import from_origin

from asymkd import cli
from asymkd.classify import classify
from asymkd.errors import ConfigError, ModelFileError
from asymkd.events import Events
from asymkd.models.metadata import validate_meta
from asymkd.models.onnx_file import FORMAT_VERSION, META_KEY, VERSION_KEY

CLASSES = ["Forest", "Water", "Urban"]
T = 8  # the test models' patch size
UTM = "EPSG:32632"


# -- a tiny ONNX model, built directly (no torch) ------------------------------------------------
def make_model(path: Path, *, output: str = "softmax", batch: int | str = "batch", meta: dict | None = None,
               mean: float = 100.0, std: float = 50.0) -> Path:
    """A 3-band, 3-class classifier of the tile's mean band values, with the metadata of an
    `asymkd export`: `output` "softmax" gives probabilities, "logits" the raw scores under the
    name `probabilities`; `batch` is the input's batch axis (a name: dynamic)."""
    weights = np.array([[0.08, -0.04, -0.04], [-0.04, 0.08, -0.04], [-0.04, -0.04, 0.08]], np.float32) * 40
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("Sub", ["pooled", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normed"]),
        helper.make_node("MatMul", ["normed", "w"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], ["logits" if output == "softmax" else "probabilities"]),
    ]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, 3])]
    if output == "softmax":
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3]))
    inits = [numpy_helper.from_array(np.full(3, mean, np.float32), "mean"),
             numpy_helper.from_array(np.full(3, std, np.float32), "std"),
             numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array([0.0, 0.1, 0.2], np.float32), "b")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            [batch, 3, "h", "w"])], outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    info = {"format_version": FORMAT_VERSION, "backbone": "tiny", "class_names": CLASSES,
            "class_colors": ["#1b7837", "#2166ac", "#b2182b"], "band_names": ["R", "G", "B"], "in_chans": 3,
            "num_classes": 3, "mean": [mean] * 3, "std": [std] * 3, "patch_size": T, "gsd": 10.0,
            **(meta or {})}
    for key in [k for k, v in info.items() if v is None]:
        del info[key]
    for key, value in ((META_KEY, json.dumps(info)), (VERSION_KEY, str(FORMAT_VERSION))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())
    return path


def write_raster(path: Path, data: np.ndarray, crs: str = UTM, transform=None, nodata=None) -> Path:
    transform = transform or from_origin(500000, 5200000, 10, 10)
    count, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=count, dtype=data.dtype.name, crs=crs,
                       transform=transform, nodata=nodata) as dst:
        dst.write(data)
    return path


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB with values spread like the model's training data (mean 100, std 50)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(100, 50, (3, h, w)), 0, 255).astype(np.uint8)


def fields(path: Path) -> dict[str, np.ndarray]:
    meta, _, _, values = pyogrio.raw.read(str(path), layer="tiles")
    return dict(zip(meta["fields"], values, strict=True))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["classify", *map(str, argv)])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "m.onnx")


@pytest.fixture
def scene(tmp_path) -> Path:
    return write_raster(tmp_path / "scene.tif", rgb(4 * T, 4 * T))


# -- 1. outputs against every file behind every input --------------------------------------------
def _behind(tmp_path: Path, scene: Path, variant: str) -> tuple[Path, Path, Path]:
    """(the raster given to classify, the class raster path given as output, the file it would destroy)."""
    if variant.startswith("vrt"):
        vrt = tmp_path / "v.vrt"
        subprocess.run(["gdal_translate", "-q", "-of", "VRT", str(scene), str(vrt)], check=True)
        raster, victim = vrt, scene
    else:
        raster = scene
        if variant.endswith("overview"):
            subprocess.run(["gdaladdo", "-q", "-ro", str(scene), "2"], check=True)
            victim = Path(str(scene) + ".ovr")
        else:
            victim = Path(str(scene) + ".aux.xml")
            victim.write_text('<PAMDataset><Metadata><MDI key="source">field survey</MDI></Metadata></PAMDataset>')
    out = victim
    if "hard link" in variant:
        out = tmp_path / "linked.tif"
        os.link(victim, out)
    elif "symlink" in variant:
        out = tmp_path / "sym.tif"
        out.symlink_to(victim)
    return raster, out, victim


@pytest.mark.parametrize("variant", ["vrt source", "vrt source by hard link", "vrt source by symlink",
                                     "overview by hard link", "aux.xml by symlink"])
def test_an_output_that_is_a_file_behind_an_input_is_refused(model, scene, tmp_path, capsys, variant):
    raster, out, victim = _behind(tmp_path, scene, variant)
    before = victim.read_bytes()
    code, err = run_cli(capsys, model, raster, "--out", tmp_path / "t.gpkg", "--class-raster", out, "--overwrite")
    assert code == 2, err
    assert "would be overwritten" in err and str(victim.name) in err and "hint:" in err
    assert victim.read_bytes() == before and not (tmp_path / "t.gpkg").exists()


def test_an_output_linked_to_the_model_or_a_part_of_the_mask_is_refused(model, scene, tmp_path, capsys):
    os.link(model, tmp_path / "m.tif")
    code, err = run_cli(capsys, model, scene, "--out", tmp_path / "t.gpkg", "--class-raster", tmp_path / "m.tif",
                        "--overwrite")
    assert code == 2 and "would be overwritten" in err
    import shapely
    mask = tmp_path / "mask.shp"
    pyogrio.raw.write(str(mask), np.array([shapely.to_wkb(shapely.box(500000, 5199900, 500100, 5200000))],
                                          dtype=object), [], [], geometry_type="Polygon", crs=UTM)
    dbf = tmp_path / "mask.dbf"
    before = dbf.read_bytes()
    (tmp_path / "c.tif").symlink_to(dbf)
    code, err = run_cli(capsys, model, scene, "--out", tmp_path / "t.gpkg", "--mask", mask,
                        "--class-raster", tmp_path / "c.tif", "--overwrite")
    assert code == 2 and "mask.dbf" in err and dbf.read_bytes() == before


# -- 2. the model's output must be probabilities -------------------------------------------------
def test_a_model_whose_output_is_logits_is_refused_naming_the_fix(scene, tmp_path, capsys):
    logits = make_model(tmp_path / "logits.onnx", output="logits")
    code, err = run_cli(capsys, logits, scene, "--out", tmp_path / "t.gpkg")
    assert code == 2, err
    assert "logits.onnx" in err and "probabilities" in err and "asymkd export" in err
    assert not (tmp_path / "t.gpkg").exists()


def test_a_model_declaring_logits_gets_a_softmax(model, scene, tmp_path):
    ref = classify(model, scene, tmp_path / "p.gpkg")
    logits = make_model(tmp_path / "logits.onnx", output="logits", meta={"output": "logits"})
    res = classify(logits, scene, tmp_path / "l.gpkg")
    assert res.tiles_classified == ref.tiles_classified == 16
    a, b = fields(tmp_path / "p.gpkg"), fields(tmp_path / "l.gpkg")
    np.testing.assert_array_equal(a["class_id"], b["class_id"])
    np.testing.assert_allclose(a["confidence"], b["confidence"], atol=1e-6)
    assert (b["confidence"] <= 1).all() and (b["confidence"] > 1 / 3).all()
    with pytest.raises(ModelFileError, match="output"):
        validate_meta({"backbone": "b", "class_names": ["A"], "band_names": ["R"], "mean": [1.0], "std": [1.0],
                       "patch_size": 8, "output": "scores"}, "m.onnx")


def test_a_model_with_a_fixed_batch_of_one_runs_with_a_warning(model, scene, tmp_path):
    one = make_model(tmp_path / "one.onnx", batch=1)
    ref = classify(model, scene, tmp_path / "p.gpkg")
    seen: list[str] = []
    events = Events()
    events.warning = seen.append  # type: ignore[method-assign]
    res = classify(one, scene, tmp_path / "one.gpkg", events=events, batch_size=5)
    assert res.tiles_classified == ref.tiles_classified == 16
    np.testing.assert_allclose(fields(tmp_path / "one.gpkg")["confidence"], fields(tmp_path / "p.gpkg")["confidence"],
                               atol=1e-6)
    assert any("fixed batch of 1" in w for w in seen), seen


# -- 3. ground resolution and input size within bounds -------------------------------------------
@pytest.mark.parametrize("gsd", [1e-6, 1e6])
def test_an_absurd_gsd_in_the_model_is_refused(scene, tmp_path, capsys, gsd):
    bad = make_model(tmp_path / "bad.onnx", meta={"gsd": gsd})
    code, err = run_cli(capsys, bad, scene, "--out", tmp_path / "t.gpkg")
    assert code == 2, err
    assert "'gsd'" in err and "bad.onnx" in err and "hint:" in err and not (tmp_path / "t.gpkg").exists()


@pytest.mark.parametrize("change", [{"gsd": 1e-6}, {"gsd": 1e6}, {"input_size": 2048}])
def test_meta_json_bounds_are_the_same_check(change):
    meta = {"backbone": "b", "class_names": ["A", "B"], "band_names": ["R"], "mean": [1.0], "std": [1.0],
            "patch_size": 8, "gsd": 10.0}
    with pytest.raises(ModelFileError, match=next(iter(change))):
        validate_meta({**meta, **change}, "x/meta.json")
    validate_meta({**meta, "gsd": 0.05, "input_size": 1024}, "x/meta.json")  # drone imagery, the largest size


# -- 4. the job's cost, estimated before it starts -----------------------------------------------
def huge_vrt(path: Path, size: int = 1_000_000) -> Path:
    """A VRT of a few hundred bytes declaring size x size pixels (no sources: every pixel 0)."""
    bands = "".join(f'<VRTRasterBand dataType="Byte" band="{i}"/>' for i in (1, 2, 3))
    path.write_text(f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>{UTM}</SRS>'
                    f'<GeoTransform>500000, 10, 0, 5200000, 0, -10</GeoTransform>{bands}</VRTDataset>')
    return path


def test_a_job_of_a_billion_tiles_is_refused_with_the_estimate(model, tmp_path, capsys):
    vrt = huge_vrt(tmp_path / "huge.vrt")
    assert vrt.stat().st_size < 1000
    code, err = run_cli(capsys, model, vrt, "--out", tmp_path / "t.gpkg")
    assert code == 2, err
    assert "15,625,000,000 tiles" in err and "--bbox" in err and "--stride" in err and "--yes" in err
    assert list(tmp_path.iterdir()) == [vrt]


def test_a_class_raster_larger_than_the_memory_is_refused_even_with_yes(model, tmp_path, capsys):
    vrt = huge_vrt(tmp_path / "huge.vrt")
    code, err = run_cli(capsys, model, vrt, "--out", tmp_path / "t.gpkg", "--stride", "1", "--class-raster",
                        tmp_path / "c.tif", "--yes")
    assert code == 2, err
    assert "of memory" in err and "--class-raster" in err and list(tmp_path.iterdir()) == [vrt]


def test_the_estimate_is_logged_and_yes_lifts_the_limits(model, scene, tmp_path, monkeypatch):
    from asymkd.classify import budget
    logged: list[str] = []
    events = Events()
    events.log = lambda message, level="info": logged.append(message)  # type: ignore[method-assign]
    classify(model, scene, tmp_path / "a.gpkg", events=events)
    assert any(m.startswith("estimate: 16 tiles") and "tiles/s" in m for m in logged), logged
    monkeypatch.setattr(budget, "MAX_TILES", 10)
    with pytest.raises(ConfigError, match="more than 10 tiles"):
        classify(model, scene, tmp_path / "b.gpkg")
    assert classify(model, scene, tmp_path / "b.gpkg", yes=True).tiles_classified == 16
    monkeypatch.setattr(budget, "MAX_TILES", 10_000_000)
    monkeypatch.setattr(budget.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ConfigError, match="1000 bytes is free"):
        classify(model, scene, tmp_path / "c.gpkg", class_raster=tmp_path / "c.tif")
    assert not (tmp_path / "c.gpkg").exists()


# -- 5. options that would do nothing ------------------------------------------------------------
def test_uncertain_by_without_a_threshold_is_refused(model, scene, tmp_path, capsys):
    code, err = run_cli(capsys, model, scene, "--out", tmp_path / "t.gpkg", "--uncertain-by", "margin")
    assert code == 2 and "--uncertain-below" in err and "hint:" in err and not (tmp_path / "t.gpkg").exists()
    with pytest.raises(ConfigError, match="--uncertain-below"):
        classify(model, scene, tmp_path / "t.gpkg", uncertain_by="entropy")
    code, err = run_cli(capsys, model, scene, "--out", tmp_path / "t.gpkg", "--uncertain-below", "0.5")
    assert code == 0, err  # the measure's default applies with a threshold


# -- 6. the raster's units against the training data ---------------------------------------------
def _quiet_events() -> tuple[Events, list[str]]:
    seen: list[str] = []
    events = Events()
    events.warning = seen.append  # type: ignore[method-assign]
    return events, seen


@pytest.mark.parametrize("units", ["float 0..1", "uint16 0..10000"])
def test_a_raster_in_other_units_than_the_training_data_is_refused(model, tmp_path, capsys, units):
    data = rgb(4 * T, 4 * T).astype(np.float64) / 255.0
    if units == "uint16 0..10000":
        data = (data * 10000).astype(np.uint16)
    raster = write_raster(tmp_path / "r.tif", data.astype(np.float32) if units == "float 0..1" else data)
    code, err = run_cli(capsys, model, raster, "--out", tmp_path / "t.gpkg")
    assert code == 2, err
    assert "--scale" in err and "raster band 1" in err and "trained on values around 100" in err
    assert not (tmp_path / "t.gpkg").exists()
    if units == "float 0..1":
        assert "--scale 255" in err


def test_scale_makes_a_0_1_raster_classify_like_its_8_bit_original(model, tmp_path):
    data = rgb(4 * T, 4 * T)
    ref = classify(model, write_raster(tmp_path / "u8.tif", data), tmp_path / "u8.gpkg")
    unit = write_raster(tmp_path / "unit.tif", (data / np.float32(255)).astype(np.float32))
    events, seen = _quiet_events()
    res = classify(model, unit, tmp_path / "unit.gpkg", scale=255, events=events)
    assert res.tiles_classified == ref.tiles_classified == 16 and not seen
    a, b = fields(tmp_path / "u8.gpkg"), fields(tmp_path / "unit.gpkg")
    np.testing.assert_array_equal(a["class_id"], b["class_id"])
    np.testing.assert_allclose(a["confidence"], b["confidence"], atol=1e-4)
    with pytest.raises(ConfigError, match="--scale"):
        classify(model, unit, tmp_path / "x.gpkg", scale=0)


def test_8_bit_values_as_float_are_accepted_and_a_doubtful_raster_warns(model, tmp_path):
    events, seen = _quiet_events()
    data = rgb(4 * T, 4 * T).astype(np.float32)
    assert classify(model, write_raster(tmp_path / "f.tif", data), tmp_path / "f.gpkg", events=events).tiles_classified
    assert not seen
    bright = np.full((3, 4 * T, 4 * T), 255, np.uint8)  # saturated: over 3 std from the training mean
    classify(model, write_raster(tmp_path / "d.tif", bright), tmp_path / "d.gpkg", events=events)
    assert any("--scale" in w and "raster band 1" in w for w in seen), seen


# -- 7. geographic rasters across the antimeridian -----------------------------------------------
@pytest.fixture
def antimeridian(tmp_path) -> Path:
    """0.2 x 0.2 degrees of EPSG:4326 centred on 180 degrees east (179.9 .. 180.1)."""
    return write_raster(tmp_path / "am.tif", rgb(200, 200, seed=4), crs="EPSG:4326",
                        transform=from_origin(179.9, 0.1, 0.001, 0.001))


def test_a_geographic_raster_past_180_degrees_is_classified_on_the_pixel_grid(tmp_path, antimeridian):
    coarse = make_model(tmp_path / "coarse.onnx", meta={"gsd": 250.0})
    res = classify(coarse, antimeridian, tmp_path / "t.gpkg")
    assert res.tiles_classified > 0
    # 0.2 x 0.2 degrees at the equator: about 49,300 ha, all of it classified (edge tiles aside)
    hectares = sum(row["hectares"] for row in res.class_areas)
    assert hectares > 0.85 * 49_300, (hectares, res.tiles_classified, res.tiles_skipped)
    assert res.tiles_skipped <= 2 * 12 + 1  # at most the partly covered tiles of two edges


def test_a_geographic_raster_past_180_degrees_is_classified_on_the_xyz_grid(model, tmp_path, antimeridian):
    from asymkd.classify.grid import MERCATOR_HALF
    res = classify(model, antimeridian, tmp_path / "x.gpkg", xyz_zoom=12)
    f = fields(tmp_path / "x.gpkg")
    # zoom-12 tiles are 0.088 degrees wide: 2 x 2 of them lie wholly inside the raster, two west of
    # 180 degrees (x 4095) and two east of it (x 0, the world's first column)
    assert set(zip(f["x"].tolist(), f["y"].tolist(), strict=True)) == {(4095, 2047), (4095, 2048), (0, 2047),
                                                                      (0, 2048)}
    assert res.tiles_classified == 4 and set(f["tile_key"]) >= {"12/0/2047", "12/4095/2048"}
    _, _, wkb, _ = pyogrio.raw.read(str(tmp_path / "x.gpkg"), layer="tiles")
    import shapely
    minx = shapely.bounds(shapely.from_wkb(wkb))[:, 0]
    east = f["x"] == 0
    np.testing.assert_allclose(minx[east], -MERCATOR_HALF)  # drawn where x=0 is, at the west edge of the map
    assert (minx[~east] > MERCATOR_HALF * 0.99).all()
