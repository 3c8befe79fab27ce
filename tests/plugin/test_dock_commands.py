"""The engine command lines the dock builds from its widgets (no engine run needed)."""

from __future__ import annotations

import pytest
from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer, QgsRectangle, QgsVectorLayer
from qgis.PyQt.QtCore import Qt

import mapdata
from asymkd_qgis.validation import InputError


def _value(args: list[str], flag: str) -> str:
    joined = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    return joined[0] if joined else args[args.index(flag) + 1]


@pytest.fixture
def classify_ready(dock, layers, tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    dock.model_file.setFilePath(str(model))
    dock.run_dir.setFilePath(str(tmp_path / "run"))
    dock.classify_layer.setLayer(layers["rgb"])
    return dock


def test_classify_selected_polygons_become_a_mask(classify_ready, layers):
    dock = classify_ready
    labels = layers["labels"]
    dock.area.setCurrentText("Selected polygons")
    dock.mask_layer.setLayer(labels)
    with pytest.raises(InputError, match="No polygons are selected in 'labels'"):
        dock.prepare_classify()
    labels.selectByIds([f.id() for f in labels.getFeatures()][:2])
    prepared = dock.prepare_classify()
    args = prepared.commands[-1].args
    # the selection is written by the job (its worker thread), not while preparing
    from pathlib import Path

    from qgis.core import QgsFeedback
    assert not Path(_value(args, "--mask")).exists()
    for step in prepared.pre_steps:
        step.run(QgsFeedback())
    mask = QgsVectorLayer(_value(args, "--mask"), "mask", "ogr")
    assert mask.featureCount() == 2
    assert not any(a.startswith("--bbox") for a in args)


def test_classify_canvas_extent_becomes_a_bbox(classify_ready, qgis_iface):
    dock = classify_ready
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem(f"EPSG:{mapdata.EPSG}"))
    canvas.setExtent(QgsRectangle(500100, 5199500, 500400, 5199900))
    dock.area.setCurrentText("Canvas extent")
    args = dock.prepare_classify().commands[-1].args
    bbox = [float(v) for v in _value(args, "--bbox").split(",")]
    extent = canvas.extent()
    assert bbox == pytest.approx([extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()])
    assert _value(args, "--bbox-crs") == f"EPSG:{mapdata.EPSG}"


def test_classify_grids_bands_and_batch(classify_ready, tmp_path):
    dock = classify_ready
    dock.tile.setValue(64)
    dock.stride.setValue(32)
    dock.batch_size.setValue(16)
    dock.classify_bands.setText("3, 2, 1")
    args = dock.prepare_classify().commands[-1].args
    assert args[:3] == ["classify", str(tmp_path / "model.onnx"), dock.classify_layer.currentLayer().source()]
    assert (_value(args, "--tile"), _value(args, "--stride"), _value(args, "--batch-size")) == ("64", "32", "16")
    assert _value(args, "--bands") == "3,2,1"
    assert "--device" not in args  # auto: the engine picks CUDA when onnxruntime has it
    dock.classify_device.setCurrentText("cpu")
    assert _value(dock.prepare_classify().commands[-1].args, "--device") == "cpu"
    dock.grid.setCurrentIndex(1)
    dock.zoom.setValue(17)
    args = dock.prepare_classify().commands[-1].args
    assert _value(args, "--xyz-zoom") == "17" and "--tile" not in args


def test_classify_the_run_student_exports_it_first(dock, layers, tmp_path):
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / "model.safetensors").write_bytes(b"")
    (run / "student" / "meta.json").write_text('{"patch_size": 64, "gsd": 10}')
    dock.run_dir.setFilePath(str(run))
    dock.classify_layer.setLayer(layers["rgb"])
    export, classify = dock.prepare_classify().commands
    assert export.args == ["export", str(run / "student"), "--out", str(run / "student.onnx"), "--overwrite"]
    assert classify.args[1] == str(run / "student.onnx")
    dock.run_dir.setFilePath(str(tmp_path / "empty run"))
    with pytest.raises(InputError, match="no student model in this run folder"):
        dock.prepare_classify()


def test_classify_a_web_layer_exports_it_for_the_area(classify_ready, tmp_path, qgis_iface):
    dock = classify_ready
    uri, (minx, miny, maxx, maxy) = mapdata.write_xyz_tiles(tmp_path / "tiles")
    xyz = QgsRasterLayer(uri, "web map", "wms")
    from qgis.core import QgsProject
    QgsProject.instance().addMapLayer(xyz)
    dock.classify_layer.setLayer(xyz)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    canvas.setExtent(QgsRectangle(minx + 100, maxy - 400, minx + 500, maxy - 100))
    dock.area.setCurrentText("Canvas extent")
    prepared = dock.prepare_classify()
    raster = prepared.commands[-1].args[2]
    assert raster.startswith(str(tmp_path / "run" / "data" / "exports"))
    # the export runs in the job's worker thread, before the engine: not while preparing
    from pathlib import Path

    from qgis.core import QgsFeedback
    assert not Path(raster).exists()
    [export] = prepared.pre_steps
    assert export.run(QgsFeedback()) == raster
    exported = QgsRasterLayer(raster, "exported", "gdal")
    assert exported.bandCount() == 4 and exported.crs().authid() == "EPSG:3857"


def test_data_step_commands(dock, layers, tmp_path):
    run = tmp_path / "run"
    dock.run_dir.setFilePath(str(run))
    dock.ms_source.set_layer(layers["ms"])
    dock.ms_labels.set(layers["labels"], "class")
    dock.pair_raster.setLayer(layers["rgb"])
    dock.rgb_source.set_folder(str(tmp_path))
    dock.chip_size.setValue(32)
    dock.chip_resolution.setValue(20.0)
    [chips] = dock.prepare_data().commands
    args = chips.args
    assert args[0] == "chips" and _value(args, "--raster") == layers["ms"].source()
    assert _value(args, "--labels") == layers["labels"].source().split("|")[0]
    assert (_value(args, "--field"), _value(args, "--size"), _value(args, "--resolution")) == ("class", "32", "20")
    assert _value(args, "--out") == str(run / "data" / "ms")
    assert _value(args, "--pair-raster") == layers["rgb"].source()
    assert _value(args, "--pair-out") == str(run / "data" / "rgb_paired")
    # a layer of a multi-layer file: its layer name goes along
    named = QgsVectorLayer(f"{layers['labels'].source().split('|')[0]}|layername=labels", "named", "ogr")
    from qgis.core import QgsProject
    QgsProject.instance().addMapLayer(named)
    dock.ms_labels.set(named, "class")
    assert _value(dock.prepare_data().commands[0].args, "--layer") == "labels"


def test_training_step_commands(dock, tmp_path):
    run = tmp_path / "run"
    for folder in ("ms", "rgb"):
        (tmp_path / folder).mkdir()
    dock.run_dir.setFilePath(str(run))
    dock.ms_source.set_folder(str(tmp_path / "ms"))
    dock.rgb_source.set_folder(str(tmp_path / "rgb"))
    dock.teacher_epochs.setValue(5)
    dock.teacher_settings.setText("teacher.folds=0 teacher.lr=0.01")
    dock.device.setCurrentText("cpu")
    args = dock.prepare_teacher().commands[0].args
    assert args[:5] == ["teacher", "--run", str(run), "--ms", str(tmp_path / "ms")]
    assert _value(args, "--epochs") == "5" and _value(args, "--device") == "cpu"
    assert args[args.index("--set") + 1:] == ["teacher.folds=0", "teacher.lr=0.01"]
    with pytest.raises(InputError, match="no teacher in this run folder"):
        dock.prepare_matcher()
    (run / "teacher").mkdir(parents=True)
    matcher, pair = dock.prepare_matcher().commands
    assert matcher.args[:3] == ["matcher", "--run", str(run)] and "--rgb-paired" not in matcher.args
    assert _value(pair.args, "--rgb") == str(tmp_path / "rgb") and _value(pair.args, "--method") == "balanced"
    with pytest.raises(InputError, match="no pairs in this run folder"):
        dock.prepare_distill()
    (run / "pairs").mkdir()
    dock.w_feat.setValue(0.1)
    dock.baseline.setChecked(False)
    args = dock.prepare_distill().commands[0].args
    assert _value(args, "--w-feat") == "0.1" and "--w-gt" not in args and "--no-baseline" in args


def test_classify_marks_uncertain_tiles_when_asked(classify_ready):
    dock = classify_ready
    args = dock.prepare_classify().commands[-1].args
    assert "--uncertain-below" not in args and "--uncertain-by" not in args  # off by default
    assert not dock.uncertain_by.isEnabled()
    dock.uncertain_below.setValue(0.6)
    dock.uncertain_by.setCurrentIndex(dock.uncertain_by.findData("margin"))
    assert dock.uncertain_by.isEnabled()
    args = dock.prepare_classify().commands[-1].args
    assert (_value(args, "--uncertain-below"), _value(args, "--uncertain-by")) == ("0.6", "margin")


def test_the_certainty_measures_come_from_the_engine(dock):
    from asymkd_qgis import choices
    report = {"backbones": {"resnet18_w32": {"source": "bundled"}},
              "classify": {"uncertain_by": {"margin": "best minus second", "confidence": "best"}}}
    dock.apply_choices(choices.from_report(report))
    assert [dock.uncertain_by.itemData(i) for i in range(dock.uncertain_by.count())] == ["margin", "confidence"]
    assert dock.uncertain_by.itemData(0, Qt.ItemDataRole.ToolTipRole) == "best minus second"


def test_classify_merges_regions_when_asked(classify_ready):
    dock = classify_ready
    assert "--regions" not in dock.prepare_classify().commands[-1].args and not dock.min_region.isEnabled()
    dock.regions.setChecked(True)
    args = dock.prepare_classify().commands[-1].args
    assert "--regions" in args and "--min-region-ha" not in args  # the engine's default
    dock.min_region.setValue(2.5)
    assert _value(dock.prepare_classify().commands[-1].args, "--min-region-ha") == "2.5"
