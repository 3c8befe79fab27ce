"""Background jobs from the dock: progress, cancel, crash, and loading styled results."""

from __future__ import annotations

import json
import time

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsProject,
    QgsRendererCategory,
    QgsSymbol,
    QgsVectorLayer,
    QgsWkbTypes,
)

import mapdata
from conftest import process_alive, wait_for


def _classify_ready(dock, layers, tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read by the fake engine")
    dock.run_dir.setFilePath(str(tmp_path / "run"))
    form = dock.forms["classify"]
    form.layer.setLayer(layers["rgb"])
    form.model_file.setFilePath(str(model))


def _styled_result(tmp_path):
    """A GeoPackage of tiles with a categorized QML beside it, as the engine writes them."""
    gpkg = mapdata.write_labels(tmp_path / "result" / "tiles.gpkg",
                                [(0, 0, "Forest"), (0, 1, "River"), (1, 0, "Forest")], field="class_name")
    layer = QgsVectorLayer(str(gpkg), "tiles", "ogr")
    categories = [QgsRendererCategory(name, QgsSymbol.defaultSymbol(QgsWkbTypes.PolygonGeometry), name)
                  for name in ("Forest", "River")]
    layer.setRenderer(QgsCategorizedSymbolRenderer("class_name", categories))
    layer.saveNamedStyle(str(gpkg.with_suffix(".qml")))
    return gpkg


def test_cancel_stops_the_subprocess_within_5_seconds_and_adds_no_layer(dock, layers, tmp_path, fake_engine):
    dock.engine_factory = lambda: fake_engine("stubborn")  # ignores SIGTERM: the hard case
    _classify_ready(dock, layers, tmp_path)
    layer_count = len(QgsProject.instance().mapLayers())
    job = dock.run_step("classify")
    panel = dock.panels["classify"]
    assert job is not None and panel.cancel_button.isEnabled() and not panel.run_button.isEnabled()
    wait_for(lambda: job.pid is not None and panel.progress.value() >= 0 and "classify" in panel.status.text(),
             30, "first progress event")
    pid = job.pid
    assert process_alive(pid)
    start = time.monotonic()
    panel.cancel_button.click()
    wait_for(lambda: job.done, 10, "cancelled job")
    wait_for(lambda: not process_alive(pid), 10, "engine exit")
    stopped = time.monotonic() - start
    assert stopped < 5.0, f"the engine stopped only after {stopped:.1f} s"
    assert job.state == job.CANCELLED
    assert len(QgsProject.instance().mapLayers()) == layer_count
    assert dock.forms["classify"].loaded_layers == []
    assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()
    assert "cancelled" in dock.notifier.last.text


def test_engine_crash_shows_its_last_error_and_qgis_keeps_running(dock, layers, tmp_path, fake_engine, monkeypatch):
    _classify_ready(dock, layers, tmp_path)
    dock.engine_factory = lambda: fake_engine("crash")
    job = dock.run_step("classify")
    wait_for(lambda: job.done, 30, "crashed job")
    assert job.state == job.FAILED
    notice = dock.notifier.last
    assert notice.level_name == "critical"
    assert "RuntimeError: CUDA error: device-side assert triggered" in notice.text
    assert "Create engine environment" not in notice.actions  # a crash, not a broken environment
    assert "RuntimeError: CUDA error" in dock.panels["classify"].status.text()

    dock.engine_factory = lambda: fake_engine("error")
    job = dock.run_step("classify")
    wait_for(lambda: job.done, 30, "failed job")
    assert "ValueError: fake engine bug in step classify" in dock.notifier.last.text

    # QGIS and the plugin still work: the next job runs and loads its result
    result = _styled_result(tmp_path)
    dock.engine_factory = lambda: fake_engine("ok")
    monkeypatch.setenv("FAKE_ENGINE_RESULT", json.dumps({"gpkg": str(result)}))
    job = dock.run_step("classify")
    wait_for(lambda: job.done, 30, "job after the crash")
    assert job.state == job.OK and len(dock.forms["classify"].loaded_layers) == 1


def test_result_layer_is_loaded_with_its_style(dock, layers, tmp_path, fake_engine, monkeypatch):
    result = _styled_result(tmp_path)
    monkeypatch.setenv("FAKE_ENGINE_RESULT", json.dumps({"gpkg": str(result), "qml": str(result.with_suffix(".qml"))}))
    dock.engine_factory = lambda: fake_engine("ok")
    _classify_ready(dock, layers, tmp_path)
    job = dock.run_step("classify")
    progress = []
    job.progressChanged.connect(lambda percent, text: progress.append(percent))
    wait_for(lambda: job.done, 30, "job end")
    assert job.state == job.OK
    assert progress and max(progress) <= 100
    assert dock.panels["classify"].progress.value() == 100
    [layer] = dock.forms["classify"].loaded_layers
    assert QgsProject.instance().mapLayer(layer.id()) is layer
    assert layer.featureCount() == 3
    assert isinstance(layer.renderer(), QgsCategorizedSymbolRenderer)
    assert layer.renderer().classAttribute() == "class_name"
    assert "3 tiles" in dock.panels["classify"].results.text()
    # the command line the dock built
    args = job.commands[0].args
    assert args[:2] == ["classify", str(tmp_path / "model.onnx")]
    assert args[args.index("--out") + 1] == str(tmp_path / "run" / "classified" / "rgb.gpkg")


def test_a_step_cannot_run_twice_at_once(dock, layers, tmp_path, fake_engine):
    dock.engine_factory = lambda: fake_engine("sleep")
    _classify_ready(dock, layers, tmp_path)
    job = dock.run_step("classify")
    assert dock.run_step("classify") is None
    assert "already running" in dock.notifier.last.text
    job.cancel()
    wait_for(lambda: job.done, 10, "cancelled job")


def test_web_layer_is_exported_by_the_job_before_the_engine_runs(dock, layers, tmp_path, fake_engine, qgis_iface):
    from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer, QgsRectangle
    uri, (minx, miny, maxx, maxy) = mapdata.write_xyz_tiles(tmp_path / "tiles")
    xyz = QgsRasterLayer(uri, "web", "wms")
    QgsProject.instance().addMapLayer(xyz)
    _classify_ready(dock, layers, tmp_path)
    dock.forms["classify"].layer.setLayer(xyz)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    canvas.setExtent(QgsRectangle(minx + 100, maxy - 400, minx + 500, maxy - 100))
    dock.forms["classify"].area.setCurrentText("Canvas extent")
    dock.engine_factory = lambda: fake_engine("echo")
    job = dock.run_step("classify")
    wait_for(lambda: job.done, 60, "export and engine")
    raster = job.results["2"]  # the fake engine echoes its arguments
    assert raster.endswith("web_export.tif")
    assert QgsRasterLayer(raster, "exported", "gdal").bandCount() == 4
