"""The engine command lines the dock builds from its widgets (no engine run needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
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
    form = dock.forms["classify"]
    form.model_file.setFilePath(str(model))
    dock.run_dir.setFilePath(str(tmp_path / "run"))
    form.layer.setLayer(layers["rgb"])
    return dock


def _classify_args(dock) -> list[str]:
    return dock.prepare("classify").commands[-1].args


def test_classify_selected_polygons_become_a_mask(classify_ready, layers):
    dock = classify_ready
    labels = layers["labels"]
    dock.forms["classify"].area.setCurrentText("Selected polygons")
    dock.forms["classify"].mask_layer.setLayer(labels)
    with pytest.raises(InputError, match="No polygons are selected in 'labels'"):
        dock.prepare("classify")
    labels.selectByIds([f.id() for f in labels.getFeatures()][:2])
    prepared = dock.prepare("classify")
    args = prepared.commands[-1].args
    # the selection is written by the job (its worker thread), not while preparing
    assert not Path(_value(args, "--mask")).exists()
    for step in prepared.pre_steps:
        step.run(QgsFeedback())
    mask = QgsVectorLayer(f"{_value(args, '--mask')}|layername={_value(args, '--mask-layer')}", "mask", "ogr")
    assert mask.featureCount() == 2
    assert not any(a.startswith("--bbox") for a in args)


def test_classify_canvas_extent_becomes_a_bbox(classify_ready, qgis_iface):
    dock = classify_ready
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem(f"EPSG:{mapdata.EPSG}"))
    canvas.setExtent(QgsRectangle(500100, 5199500, 500400, 5199900))
    dock.forms["classify"].area.setCurrentText("Canvas extent")
    args = _classify_args(dock)
    bbox = [float(v) for v in _value(args, "--bbox").split(",")]
    extent = canvas.extent()
    assert bbox == pytest.approx([extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()])
    assert _value(args, "--bbox-crs") == f"EPSG:{mapdata.EPSG}"


def test_classify_sends_only_what_was_set(classify_ready):
    """Boxes at "default" leave the engine's own defaults (asymkd.classify.ClassifyOptions)."""
    args = _classify_args(classify_ready)
    assert not {"--tile", "--stride", "--batch-size", "--device", "--bands", "--uncertain-below", "--regions",
                "--min-region-ha", "--xyz-zoom"} & set(args)
    assert "--overwrite" in args  # the step's own output in the run folder is replaced on a rerun


def test_classify_grids_bands_and_batch(classify_ready, tmp_path):
    dock = classify_ready
    form = dock.forms["classify"]
    form.tile.setValue(64)
    form.stride.setValue(32)
    form.batch_size.setValue(16)
    form.bands.setText("3, 2, 1")
    args = _classify_args(dock)
    assert args[:3] == ["classify", str(tmp_path / "model.onnx"), form.layer.currentLayer().source()]
    assert (_value(args, "--tile"), _value(args, "--stride"), _value(args, "--batch-size")) == ("64", "32", "16")
    assert _value(args, "--bands") == "3,2,1"
    assert "--device" not in args  # auto: the engine picks CUDA when onnxruntime has it
    form.device.setCurrentText("cpu")
    assert _value(_classify_args(dock), "--device") == "cpu"
    form.grid.setCurrentIndex(1)
    form.zoom.setValue(17)
    args = _classify_args(dock)
    assert _value(args, "--xyz-zoom") == "17" and "--tile" not in args and "--stride" not in args


def _student(run: Path) -> Path:
    (run / "student").mkdir(parents=True)
    (run / "student" / "model.safetensors").write_bytes(b"")
    (run / "student" / "meta.json").write_text('{"patch_size": 64, "gsd": 10}')
    return run


def test_classify_the_run_student_exports_it_first(dock, layers, tmp_path):
    run = _student(tmp_path / "run")
    dock.run_dir.setFilePath(str(run))
    dock.forms["classify"].layer.setLayer(layers["rgb"])
    export, classify = dock.prepare("classify").commands
    assert export.args == ["export", str(run / "student"), "--out", str(run / "student.onnx"), "--overwrite"]
    assert classify.args[1] == str(run / "student.onnx")
    (run / "student.onnx").write_bytes(b"")  # newer than the student: used as it is
    assert [c.args[0] for c in dock.prepare("classify").commands] == ["classify"]
    dock.run_dir.setFilePath(str(tmp_path / "empty run"))
    with pytest.raises(InputError, match="no student model in this run folder"):
        dock.prepare("classify")


def test_processing_classify_shares_the_area_and_the_student_export(plugin, qgis_processing, layers, tmp_path):
    """Classify scene tiles builds its area and re-exports a stale run student as the dock does."""
    from qgis.core import QgsApplication, QgsProcessingContext, QgsProcessingFeedback, QgsProject
    run = _student(tmp_path / "run")
    (run / "student.onnx").write_bytes(b"")
    os.utime(run / "student.onnx", (1, 1))  # older than the student
    algorithm = QgsApplication.processingRegistry().createAlgorithmById("asymkd:classify")
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    extent = f"500100,500400,5199500,5199900 [EPSG:{mapdata.EPSG}]"
    parameters = {"MODEL": str(run / "student.onnx"), "INPUT": layers["rgb"], "EXTENT": extent,
                  "OUTPUT": str(tmp_path / "tiles.gpkg")}
    plan = algorithm.plan(parameters, context, QgsProcessingFeedback())
    export, classify = plan.prepared.commands
    assert export.args[:2] == ["export", str(run / "student")]
    bbox = [float(v) for v in _value(classify.args, "--bbox").split(",")]
    assert bbox == pytest.approx([500100, 5199500, 500400, 5199900])
    assert _value(classify.args, "--bbox-crs") == f"EPSG:{mapdata.EPSG}"
    assert "--batch-size" not in classify.args  # the engine's default


def test_classify_a_web_layer_exports_it_for_the_area(classify_ready, tmp_path, qgis_iface):
    dock = classify_ready
    uri, (minx, miny, maxx, maxy) = mapdata.write_xyz_tiles(tmp_path / "tiles")
    xyz = QgsRasterLayer(uri, "web map", "wms")
    QgsProject.instance().addMapLayer(xyz)
    dock.forms["classify"].layer.setLayer(xyz)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    canvas.setExtent(QgsRectangle(minx + 100, maxy - 400, minx + 500, maxy - 100))
    dock.forms["classify"].area.setCurrentText("Canvas extent")
    prepared = dock.prepare("classify")
    raster = prepared.commands[-1].args[2]
    assert raster.startswith(str(tmp_path / "run" / "data" / "exports"))
    # the export runs in the job's worker thread, before the engine: not while preparing
    assert not Path(raster).exists()
    [export] = prepared.pre_steps
    assert export.run(QgsFeedback()) == raster
    exported = QgsRasterLayer(raster, "exported", "gdal")
    assert exported.bandCount() == 4 and exported.crs().authid() == "EPSG:3857"


def test_data_step_commands(dock, layers, tmp_path):
    run = tmp_path / "run"
    data = dock.forms["data"]
    dock.run_dir.setFilePath(str(run))
    data.ms_source.set_layer(layers["ms"])
    data.ms_labels.set(layers["labels"], "class")
    data.pair_raster.setLayer(layers["rgb"])
    data.rgb_source.set_folder(str(tmp_path))
    data.chip_size.setValue(32)
    data.chip_resolution.setValue(20.0)
    [chips] = dock.prepare("data").commands
    args = chips.args
    assert args[0] == "chips" and _value(args, "--raster") == layers["ms"].source()
    assert _value(args, "--labels") == layers["labels"].source().split("|")[0]
    assert (_value(args, "--field"), _value(args, "--size"), _value(args, "--resolution")) == ("class", "32", "20")
    assert _value(args, "--out") == str(run / "data" / "ms")
    assert _value(args, "--pair-raster") == layers["rgb"].source()
    assert _value(args, "--pair-out") == str(run / "data" / "rgb_paired")
    # a layer of a multi-layer file: its layer name goes along
    named = QgsVectorLayer(f"{layers['labels'].source().split('|')[0]}|layername=labels", "named", "ogr")
    QgsProject.instance().addMapLayer(named)
    data.ms_labels.set(named, "class")
    assert _value(dock.prepare("data").commands[0].args, "--layer") == "labels"


def test_training_step_commands(dock, tmp_path):
    run = tmp_path / "run"
    for folder in ("ms", "rgb"):
        (tmp_path / folder).mkdir()
    dock.run_dir.setFilePath(str(run))
    dock.forms["data"].ms_source.set_folder(str(tmp_path / "ms"))
    dock.forms["data"].rgb_source.set_folder(str(tmp_path / "rgb"))
    teacher = dock.forms["teacher"]
    teacher.epochs.setValue(5)
    teacher.settings.setText("teacher.folds=0 teacher.lr=0.01")
    teacher.device.setCurrentText("cpu")
    args = dock.prepare("teacher").commands[0].args
    assert args[:5] == ["teacher", "--run", str(run), "--ms", str(tmp_path / "ms")]
    assert _value(args, "--epochs") == "5" and _value(args, "--device") == "cpu"
    assert args[args.index("--set") + 1:] == ["teacher.folds=0", "teacher.lr=0.01"]
    with pytest.raises(InputError, match="no teacher in this run folder"):
        dock.prepare("matcher")
    (run / "teacher").mkdir(parents=True)
    matcher, pair = dock.prepare("matcher").commands
    assert matcher.args[:3] == ["matcher", "--run", str(run)] and "--rgb-paired" not in matcher.args
    assert _value(pair.args, "--rgb") == str(tmp_path / "rgb") and _value(pair.args, "--method") == "balanced"
    with pytest.raises(InputError, match="no pairs in this run folder"):
        dock.prepare("distill")
    (run / "pairs").mkdir()
    dock.forms["distill"].w_feat.setValue(0.1)
    dock.forms["distill"].baseline.setChecked(False)
    args = dock.prepare("distill").commands[0].args
    assert _value(args, "--w-feat") == "0.1" and "--w-gt" not in args and "--no-baseline" in args


def test_classify_marks_uncertain_tiles_when_asked(classify_ready):
    dock = classify_ready
    form = dock.forms["classify"]
    args = _classify_args(dock)
    assert "--uncertain-below" not in args and "--uncertain-by" not in args  # off by default
    assert not form.uncertain_by.isEnabled()
    form.uncertain_below.setValue(0.6)
    form.uncertain_by.setCurrentIndex(form.uncertain_by.findData("margin"))
    assert form.uncertain_by.isEnabled()
    args = _classify_args(dock)
    assert (_value(args, "--uncertain-below"), _value(args, "--uncertain-by")) == ("0.6", "margin")


def test_the_certainty_measures_come_from_the_engine(dock):
    from asymkd_qgis import choices
    report = {"backbones": {"resnet18_w32": {"source": "bundled"}},
              "classify": {"uncertain_by": {"margin": "best minus second", "confidence": "best"}}}
    dock.apply_choices(choices.from_report(report))
    measures = dock.forms["classify"].uncertain_by
    assert [measures.itemData(i) for i in range(measures.count())] == ["margin", "confidence"]
    assert measures.itemData(0, Qt.ItemDataRole.ToolTipRole) == "best minus second"


def test_the_batch_size_box_shows_the_engine_default(dock):
    from asymkd_qgis import choices
    batch = dock.forms["classify"].batch_size
    assert batch.value() == batch.minimum() and batch.specialValueText() == "default"
    report = {"backbones": {"resnet18_w32": {"source": "bundled"}},
              "settings": {"classify.batch_size": {"default": 64, "type": "int"}}}
    dock.apply_choices(choices.from_report(report))
    assert batch.specialValueText() == "default (64)"


def test_classify_merges_regions_when_asked(classify_ready):
    dock = classify_ready
    form = dock.forms["classify"]
    assert "--regions" not in _classify_args(dock) and not form.min_region.isEnabled()
    form.regions.setChecked(True)
    args = _classify_args(dock)
    assert "--regions" in args and "--min-region-ha" not in args  # the engine's default
    form.min_region.setValue(2.5)
    assert _value(_classify_args(dock), "--min-region-ha") == "2.5"
