"""The first run inside QGIS: the dock shows the engine state (missing, broken, being created,
working) with the button that fixes it; messages keep their text; the dock fits QGIS's
default dock width; the wheel does not change fields while the form scrolls."""

from __future__ import annotations

import gc
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from qgis.PyQt.QtCore import QObject, QPoint, QPointF, Qt, pyqtSignal
from qgis.PyQt.QtGui import QWheelEvent
from qgis.PyQt.QtWidgets import (
    QAbstractSpinBox,
    QApplication,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QTextEdit,
    QWidget,
)

from asymkd_qgis import dock as dock_module
from asymkd_qgis.engine import BROKEN, MISSING, WORKING, Engine, stream_process
from asymkd_qgis.widgets import EngineBanner
from conftest import FAKE_ENGINE_SOURCE, wait_for


@pytest.fixture(scope="module")
def partial_env(tmp_path_factory) -> Path:
    """What a cancelled creation used to leave: a venv without the engine's packages."""
    venv = tmp_path_factory.mktemp("partial") / "env"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    return venv / "bin" / "python"


def _engine(python: Path) -> Engine:
    from asymkd_qgis import paths
    return Engine(python=python, source=paths.engine_source_dir())


def test_missing_engine_shows_the_create_button(dock, tmp_path, monkeypatch):
    dock.engine_factory = lambda: _engine(tmp_path / "nowhere" / "python")
    state = dock.refresh_engine_state()
    banner = dock.engine_banner
    assert state.kind == MISSING and not banner.isHidden()
    assert banner.button.text() == EngineBanner.CREATE and not banner.button.isHidden()
    assert "not installed" in banner.label.text()
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a: asked.append(a[2]) or QMessageBox.StandardButton.No)
    banner.button.click()  # the plugin's create_environment, which asks first
    assert len(asked) == 1 and "QGIS's own Python is not changed" in asked[0]


def test_partial_environment_is_broken_and_offers_repair(dock, partial_env):
    dock.engine_factory = lambda: _engine(partial_env)
    state = dock.refresh_engine_state()
    assert state.kind == BROKEN
    assert set(state.missing) == {"numpy", "torch", "onnxruntime", "rasterio"}  # asymkd itself is found
    assert dock.engine_banner.button.text() == EngineBanner.REPAIR
    assert "numpy, torch, onnxruntime, rasterio" in dock.engine_banner.label.text()


def test_partial_environment_is_refused_before_a_step_runs(dock, partial_env, tmp_path):
    dock.engine_factory = lambda: _engine(partial_env)
    (tmp_path / "ms").mkdir()
    dock.forms["data"].ms_source.set_folder(str(tmp_path / "ms"))
    assert dock.run_step("teacher") is None
    assert "broken" in dock.panels["teacher"].status.text() and dock.panels["teacher"].has_error
    assert "Create engine environment" in dock.notifier.last.actions


def test_a_crash_in_a_broken_environment_offers_repair_whatever_its_wording(fake_engine):
    """The environment is judged by what the engine needs, not by the error text (an error
    that mentions asymkd.commands used to hide a missing numpy)."""
    from asymkd_qgis.runner import EngineCommand
    from asymkd_qgis.tasks import EngineJob

    def engine() -> Engine:
        fake = fake_engine("crash")
        return Engine(python=fake.python, source=FAKE_ENGINE_SOURCE, required=("asymkd", "numpy_not_installed_here"))
    ok_env = EngineJob("x", [EngineCommand(["export"])], fake_engine("crash"))
    broken_env = EngineJob("x", [EngineCommand(["export"])], engine())
    for job in (ok_env, broken_env):
        job.start()
        wait_for(lambda job=job: job.done, 30, "the crash")
    assert not ok_env.environment_broken()
    assert broken_env.environment_broken()


def test_working_engine_hides_the_banner(dock, real_engine):
    dock.engine_factory = lambda: real_engine
    assert dock.refresh_engine_state().kind == WORKING
    assert dock.engine_banner.isHidden()


class _FakeBuilder(QObject):
    progressChanged = pyqtSignal(float, str)
    builderFinished = pyqtSignal(object)

    def __init__(self):
        super().__init__()
        self.ok, self.message, self.cancelled = None, "", False

    @property
    def done(self) -> bool:
        return self.ok is not None

    def cancel(self) -> None:
        self.cancelled = True


def test_creation_progress_and_cancel_show_in_the_banner(dock, tmp_path):
    dock.engine_factory = lambda: _engine(tmp_path / "nowhere" / "python")
    builder = _FakeBuilder()
    dock.track_builder(builder)
    builder.progressChanged.emit(42.0, "installing torch (CPU build): package 1, torch, 92 MB of 184 MB")
    banner = dock.engine_banner
    assert banner.progress.value() == 42 and "92 MB of 184 MB" in banner.label.text()
    assert banner.button.text() == EngineBanner.CANCEL
    banner.button.click()
    assert builder.cancelled
    builder.ok = False
    builder.message = "Creating the engine environment was cancelled; the partial environment was removed."
    builder.builderFinished.emit(builder)
    assert banner.progress.isHidden() and banner.button.text() == EngineBanner.CREATE
    assert "cancelled" in banner.label.text() and "not installed" in banner.label.text()


# -- messages ---------------------------------------------------------------------------------
def test_message_text_between_angle_brackets_stays_visible(plugin, qgis_iface):
    text = "pip: torch<2.15,>=2.0 needs <numpy> & more"
    plugin.notifier.error("AsymKD engine", text)
    item = qgis_iface.messageBar().currentItem()
    shown = " ".join(w.toPlainText() for w in item.findChildren(QTextEdit))
    assert text in shown


def test_engine_subprocesses_leave_no_unclosed_files(fake_engine):
    engine = fake_engine("ok")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            result = stream_process(engine.argv(["teacher"]), env=engine.env())
            assert result.returncode == 0
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_a_later_success_clears_the_old_red_error(dock, fake_engine, tmp_path, qgis_iface):
    dock.engine_factory = lambda: fake_engine("ok")
    dock.forms["data"].ms_source.set_folder(str(tmp_path / "not there"))
    assert dock.run_step("teacher") is None
    panel = dock.panels["teacher"]
    bar = qgis_iface.messageBar()
    assert panel.has_error and bar.currentItem() is not None
    error_item = bar.currentItem()
    (tmp_path / "ms").mkdir()
    dock.forms["data"].ms_source.set_folder(str(tmp_path / "ms"))
    dock.run_dir.setFilePath(str(tmp_path / "run"))
    job = dock.run_step("teacher")
    wait_for(lambda: job.done, 30, "the job")
    assert job.state == job.OK and not panel.has_error
    assert error_item not in bar.items()


def test_hints_name_ui_that_exists(plugin, qgis_iface):
    from asymkd_qgis import engine, envsetup
    menu = {a.text() for a in plugin.actions}
    for hint in (engine.ENVIRONMENT_HINT, envsetup.BASE_PYTHON_HINT):
        for named in ("Create engine environment...", "Diagnostics...", "Create engine environment from a folder..."):
            if f"Plugins > AsymKD > {named}" in hint:
                assert named in menu
        assert "toolbar" not in hint.lower() and "setting" not in hint.lower()
    plugin.show_diagnostics()
    buttons = {b.text() for b in plugin.diagnostics.findChildren(QPushButton)}
    assert {"Choose engine Python...", "Choose base Python..."} <= buttons


# -- the dock's form --------------------------------------------------------------------------
@pytest.fixture
def docked(plugin, fake_engine):
    """The dock beside a map at QGIS's default dock width."""
    window = QMainWindow()
    window.setCentralWidget(QWidget())
    dock = plugin.dock
    dock.engine_factory = lambda: fake_engine("ok")
    window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
    window.resize(1000, 800)
    window.resizeDocks([dock], [dock_module.DOCK_WIDTH], Qt.Orientation.Horizontal)
    window.show()
    dock.show()
    QApplication.processEvents()
    yield dock
    window.removeDockWidget(dock)
    dock.setParent(plugin.iface.mainWindow())
    window.deleteLater()


def test_the_dock_fits_the_default_dock_width(docked):
    scroll = docked.widget()
    assert docked.width() <= dock_module.DOCK_WIDTH + 20
    for step in dock_module.STEPS:
        docked.show_step(step)
        QApplication.processEvents()
        body = scroll.widget()
        assert body.width() <= scroll.viewport().width(), step
        assert body.minimumSizeHint().width() <= scroll.viewport().width(), step
        assert not scroll.horizontalScrollBar().isVisible()
        for button in docked.sections[step].findChildren(QPushButton):
            if button.isVisible():
                assert button.width() >= button.minimumSizeHint().width(), (step, button.text())


def test_the_wheel_scrolls_the_form_and_leaves_unfocused_fields_alone(docked):
    docked.show_step("distill")
    QApplication.processEvents()
    spin = docked.forms["distill"].w_feat
    before = spin.value()
    assert spin.focusPolicy() == Qt.FocusPolicy.StrongFocus
    event = QWheelEvent(QPointF(5, 5), QPointF(spin.mapToGlobal(QPoint(5, 5))), QPoint(0, 0), QPoint(0, -120),
                        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(spin, event)
    assert spin.value() == before
    for widget in docked.findChildren(QAbstractSpinBox):
        assert widget.focusPolicy() == Qt.FocusPolicy.StrongFocus


def test_rows_that_do_not_apply_are_disabled(dock, tmp_path):
    data, classify = dock.forms["data"], dock.forms["classify"]
    data.ms_source.set_folder(str(tmp_path))
    assert not data.ms_labels.isEnabled() and not data.pair_raster.isEnabled()
    data.rgb_source.set_folder(str(tmp_path))
    assert not data.rgb_labels.isEnabled() and not data.chip_size.isEnabled()
    data.rgb_source.mode.setCurrentText("Raster layer")
    assert data.rgb_labels.isEnabled() and data.chip_size.isEnabled()
    classify.area.setCurrentText("Whole layer")
    assert not classify.mask_layer.isEnabled()
    classify.area.setCurrentText("Selected polygons")
    assert classify.mask_layer.isEnabled()
    classify.grid.setCurrentIndex(1)
    assert classify.zoom.isEnabled() and not classify.tile.isEnabled() and not classify.stride.isEnabled()
    classify.grid.setCurrentIndex(0)
    assert not classify.zoom.isEnabled() and classify.tile.isEnabled()


def test_qt6_check_finds_qt5_only_code(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import qt6_check
    bad = tmp_path / "bad.py"
    bad.write_text("from PyQt5.QtCore import Qt\nfrom qgis.PyQt.QtWidgets import QAction\n"
                   "x = Qt.AlignLeft\ndialog.exec_()\nfrom qgis.PyQt.QtCore import QRegExp\n"
                   "ok = Qt.AlignmentFlag.AlignLeft\nQMessageBox.question(None, 'a', 'b')\n")
    texts = [f.text for f in qt6_check.check_paths([bad])]
    assert len(texts) == 5, texts
    assert any("Qt.AlignLeft" in t for t in texts) and any("exec_" in t for t in texts)
    assert qt6_check.check_paths([Path(__file__).resolve().parents[2] / "asymkd_qgis"]) == []
