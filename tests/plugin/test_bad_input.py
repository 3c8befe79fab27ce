"""Every bad input of the issue gets a clear message in QGIS, from the dock and from Processing."""

from __future__ import annotations

import sys

import pytest
from qgis.core import QgsProcessingException
from qgis.PyQt.QtWidgets import QPushButton

from conftest import FAKE_ENGINE_SOURCE, wait_for


def _refused(dock, step: str) -> str:
    """Run a step that must not start; return the message shown in the message bar."""
    before = len(dock.notifier.history)
    assert dock.run_step(step) is None
    assert len(dock.notifier.history) == before + 1
    notice = dock.notifier.last
    assert notice.level_name == "critical"
    assert dock.panels[step].status.text() in notice.text
    return notice.text


def _ms_ready(dock, layers, labels="labels"):
    data = dock.forms["data"]
    data.ms_source.set_layer(layers["ms"])
    data.ms_labels.set(layers[labels], "class")
    data.rgb_source.set_layer(layers["rgb"])
    data.rgb_labels.set(layers["labels"], "class")


# -- dock ------------------------------------------------------------------------------
def test_no_layer_chosen(dock, layers):
    assert "No multispectral (MS) raster layer chosen" in _refused(dock, "data")
    _ms_ready(dock, layers)
    data = dock.forms["data"]
    data.rgb_source.set_layer(None)
    assert "No RGB raster layer chosen" in _refused(dock, "data")
    assert "No raster layer to classify chosen" in _refused(dock, "classify")
    data.ms_labels.set(None)
    data.rgb_source.set_layer(layers["rgb"])
    assert "No label layer chosen" in _refused(dock, "data")


def test_ms_layer_with_three_bands_or_fewer(dock, layers):
    _ms_ready(dock, layers)
    dock.forms["data"].ms_source.set_layer(layers["rgb"])
    text = _refused(dock, "data")
    assert "has 3 band(s)" in text and "more than 3 bands" in text


def test_rgb_layer_with_fewer_than_three_bands(dock, layers):
    _ms_ready(dock, layers)
    dock.forms["data"].rgb_source.set_layer(layers["gray"])
    assert "The RGB raster layer 'gray' has 1 band(s)" in _refused(dock, "data")
    dock.forms["data"].rgb_source.set_layer(layers["rgb"])
    dock.forms["classify"].layer.setLayer(layers["gray"])
    assert "has 1 band(s)" in _refused(dock, "classify")


def test_label_field_with_one_class(dock, layers):
    _ms_ready(dock, layers, labels="one_class")
    text = _refused(dock, "data")
    assert "has 1 class (Forest)" in text and "at least 2" in text


def test_label_layer_with_no_features_over_the_raster(dock, layers):
    _ms_ready(dock, layers, labels="elsewhere")
    assert "has no features over the raster 'ms'" in _refused(dock, "data")


def test_engine_environment_missing_offers_to_create_it(dock, layers, monkeypatch, tmp_path, qgis_iface):
    monkeypatch.setenv("ASYMKD_ENGINE_PYTHON", str(tmp_path / "no-env" / "bin" / "python"))
    _ms_ready(dock, layers)
    text = _refused(dock, "data")
    assert "engine environment is missing" in text
    assert "Create engine environment" in dock.notifier.last.actions
    bar = qgis_iface.messageBar()
    item = bar.currentItem()
    assert item is not None and "missing" in item.text()
    assert "Create engine environment" in [b.text() for b in item.findChildren(QPushButton)]


def test_engine_environment_broken_offers_to_create_it(dock, layers, monkeypatch, tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'error while loading shared libraries: libpython3.11.so' >&2\nexit 127\n")
    broken.chmod(0o755)
    monkeypatch.setenv("ASYMKD_ENGINE_PYTHON", str(broken))
    _ms_ready(dock, layers)
    text = _refused(dock, "data")
    assert "engine environment is broken" in text and "libpython3.11.so" in text
    assert "Create engine environment" in dock.notifier.last.actions


def test_engine_missing_a_package_at_run_time_offers_to_create_it(dock, layers, fake_engine):
    dock.engine_factory = lambda: fake_engine("nomodule")
    _ms_ready(dock, layers)
    job = dock.run_step("data")
    wait_for(lambda: job.done, 30, "job end")
    assert job.state == job.FAILED
    assert "No module named 'torch'" in dock.notifier.last.text
    assert "Create engine environment" in dock.notifier.last.actions


def test_bad_extra_settings(dock, tmp_path):
    (tmp_path / "ms").mkdir()
    dock.forms["data"].ms_source.set_folder(str(tmp_path / "ms"))
    dock.forms["teacher"].settings.setText("teacher.folds 0")
    assert "is not KEY=VALUE" in _refused(dock, "teacher")


# -- Processing ------------------------------------------------------------------------
def _processing_error(algorithm: str, parameters: dict) -> str:
    import processing
    with pytest.raises(QgsProcessingException) as info:
        processing.run(f"asymkd:{algorithm}", parameters)
    return str(info.value)


@pytest.fixture
def proc(plugin, qgis_processing):
    return plugin


def test_processing_bad_inputs(proc, layers, tmp_path):
    run = str(tmp_path / "run")
    base = {"RUN": run, "MS_RASTER": layers["ms"], "MS_LABELS": layers["labels"], "MS_FIELD": "class"}
    assert "No MS layer chosen" in _processing_error("teacher", {"RUN": run})
    assert "has 3 band(s)" in _processing_error("teacher", {**base, "MS_RASTER": layers["rgb"]})
    assert "has 1 class (Forest)" in _processing_error("teacher", {**base, "MS_LABELS": layers["one_class"]})
    assert "no features over the raster" in _processing_error("teacher", {**base, "MS_LABELS": layers["elsewhere"]})
    error = _processing_error("teacher", {**base, "PAIRED_RGB": layers["gray"]})
    assert "The co-registered RGB layer 'gray' has 1 band(s)" in error
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    out = str(tmp_path / "out.gpkg")
    assert "has 1 band(s)" in _processing_error("classify",
                                                {"MODEL": str(model), "INPUT": layers["gray"], "OUTPUT": out})
    (tmp_path / "run" / "teacher").mkdir(parents=True)
    assert "No RGB layer chosen" in _processing_error("matcher", {"RUN": run})


def test_processing_engine_missing(proc, layers, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYMKD_ENGINE_PYTHON", str(tmp_path / "no-env" / "bin" / "python"))
    text = _processing_error("teacher", {"RUN": str(tmp_path / "run"), "MS_RASTER": layers["ms"],
                                         "MS_LABELS": layers["labels"], "MS_FIELD": "class"})
    assert "engine environment is missing" in text and "Create engine environment" in text


def test_processing_engine_crash_shows_its_last_error(proc, tmp_path, monkeypatch):
    from asymkd_qgis import engine as engine_module
    monkeypatch.setenv("FAKE_ENGINE_MODE", "error")
    monkeypatch.setattr(engine_module.Engine, "from_settings",
                        classmethod(lambda cls: cls(python=__import__("pathlib").Path(sys.executable),
                                                    source=FAKE_ENGINE_SOURCE,
                                                    required=("asymkd",))))
    model = tmp_path / "student"
    model.mkdir()
    (model / "meta.json").write_text("{}")
    text = _processing_error("export", {"MODEL": str(model), "OUTPUT": str(tmp_path / "m.onnx")})
    assert "ValueError: fake engine bug in step export" in text
