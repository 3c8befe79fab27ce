"""The step specs shared by the dock and Processing: the engine's choices offered in both
forms, and checking or preparing a Processing run writes nothing (the run's worker exports)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from qgis.core import (
    QgsApplication,
    QgsFeatureRequest,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
)

from asymkd_qgis import choices, steps
from conftest import FAKE_ENGINE_SOURCE


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.fixture
def engine_choices(real_engine):
    return choices.engine_choices(real_engine, refresh=True)


# -- the engine's choices -------------------------------------------------------------------
def test_choices_come_from_the_engine_once_per_session(real_engine, monkeypatch):
    found = choices.engine_choices(real_engine, refresh=True)
    assert not found.fallback
    assert found.backbones["efficientnet_lite0"]["source"] == "bundled"
    assert found.backbones["resnet18_w32"]["source"] == "scratch"
    assert "balanced" in found.names("pairing.method") and "coral" in found.names("distill.domain_loss")
    assert found.default("distill", "input_size") is not None
    calls = []
    monkeypatch.setattr(choices, "run_engine", lambda *a, **k: calls.append(a))
    assert choices.engine_choices(real_engine) is found and not calls  # cached
    assert choices.cached() is found


def test_without_an_engine_the_forms_fall_back_to_names_only(dock, tmp_path):
    from asymkd_qgis.engine import Engine
    found = choices.engine_choices(Engine(python=tmp_path / "none" / "python"))
    assert found is choices.FALLBACK and found.fallback
    assert "efficientnet_lite0" in found.backbones
    dock.apply_choices(found)
    picker = dock.forms["teacher"].model
    picker.backbone.setCurrentText("efficientnet_lite0")
    assert picker.source.text() == "Weights: built-in list of names (the engine could not be asked)"


def test_the_dock_offers_the_engine_backbones_with_their_source(dock, engine_choices, tmp_path):
    dock.apply_choices(engine_choices)
    picker = dock.forms["teacher"].model
    names = [picker.backbone.itemText(i) for i in range(picker.backbone.count())]
    assert names == list(engine_choices.backbones)
    picker.backbone.setCurrentText("efficientnet_lite0")
    assert picker.source.text() == "Weights: bundled ImageNet weights"
    picker.backbone.setCurrentText("convnext_tiny")
    assert "timm hub" in picker.source.text()
    picker.pretrained.setChecked(False)
    assert picker.source.text() == "Weights: from scratch"
    dock.forms["teacher"].settings.setText("teacher.weights=/data/w.safetensors")
    assert picker.source.text() == "Weights: weights file"
    # the dock's own copy of the names is gone: the combos hold what the engine says
    method, loss = dock.forms["matcher"].pair_method, dock.forms["distill"].domain_loss
    methods = [method.itemText(i) for i in range(method.count())]
    assert methods == list(engine_choices.names("pairing.method"))
    losses = [loss.itemData(i) for i in range(loss.count())]
    assert losses == [""] + list(engine_choices.names("distill.domain_loss"))


def test_backbone_input_size_and_pretrained_reach_the_engine(dock, engine_choices, tmp_path):
    dock.apply_choices(engine_choices)
    (tmp_path / "ms").mkdir()
    run = tmp_path / "run"
    dock.run_dir.setFilePath(str(run))
    dock.forms["data"].ms_source.set_folder(str(tmp_path / "ms"))
    teacher, distill = dock.forms["teacher"], dock.forms["distill"]
    teacher.model.backbone.setCurrentText("resnet18_w32")
    teacher.model.pretrained.setChecked(False)
    teacher.input_size.setValue(0)
    args = dock.prepare("teacher").commands[0].args
    assert _value(args, "--backbone") == "resnet18_w32" and _value(args, "--input-size") == "0"
    assert "--no-pretrained" in args
    teacher.model.backbone.setCurrentText("")
    teacher.model.pretrained.setChecked(True)
    teacher.input_size.setValue(-1)
    args = dock.prepare("teacher").commands[0].args
    assert not {"--backbone", "--input-size", "--no-pretrained"} & set(args)  # the engine's defaults
    (run / "pairs").mkdir(parents=True)
    distill.model.backbone.setCurrentText("efficientnet_lite0")
    distill.input_size.setValue(128)
    distill.domain_loss.setCurrentIndex(distill.domain_loss.findData("mmd"))
    args = dock.prepare("distill").commands[0].args
    assert _value(args, "--backbone") == "efficientnet_lite0" and _value(args, "--input-size") == "128"
    assert _value(args, "--domain-loss") == "mmd"


def test_processing_offers_the_backbones_with_their_source(plugin, qgis_processing, engine_choices):
    algorithm = QgsApplication.processingRegistry().createAlgorithmById("asymkd:distill")
    description = algorithm.parameterDefinition("BACKBONE").description()
    assert "efficientnet_lite0 (bundled ImageNet weights)" in description
    assert "resnet18_w32 (from scratch)" in description and "timm hub" in description
    assert {"INPUT_SIZE", "PRETRAINED", "WEIGHTS"} <= {p.name() for p in algorithm.parameterDefinitions()}
    assert "bundled ImageNet weights" in algorithm.shortHelpString()


# -- Processing: checking and preparing write nothing ----------------------------------------
@pytest.fixture
def fake_processing_engine(monkeypatch):
    from asymkd_qgis import engine as engine_module
    monkeypatch.setenv("FAKE_ENGINE_MODE", "echo")
    monkeypatch.setattr(engine_module.Engine, "from_settings",
                        classmethod(lambda cls: cls(python=Path(sys.executable), source=FAKE_ENGINE_SOURCE,
                                                    required=("asymkd",))))


def _teacher_run(layers, tmp_path):
    memory = layers["labels"].materialize(QgsFeatureRequest())  # labels that are not a file
    memory.setName("memory labels")
    QgsProject.instance().addMapLayer(memory)
    algorithm = QgsApplication.processingRegistry().createAlgorithmById("asymkd:teacher")
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    run = tmp_path / "run"
    parameters = {"RUN": str(run), "MS_RASTER": layers["ms"], "MS_LABELS": memory, "MS_FIELD": "class",
                  "BACKBONE": "resnet18_w16", "INPUT_SIZE": 96, "PRETRAINED": False}
    return algorithm, context, parameters, run


def test_processing_checks_and_prepares_without_writing_and_exports_once_in_the_run(
        plugin, qgis_processing, layers, tmp_path, fake_processing_engine):
    algorithm, context, parameters, run = _teacher_run(layers, tmp_path)
    ok, message = algorithm.checkParameterValues(parameters, context)
    assert ok, message
    assert not run.exists(), "checking the parameters wrote files"
    feedback = QgsProcessingFeedback()
    assert algorithm.prepareAlgorithm(parameters, context, feedback)
    assert not run.exists(), "preparing (main thread) wrote files"
    results = algorithm.processAlgorithm(parameters, context, feedback)
    exported = run / "data" / "exports" / "memory_labels.gpkg"
    assert exported.is_file()
    assert results["TEACHER"] == str(run / "teacher")
    chips, teacher = [outcome.results for outcome in algorithm.last_outcomes]
    chips_args = [chips[str(i)] for i in range(len(chips))]
    assert _value(chips_args, "--labels") == str(exported)
    teacher_args = [teacher[str(i)] for i in range(len(teacher))]
    assert _value(teacher_args, "--backbone") == "resnet18_w16" and _value(teacher_args, "--input-size") == "96"
    assert "--no-pretrained" in teacher_args


def test_processing_cancel_stops_before_the_export(plugin, qgis_processing, layers, tmp_path, fake_processing_engine):
    algorithm, context, parameters, run = _teacher_run(layers, tmp_path)
    feedback = QgsProcessingFeedback()
    assert algorithm.prepareAlgorithm(parameters, context, feedback)
    feedback.cancel()
    with pytest.raises(QgsProcessingException, match="Cancelled"):
        algorithm.processAlgorithm(parameters, context, feedback)
    assert not (run / "data" / "exports").exists()


def test_one_spec_per_step_names_what_a_step_needs():
    from asymkd_qgis.layout import RunLayout
    from asymkd_qgis.validation import InputError
    with pytest.raises(InputError, match="no pairs in this run folder"):
        steps.require_previous(RunLayout(Path("/nonexistent/run")), "distill")
    assert steps.SPECS["distill"].outputs(RunLayout(Path("R")))["REPORT"] == Path("R") / "report.html"


# -- the event protocol, seen from the forms --------------------------------------------------
def test_the_dock_refuses_an_engine_of_another_protocol(dock, fake_engine, tmp_path, monkeypatch):
    from conftest import wait_for
    monkeypatch.setenv("FAKE_ENGINE_PROTOCOL", "2.0")
    (tmp_path / "ms").mkdir()
    dock.run_dir.setFilePath(str(tmp_path / "run"))
    dock.forms["data"].ms_source.set_folder(str(tmp_path / "ms"))
    dock.engine_factory = lambda: fake_engine("ok")
    job = dock.run_step("teacher")
    wait_for(lambda: job.done, 30, "the job")
    assert job.state == job.FAILED and job.engine_unavailable
    assert "needs AsymKD engine" in job.message()
    assert "needs AsymKD engine" in dock.panels["teacher"].status.text()


def test_processing_refuses_an_engine_of_another_protocol(plugin, qgis_processing, tmp_path,
                                                          fake_processing_engine, monkeypatch):
    import processing
    monkeypatch.setenv("FAKE_ENGINE_PROTOCOL", "2.0")
    model = tmp_path / "student"
    model.mkdir()
    (model / "meta.json").write_text("{}")
    with pytest.raises(QgsProcessingException, match="needs AsymKD engine"):
        processing.run("asymkd:export", {"MODEL": str(model), "OUTPUT": str(tmp_path / "m.onnx")})
