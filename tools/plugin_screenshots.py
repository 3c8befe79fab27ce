#!/usr/bin/env python3
"""Screenshots of the AsymKD plugin, rendered offscreen (`make screenshot`).

First the dock's first-run states at QGIS's default dock width: the engine missing
(dock-0-engine-missing.png) and being created (dock-0-engine-creating.png). Then it runs the
whole loop from the dock on a small synthetic world (the engine's `synth`) and saves: the dock
at each step with its results (dock-1-data.png ... dock-5-classify.png), the
test scene (map-scene.png), its classified tiles styled by class with a legend
(map-classified.png), and the window with map and dock side by side (window.png). Run with QGIS's Python
(Debian: /usr/bin/python3) and ASYMKD_ENGINE_PYTHON pointing to the engine environment.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from qgis_headless import REPO, fill_data_step, main_window, start_qgis, wait

STEPS = ("data", "teacher", "matcher", "distill", "classify")


def render_map(layers, extent, path: Path, size=(900, 700), legend_layer=None) -> None:
    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor
    settings = QgsMapSettings()
    settings.setLayers(layers)
    settings.setDestinationCrs(layers[-1].crs())
    settings.setOutputSize(QSize(*size))
    settings.setBackgroundColor(QColor("white"))
    settings.setExtent(extent)
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    image = job.renderedImage()
    if legend_layer is not None:
        draw_legend(image, legend_layer)
    image.save(str(path))


def draw_legend(image, layer) -> None:
    """Class colours and names of a categorized layer, in a box at the top left."""
    from qgis.PyQt.QtCore import QRectF, Qt
    from qgis.PyQt.QtGui import QColor, QFont, QPainter
    categories = getattr(layer.renderer(), "categories", lambda: [])()
    if not categories:
        return
    counts = {}
    field = layer.renderer().classAttribute()
    for feature in layer.getFeatures():
        counts[str(feature[field])] = counts.get(str(feature[field]), 0) + 1
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    font = QFont("DejaVu Sans", 10)
    painter.setFont(font)
    row, width = 20, 250
    painter.fillRect(QRectF(8, 8, width, row * len(categories) + 34), QColor(255, 255, 255, 225))
    painter.setPen(QColor("black"))
    align = Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter
    painter.drawText(QRectF(16, 12, width, row), align, f"{layer.name()}: class (tiles)")
    for i, category in enumerate(categories):
        y = 14 + row * (i + 1)
        painter.fillRect(QRectF(16, y + 3, 14, 14), category.symbol().color())
        painter.drawText(QRectF(38, y, width, row), align,
                         f"{category.label()} ({counts.get(str(category.value()), 0)})")
    painter.end()


def first_run_screenshots(app, out: Path, work: Path) -> None:
    """The dock as a new user first sees it: no engine yet, then the engine being created."""
    from asymkd_qgis.dock import DOCK_WIDTH, AsymKDDock
    from asymkd_qgis.engine import Engine
    from asymkd_qgis.notify import Notifier
    window, iface = main_window()
    dock = AsymKDDock(iface, Notifier(iface), window)
    dock.engine_factory = lambda: Engine(python=work / "no-engine" / "bin" / "python")
    dock.setFloating(True)
    dock.resize(DOCK_WIDTH, 900)
    dock.show()
    dock.refresh_engine_state()
    for name, setup in (("engine-missing", lambda: None),
                        ("engine-creating", lambda: dock.engine_banner.show_creating(
                            37.0,
                            "installing torch (CPU build): package 1, torch, 68 MB of 184 MB, 68 MB downloaded"))):
        setup()
        for _ in range(5):
            app.processEvents()
        path = out / f"dock-0-{name}.png"
        dock.grab().save(str(path))
        print(path)
    dock.close()
    dock.deleteLater()
    window.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "out" / "screenshots"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each training step")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--first-run-only", action="store_true", help="only the engine-missing and creating states")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    app = start_qgis(work / "qgis-config")
    from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer
    from qgis.PyQt.QtCore import Qt
    try:
        out.mkdir(parents=True, exist_ok=True)
        first_run_screenshots(app, out, work)
        if args.first_run_only:
            return 0
        from asymkd_qgis.dock import DOCK_WIDTH, AsymKDDock
        from asymkd_qgis.engine import Engine, run_engine
        from asymkd_qgis.notify import Notifier

        engine = Engine.from_settings()
        print(f"engine: {engine.python} (asymkd {engine.check()})")
        world = run_engine(engine, ["synth", "--out", str(work / "world"), "--size", "64", "--ms-per-class", "10",
                                    "--rgb-per-class", "12", "--test-per-class", "9", "--unlabeled-per-class", "0",
                                    "--paired", "0", "--classes", str(args.classes)])
        if not world.ok:
            raise SystemExit(f"synth failed: {world.message()}")
        paths = world.results

        window, iface = main_window()
        canvas = iface.mapCanvas()
        dock = AsymKDDock(iface, Notifier(iface), window)
        window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
        window.resize(1500, 1000)
        window.show()

        project = QgsProject.instance()
        layer = {}
        for key in ("ms_scene", "rgb_scene", "rgb_test_scene"):
            layer[key] = QgsRasterLayer(paths[key], key.replace("_", " "), "gdal")
        for key in ("ms_labels", "rgb_labels", "rgb_test_labels"):
            layer[key] = QgsVectorLayer(paths[key], key.replace("_", " "), "ogr")
        project.addMapLayers(list(layer.values()))
        fill_data_step(dock, layer, work / "run", layer["rgb_scene"])
        for spin in (dock.teacher_epochs, dock.matcher_epochs, dock.distill_epochs):
            spin.setValue(args.epochs)
        dock.teacher_settings.setText("teacher.folds=0")
        dock.classify_layer.setLayer(layer["rgb_test_scene"])
        finished: list[tuple[str, str]] = []
        dock.jobFinished.connect(lambda step, job: finished.append((step, job.state)))
        start = time.monotonic()
        dock.run_all()
        wait(app, lambda: len(finished) == len(STEPS) or any(s != "ok" for _, s in finished), 1800, "the five steps")
        print(f"all steps: {finished} in {time.monotonic() - start:.0f} s")
        if any(state != "ok" for _, state in finished):
            print(f"a step failed: {dock.notifier.last.text if dock.notifier.last else ''}", file=sys.stderr)

        out.mkdir(parents=True, exist_ok=True)
        dock.setFloating(True)
        dock.resize(DOCK_WIDTH, 1250)
        for index, step in enumerate(STEPS):
            dock.show_step(step)
            for _ in range(5):
                app.processEvents()
            path = out / f"dock-{index + 1}-{step}.png"
            dock.grab().save(str(path))
            print(path)
        dock.setFloating(False)

        classified = dock.loaded_layers[-1] if dock.loaded_layers else None
        if classified is not None:
            render_map([layer["rgb_test_scene"]], classified.extent(), out / "map-scene.png")
            render_map([classified], classified.extent(), out / "map-classified.png", legend_layer=classified)
            print(out / "map-scene.png")
            print(out / "map-classified.png")
            classified.setOpacity(0.6)
            canvas.setLayers([classified, layer["rgb_test_scene"]])
            canvas.setDestinationCrs(classified.crs())
            canvas.setExtent(classified.extent())
            canvas.refresh()
            wait(app, lambda: not canvas.isDrawing(), 60, "the canvas")
            for _ in range(20):
                app.processEvents()
                time.sleep(0.02)
            window.grab().save(str(out / "window.png"))
            print(out / "window.png")
        window.close()
        dock.deleteLater()
        project.removeAllMapLayers()
    finally:
        app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
