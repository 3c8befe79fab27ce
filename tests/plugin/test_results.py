"""What each step shows, read from the files the engine writes in the run folder."""

from __future__ import annotations

import json

from asymkd_qgis import results
from asymkd_qgis.layout import RunLayout


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_step_results_from_run_files(tmp_path):
    run = RunLayout(tmp_path)
    _write(run.ms / "chips.json", {"counts": {"Forest": 3, "River": 2}, "paired_with": "rgb.tif", "pairs": 4})
    _write(run.rgb / "chips.json", {"counts": {"Forest": 5, "River": 5}})
    assert results.data_results(run).rows == {"MS chips": "5 in 2 classes", "same-target RGB pairs": 4,
                                              "RGB chips": "10 in 2 classes"}
    _write(run.teacher / "metrics.json", {"summary": {"ms_samples": 5, "classes": 2, "out_of_fold_accuracy": 0.8},
                                          "history": [{"epoch": 1, "train_loss": 2.0},
                                                      {"epoch": 2, "train_loss": 1.5}]})
    rows = results.teacher_results(run).rows
    assert rows["out-of-fold accuracy"] == 0.8 and rows["epochs"] == 2 and rows["final training loss"] == 1.5
    _write(run.student / "metrics.json",
           {"test": {"overall_accuracy": 0.9, "macro_f1": 0.85}, "val": {"overall_accuracy": 1.0},
            "summary": {"ms_rows": 5, "ms_rows_source": "pairs+pseudo-rgb"}})
    _write(run.root / "baseline" / "metrics.json", {"val": {"overall_accuracy": 0.7, "macro_f1": 0.6}})
    run.report.write_text("<html></html>")
    shown = results.distill_results(run)
    assert "the teacher's gain" not in shown.rows  # test against validation: no gain to show
    assert shown.rows == {"student test accuracy": 0.9, "student test macro-F1": 0.85,
                          "baseline validation accuracy": 0.7, "baseline validation macro-F1": 0.6,
                          "MS samples as RGB rows": "5 (pairs+pseudo-rgb)"}
    assert shown.links == {"Open the report (report.html)": str(run.report)} and shown.image is None
    assert results.matcher_results(run).rows == {}  # nothing written yet: nothing shown
    # another sensor: the baseline on the same test set, and RGB labels for some of the teacher's classes
    _write(run.root / "baseline" / "metrics.json", {"test": {"overall_accuracy": 0.82, "macro_f1": 0.8}})
    _write(run.student / "metrics.json",
           {"test": {"overall_accuracy": 0.865, "macro_f1": 0.86},
            "summary": {"teacher_classes_left_out": ["HerbaceousVegetation", "PermanentCrop"]}})
    rows = results.distill_results(run).rows
    assert rows["the teacher's gain"] == "+4.5 points of accuracy"
    assert rows["teacher classes not learned"] == "HerbaceousVegetation, PermanentCrop"


def test_classify_results_name_the_device_briefly():
    shown = results.classify_results({"classify": {"tiles_classified": 4, "provider": "CUDAExecutionProvider"}},
                                     "scene", 4, "/data/scene.gpkg")
    assert shown.rows == {"tiles classified": 4, "device": "CUDA"}
    assert shown.links == {"Open scene.gpkg": "/data/scene.gpkg"}
