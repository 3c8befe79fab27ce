"""The diagnostics view and the "Create engine environment" offer."""

from __future__ import annotations

from qgis.PyQt.QtWidgets import QMessageBox, QPushButton

from asymkd_qgis import settings
from conftest import process_alive, wait_for


def test_diagnostics_show_the_engine_doctor_report(plugin, real_engine):
    plugin.show_diagnostics()
    dialog = plugin.diagnostics
    job = dialog.job
    assert job is not None
    wait_for(lambda: job.done, 120, "asymkd doctor")
    rows = dialog.rows()
    assert dialog.report is not None, dialog.status.text()
    assert rows["engine Python"] == str(real_engine.python)
    assert rows["device used"].startswith(("cpu", "cuda"))
    assert rows["package torch"] and rows["package torch"] != "missing"
    assert "onnxruntime_providers" in rows and "CPUExecutionProvider" in rows["onnxruntime_providers"]
    assert "works" in dialog.status.text()


def test_diagnostics_with_a_missing_engine_say_what_to_do(plugin, monkeypatch, tmp_path):
    monkeypatch.setenv("ASYMKD_ENGINE_PYTHON", str(tmp_path / "none" / "python"))
    plugin.show_diagnostics()
    assert plugin.diagnostics.job is None
    assert "missing" in plugin.diagnostics.status.text()
    assert "Create engine environment" in plugin.diagnostics.status.text()


def test_diagnostics_of_a_partial_environment_say_it_is_broken(plugin, monkeypatch, tmp_path):
    """A doctor that answers is not enough: the engine's packages must be there."""
    import subprocess
    venv = tmp_path / "partial"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    monkeypatch.setenv("ASYMKD_ENGINE_PYTHON", str(venv / "bin" / "python"))
    plugin.show_diagnostics()
    job = plugin.diagnostics.job
    if job is not None:
        wait_for(lambda: job.done, 120, "asymkd doctor")
    text = plugin.diagnostics.status.text()
    assert "broken" in text and "numpy" in text and "works" not in text


def test_the_offer_to_create_the_environment_asks_first(plugin, dock, monkeypatch, tmp_path, qgis_iface):
    monkeypatch.setenv("ASYMKD_ENGINE_PYTHON", str(tmp_path / "none" / "python"))
    settings.put("engine/base_python", "/usr/bin/python3")
    settings.put("engine/nvidia_smi", str(tmp_path / "no-nvidia-smi"))
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda parent, title, text, *a: asked.append(text) or QMessageBox.No)
    (tmp_path / "ms").mkdir()
    dock.forms["data"].ms_source.set_folder(str(tmp_path / "ms"))
    assert dock.run_step("teacher") is None
    item = qgis_iface.messageBar().currentItem()
    [button] = [b for b in item.findChildren(QPushButton) if b.text() == "Create engine environment"]
    button.click()
    assert len(asked) == 1 and "CPU build" in asked[0] and "QGIS's own Python is not changed" in asked[0]
    assert plugin.builder is None  # answered No: nothing started


def test_unload_cancels_running_jobs(plugin, layers, tmp_path, fake_engine):
    dock = plugin.dock
    dock.engine_factory = lambda: fake_engine("stubborn")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    dock.forms["classify"].model_file.setFilePath(str(model))
    dock.run_dir.setFilePath(str(tmp_path / "run"))
    dock.forms["classify"].layer.setLayer(layers["rgb"])
    job = dock.run_step("classify")
    wait_for(lambda: job.pid is not None, 30, "engine start")
    plugin.unload()
    assert job.done and job.state == job.CANCELLED
    wait_for(lambda: not process_alive(job.pid), 5, "engine exit")
