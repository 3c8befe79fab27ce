#!/usr/bin/env python3
"""Map benchmark through the plugin's own job path (`make bench-plugin`).

On ../shared/data/eurosat_map, from the AsymKD dock in an offscreen QGIS: the teacher from
the 13-band MS scene and its labels, same-target pairs from the co-registered RGB scene, the
student from the separate RGB scene and its labels, then classification of the RGB test scene
on a 64-pixel grid aligned to its origin. Reports per-tile accuracy against the test labels
(each tile's class vs the label polygon under its centre) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from qgis_headless import fill_data_step, main_window, run_all_steps, start_qgis


def tile_accuracy(tiles, labels, field: str = "class") -> dict:
    """Share of tiles whose class_name equals the label polygon's class at the tile centre."""
    from qgis.core import QgsCoordinateTransform, QgsProject, QgsSpatialIndex
    index = QgsSpatialIndex(labels.getFeatures())
    transform = QgsCoordinateTransform(tiles.crs(), labels.crs(), QgsProject.instance())
    total = correct = unlabeled = 0
    per_class: dict[str, list[int]] = {}
    for tile in tiles.getFeatures():
        centre = transform.transform(tile.geometry().centroid().asPoint())
        truth = None
        for fid in index.intersects(transform.transformBoundingBox(tile.geometry().boundingBox())):
            label = labels.getFeature(fid)
            if label.geometry().contains(centre):
                truth = str(label[field])
                break
        if truth is None:
            unlabeled += 1
            continue
        total += 1
        hit = str(tile["class_name"]) == truth
        correct += hit
        counts = per_class.setdefault(truth, [0, 0])
        counts[0] += hit
        counts[1] += 1
    return {"tiles_compared": total, "tiles_correct": correct, "tiles_without_label": unlabeled,
            "tile_accuracy": correct / total if total else None,
            "per_class_recall": {k: round(c / n, 4) for k, (c, n) in sorted(per_class.items())}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/eurosat_map")
    parser.add_argument("--out", default="runs/plugin-map")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--matcher-epochs", type=int, default=20)
    parser.add_argument("--distill-epochs", type=int, default=10)
    parser.add_argument("--settings", default="teacher.folds=0", help="more engine settings (KEY=VALUE ...)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--timeout", type=float, default=6 * 3600)
    return parser.parse_args(argv)


def open_layers(data: Path) -> dict:
    """The map's scenes and label layers, added to the project."""
    from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer
    layer = {name: QgsRasterLayer(str(data / f"{name}.tif"), name, "gdal")
             for name in ("ms_scene", "rgb_overlap", "rgb_scene", "rgb_test_scene")}
    layer.update({name: QgsVectorLayer(str(data / f"{name}.gpkg"), name, "ogr")
                  for name in ("ms_labels", "rgb_labels", "rgb_test_labels")})
    bad = [name for name, item in layer.items() if not item.isValid()]
    if bad:
        raise SystemExit(f"cannot open {bad} in {data}")
    QgsProject.instance().addMapLayers(list(layer.values()))
    return layer


def fill_dock(dock, layer: dict, run_dir: Path, args: argparse.Namespace) -> None:
    """Every step's inputs and options, and a progress line per 10 % of each step."""
    from asymkd_qgis.dock import STEPS
    fill_data_step(dock, layer, run_dir, layer["rgb_overlap"])
    dock.forms["data"].chip_size.setValue(64)
    dock.forms["teacher"].bands.setCurrentText("sentinel2")
    dock.forms["teacher"].epochs.setValue(args.teacher_epochs)
    dock.forms["matcher"].epochs.setValue(args.matcher_epochs)
    dock.forms["distill"].epochs.setValue(args.distill_epochs)
    for edit in (dock.forms["teacher"].settings, dock.forms["matcher"].settings, dock.forms["distill"].settings):
        edit.setText(args.settings)
    dock.forms["teacher"].device.setCurrentText(args.device)
    dock.forms["distill"].device.setCurrentText(args.device)
    dock.forms["distill"].baseline.setChecked(True)
    dock.forms["classify"].layer.setLayer(layer["rgb_test_scene"])
    dock.forms["classify"].area.setCurrentText("Whole layer")
    dock.forms["classify"].grid.setCurrentIndex(0)
    dock.forms["classify"].tile.setValue(64)
    dock.forms["classify"].stride.setValue(64)
    for step in STEPS:
        dock.panels[step].progress.valueChanged.connect(
            lambda value, s=step: print(f"  {s}: {value}% {dock.panels[s].status.text()}", flush=True)
            if value % 10 == 0 else None)


def bench_report(data: Path, run_dir: Path, args: argparse.Namespace, finished, tiles, labels) -> dict:
    """Tile accuracy on the test labels, timings, and the chip test scores of student and baseline."""
    report = {"data": str(data), "epochs": {"teacher": args.teacher_epochs, "matcher": args.matcher_epochs,
                                             "distill": args.distill_epochs}, "settings": args.settings,
              "finished_after_s": {step: round(seconds, 1) for step, _, seconds in finished},
              "tiles": tiles.featureCount(), **tile_accuracy(tiles, labels)}
    from asymkd_qgis import layout
    for name in (layout.STUDENT, layout.BASELINE):
        metrics_file = layout.RunLayout(run_dir).metrics(name)
        if metrics_file.is_file():
            test = json.loads(metrics_file.read_text()).get("test") or {}
            report[f"{name}_chip_test_accuracy"] = test.get("overall_accuracy")
            report[f"{name}_chip_test_macro_f1"] = test.get("macro_f1")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    if not (data / "ms_scene.tif").is_file():
        raise SystemExit(f"{data} has no ms_scene.tif: give --data the eurosat_map folder")
    shutil.rmtree(out / "run", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    app = start_qgis(out / "qgis-config")
    from qgis.core import QgsProject
    try:
        from asymkd_qgis.dock import AsymKDDock
        from asymkd_qgis.notify import Notifier
        window, iface = main_window()
        dock = AsymKDDock(iface, Notifier(iface), window)
        layer = open_layers(data)
        fill_dock(dock, layer, out / "run", args)
        finished = run_all_steps(app, dock, args.timeout)
        for step, state, seconds in finished:
            print(f"{step}: {state} after {seconds:.0f} s")
        if any(state != "ok" for _, state, _ in finished):
            print(f"failed: {dock.notifier.last.text if dock.notifier.last else ''}", file=sys.stderr)
            return 1
        report = bench_report(data, out / "run", args, finished, dock.forms["classify"].loaded_layers[-1],
                              layer["rgb_test_labels"])
        (out / "plugin-map-bench.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        QgsProject.instance().removeAllMapLayers()
        dock.deleteLater()
    finally:
        app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
