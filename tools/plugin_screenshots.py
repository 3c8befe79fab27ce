#!/usr/bin/env python3
"""Screenshots of the AsymKD plugin, rendered offscreen (`make screenshot`).

First the dock's first-run states at QGIS's default dock width: the engine missing
(dock-0-engine-missing.png) and being created (dock-0-engine-creating.png). Then it runs the
whole loop from the dock on a small synthetic world (the engine's `synth`) and saves: the dock
at each step with its results (dock-1-data.png ... dock-5-classify.png), the
test scene (map-scene.png), its classified tiles styled by class with a legend
(map-classified.png), and the window with map and dock side by side (window.png). Last, the
review of that classification: its area table in the dock (dock-6-areas.png), its tiles styled by
the engine's QML with the uncertain tiles marked (map-uncertain.png), the review panel
(review-panel.png) and the map zoomed to a tile under review beside it (window-review.png);
`--classified GPKG --scene RASTER` makes only these four. Run with QGIS's Python
(Debian: /usr/bin/python3) and ASYMKD_ENGINE_PYTHON pointing to the engine environment.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from qgis_headless import REPO, fill_data_step, main_window, run_all_steps, save_grab, start_qgis, wait


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
        save_grab(app, dock, out / f"dock-0-{name}.png")
    dock.close()
    dock.deleteLater()
    window.close()


def synthetic_world(work: Path, classes: int) -> dict:
    """The engine's small synthetic world: {"ms_scene": path, ...}."""
    from asymkd_qgis.engine import Engine, run_engine
    engine = Engine.from_settings()
    print(f"engine: {engine.python} (asymkd {engine.check()})")
    world = run_engine(engine, ["synth", "--out", str(work / "world"), "--size", "64", "--ms-per-class", "10",
                                "--rgb-per-class", "12", "--test-per-class", "9", "--unlabeled-per-class", "0",
                                "--paired", "0", "--classes", str(classes)])
    if not world.ok:
        raise SystemExit(f"synth failed: {world.message()}")
    return world.results


def add_layers(paths: dict) -> dict:
    """The world's scenes and label layers, added to the project."""
    from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer
    layer = {}
    for key in ("ms_scene", "rgb_scene", "rgb_test_scene"):
        layer[key] = QgsRasterLayer(paths[key], key.replace("_", " "), "gdal")
    for key in ("ms_labels", "rgb_labels", "rgb_test_labels"):
        layer[key] = QgsVectorLayer(paths[key], key.replace("_", " "), "ogr")
    QgsProject.instance().addMapLayers(list(layer.values()))
    return layer


def run_loop(app, dock, layer: dict, run_dir: Path, epochs: int) -> None:
    """The five steps from the dock, with a few epochs each."""
    fill_data_step(dock, layer, run_dir, layer["rgb_scene"])
    for spin in (dock.forms["teacher"].epochs, dock.forms["matcher"].epochs, dock.forms["distill"].epochs):
        spin.setValue(epochs)
    dock.forms["teacher"].settings.setText("teacher.folds=0")
    dock.forms["classify"].layer.setLayer(layer["rgb_test_scene"])
    dock.forms["classify"].uncertain_below.setValue(0.6)  # the review screenshots show the tiles marked uncertain
    finished = run_all_steps(app, dock, 1800)
    print(f"all steps: {[(step, state) for step, state, _ in finished]} in {finished[-1][2]:.0f} s")
    if any(state != "ok" for _, state, _ in finished):
        print(f"a step failed: {dock.notifier.last.text if dock.notifier.last else ''}", file=sys.stderr)


def grab_whole_dock(app, dock, path: Path) -> None:
    """The floating dock at the default width, tall enough to show its whole form (no part
    scrolled out of the picture)."""
    from asymkd_qgis.dock import DOCK_WIDTH
    dock.resize(DOCK_WIDTH, 1250)
    for _ in range(5):
        app.processEvents()
    body = dock.widget().widget()  # the scroll area's form
    dock.resize(DOCK_WIDTH, max(1250, body.heightForWidth(body.width()), body.sizeHint().height()) + 40)
    save_grab(app, dock, path)


def step_screenshots(app, dock, out: Path) -> None:
    from asymkd_qgis.dock import STEPS
    dock.setFloating(True)
    for index, step in enumerate(STEPS):
        dock.show_step(step)
        grab_whole_dock(app, dock, out / f"dock-{index + 1}-{step}.png")
    dock.setFloating(False)


def map_screenshots(app, window, canvas, classified, scene, out: Path) -> None:
    """The scene, its classified tiles with a legend, and the window with both under the dock."""
    render_map([scene], classified.extent(), out / "map-scene.png")
    render_map([classified], classified.extent(), out / "map-classified.png", legend_layer=classified)
    print(out / "map-scene.png")
    print(out / "map-classified.png")
    classified.setOpacity(0.6)
    canvas.setLayers([classified, scene])
    canvas.setDestinationCrs(classified.crs())
    canvas.setExtent(classified.extent())
    canvas.refresh()
    wait(lambda: not canvas.isDrawing(), 60, "the canvas")
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    window.grab().save(str(out / "window.png"))
    print(out / "window.png")


def show_on_canvas(app, canvas, layers_shown, extent=None) -> None:
    """Draw layers on the window's map canvas and wait until it is painted."""
    canvas.setLayers(layers_shown)
    canvas.setDestinationCrs(layers_shown[0].crs())
    canvas.setExtent(extent if extent is not None else layers_shown[0].extent())
    canvas.refresh()
    wait(lambda: not canvas.isDrawing(), 60, "the canvas")
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)


def review_screenshots(app, out: Path, gpkg: Path, scene) -> None:
    """A classification's area table in the dock (dock-6-areas.png), its tiles styled by the
    engine's QML, uncertain tiles marked (map-uncertain.png), the review panel at the default
    dock width with one tile reviewed and the next selected (review-panel.png), and the window
    with the map zoomed to that tile beside the panel (window-review.png)."""
    from qgis.PyQt.QtCore import Qt

    from asymkd_qgis import layers
    from asymkd_qgis.dock import DOCK_WIDTH, AsymKDDock
    from asymkd_qgis.notify import Notifier
    window, iface = main_window()
    dock = AsymKDDock(iface, Notifier(iface), window)
    window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
    window.resize(1500, 1000)
    window.show()
    tiles = layers.load_vector_result(gpkg, name=f"{Path(gpkg).stem} tiles")
    dock.forms["classify"].loaded_layers.append(tiles)
    dock.forms["classify"].show_classified(gpkg)
    dock.show_step("classify")
    dock.setFloating(True)
    grab_whole_dock(app, dock, out / "dock-6-areas.png")
    dock.hide()
    render_map([tiles, scene], tiles.extent(), out / "map-uncertain.png", legend_layer=tiles)
    print(out / "map-uncertain.png")
    panel = dock.forms["classify"].open_review(tiles)
    if panel is None:
        raise SystemExit(f"{gpkg} is not a tile layer the review panel takes")
    panel.setFloating(True)
    panel.resize(DOCK_WIDTH, 720)
    panel.queue.setCurrentRow(0)
    panel.accept_current()  # reviewed; the next tile is selected
    save_grab(app, panel, out / "review-panel.png")
    panel.setFloating(False)
    show_on_canvas(app, iface.mapCanvas(), [tiles, scene])
    panel.go_to()  # the canvas now has its size and layers: zoom to the current tile again
    show_on_canvas(app, iface.mapCanvas(), [tiles, scene], iface.mapCanvas().extent())
    window.grab().save(str(out / "window-review.png"))
    print(out / "window-review.png")
    panel.release()
    window.close()
    dock.deleteLater()


def loop_screenshots(app, out: Path, work: Path, args: argparse.Namespace) -> None:
    """The whole loop run from the dock in a main window, then the dock at each step and the maps."""
    from qgis.core import QgsProject
    from qgis.PyQt.QtCore import Qt

    from asymkd_qgis.dock import AsymKDDock
    from asymkd_qgis.notify import Notifier
    paths = synthetic_world(work, args.classes)
    window, iface = main_window()
    dock = AsymKDDock(iface, Notifier(iface), window)
    window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
    window.resize(1500, 1000)
    window.show()
    layer = add_layers(paths)
    run_loop(app, dock, layer, work / "run", args.epochs)
    out.mkdir(parents=True, exist_ok=True)
    step_screenshots(app, dock, out)
    if dock.forms["classify"].loaded_layers:
        classified = dock.forms["classify"].loaded_layers[-1]
        map_screenshots(app, window, iface.mapCanvas(), classified, layer["rgb_test_scene"], out)
        window.close()
        review_screenshots(app, out, Path(classified.source().split("|")[0]), layer["rgb_test_scene"])
    window.close()
    dock.deleteLater()
    QgsProject.instance().removeAllMapLayers()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "out" / "screenshots"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each training step")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--first-run-only", action="store_true", help="only the engine-missing and creating states")
    parser.add_argument("--classified", help="only the area table, uncertain styling and review panel of this "
                        "classified GeoPackage (with --scene, the raster under it)")
    parser.add_argument("--scene", help="the raster that --classified classifies")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    app = start_qgis(work / "qgis-config")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.classified:
            from qgis.core import QgsProject, QgsRasterLayer
            scene = QgsRasterLayer(args.scene, "scene", "gdal")
            QgsProject.instance().addMapLayer(scene)
            review_screenshots(app, out, Path(args.classified), scene)
            return 0
        first_run_screenshots(app, out, work)
        if not args.first_run_only:
            loop_screenshots(app, out, work, args)
    finally:
        app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
