"""QGIS without a screen for the plugin's tools (screenshots, map benchmark): an offscreen
QgsApplication with its own settings folder, a main window with a map canvas and message bar,
and the few QgisInterface methods the AsymKD dock uses."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class HeadlessIface:
    def __init__(self, window, canvas, bar):
        self._window, self._canvas, self._bar = window, canvas, bar

    def mainWindow(self):
        return self._window

    def mapCanvas(self):
        return self._canvas

    def messageBar(self):
        return self._bar

    def openMessageLog(self):
        pass

    def activeLayer(self):
        return None

    def addDockWidget(self, area, dock):
        self._window.addDockWidget(area, dock)

    def removeDockWidget(self, dock):
        self._window.removeDockWidget(dock)


def start_qgis(config_dir: Path):
    """An offscreen QgsApplication whose settings live in config_dir (never the user's profile)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ["QGIS_CUSTOM_CONFIG_PATH"] = str(config_dir)
    from qgis.core import QgsApplication
    app = QgsApplication([], True)
    app.initQgis()
    return app


def main_window():
    """(window, iface) with a map canvas and a message bar."""
    from qgis.gui import QgsMapCanvas, QgsMessageBar
    from qgis.PyQt.QtWidgets import QMainWindow, QVBoxLayout, QWidget
    window = QMainWindow()
    central = QWidget()
    column = QVBoxLayout(central)
    bar = QgsMessageBar()
    canvas = QgsMapCanvas()
    column.addWidget(bar)
    column.addWidget(canvas, 1)
    window.setCentralWidget(central)
    return window, HeadlessIface(window, canvas, bar)


def wait_until(predicate, timeout: float, what: str, pause: float = 0.05) -> float:
    """Process Qt events until predicate() holds; the seconds it took (TimeoutError after timeout)."""
    from qgis.PyQt.QtCore import QCoreApplication
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        QCoreApplication.processEvents()
        time.sleep(pause)
    QCoreApplication.processEvents()
    return time.monotonic() - start


def wait(predicate, timeout: float, what: str) -> None:
    """wait_until for a tool: a timeout ends the program with a message."""
    try:
        wait_until(predicate, timeout, what)
    except TimeoutError:
        raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}") from None


def fill_data_step(dock, layer: dict, run_dir: Path, pair_layer) -> None:
    """Point the dock's Data step at map layers keyed ms_scene, ms_labels, rgb_scene,
    rgb_labels, rgb_test_scene, rgb_test_labels (label field `class`)."""
    dock.run_dir.setFilePath(str(run_dir))
    dock.forms["data"].ms_source.set_layer(layer["ms_scene"])
    dock.forms["data"].ms_labels.set(layer["ms_labels"], "class")
    dock.forms["data"].pair_raster.setLayer(pair_layer)
    dock.forms["data"].rgb_source.set_layer(layer["rgb_scene"])
    dock.forms["data"].rgb_labels.set(layer["rgb_labels"], "class")
    dock.forms["data"].test_source.set_layer(layer["rgb_test_scene"])
    dock.forms["data"].test_labels.set(layer["rgb_test_labels"], "class")


def run_all_steps(app, dock, timeout: float) -> list[tuple[str, str, float]]:
    """Run the dock's steps in order and wait until all end or one fails: (step, state, seconds
    since the start) of each that ended."""
    from asymkd_qgis.dock import STEPS
    finished: list[tuple[str, str, float]] = []
    start = time.monotonic()
    dock.jobFinished.connect(lambda step, job: finished.append((step, job.state, time.monotonic() - start)))
    dock.run_all()
    wait(lambda: len(finished) == len(STEPS) or any(s != "ok" for _, s, _ in finished), timeout,
         f"the {len(STEPS)} steps")
    return finished


def save_grab(app, widget, path: Path) -> None:
    """Let the widget paint, then save it as a PNG and print where."""
    for _ in range(5):
        app.processEvents()
    widget.grab().save(str(path))
    print(path)
