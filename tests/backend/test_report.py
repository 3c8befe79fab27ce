"""The HTML report of a run, built from a fake run folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from asymkd.errors import DataError
from asymkd.report import write_report
from asymkd.train.evaluate import classification_metrics

CLASSES = ["Forest", "River", "Sea<Lake>"]


def _scores(y_pred: list[int]) -> dict:
    y_true = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    return classification_metrics(y_true, y_pred, CLASSES)


def _write(run: Path, step: str, doc: dict) -> None:
    (run / step).mkdir(parents=True, exist_ok=True)
    (run / step / "metrics.json").write_text(json.dumps(doc))


def _history(n: int) -> list[dict]:
    return [{"epoch": e, "train_loss": 2.0 / e, "val_accuracy": 0.4 + 0.1 * e, "lr": 0.01} for e in range(1, n + 1)]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run-1"
    run.mkdir()
    (run / "config.yaml").write_text("student:\n  backbone: resnet18_w32\nnote: \"<script>alert(1)</script>\"\n")
    baseline = _scores([0, 0, 1, 1, 1, 1, 0, 1, 2, 0])  # 6/10 = 60%
    student = _scores([0, 0, 0, 1, 1, 1, 1, 1, 2, 2])   # 9/10 = 90%
    _write(run, "baseline", {"step": "baseline", "test": baseline, "val": baseline,
                             "history": _history(3), "summary": {"epochs": 3}})
    _write(run, "student", {"step": "student", "test": student, "history": _history(4),
                            "summary": {"w_feat": 0.003, "pseudo": "kl",
                                                        "final_pairs_max_share": 0.0456}})
    _write(run, "teacher", {"step": "teacher", "val": _scores([0, 0, 0, 0, 1, 1, 1, 1, 2, 2]),
                            "history": _history(2), "summary": {"train_accuracy": 0.97}})
    _write(run, "pairs", {"step": "pairs", "summary": {"distinct_ms_used": 241, "max_share": 0.0123,
                                                       "method": "sinkhorn"}})
    _write(run, "matcher", {"step": "matcher", "history": [{"epoch": 1, "loss": 3.2}],
                            "summary": {"positives": "pseudo-rgb"}})
    return run


def test_report_shows_baseline_student_and_gain(run_dir: Path):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    headline = page.split("<h2>Baseline vs distilled student</h2>", 1)[1].split("<h2>", 1)[0]
    assert "60.0%" in headline and "90.0%" in headline and "+30.0 pts" in headline
    # per-class, confusion matrices (embedded), curves, pairing stats, teacher, config
    assert "Per class" in page and "F1 gain" in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 2 + 3 + 1  # two student confusions, three+ curves, teacher confusion
    assert "distinct_ms_used" in page and "241" in page and "0.0123" in page
    after = page.split("after re-pairing", 1)[1].split("<h2>", 1)[0]
    assert "max_share" in after and "0.0456" in after
    assert "MS teacher" in page and "100.0%" in page
    assert "resnet18_w32" in page


def test_report_escapes_text_and_needs_no_network(run_dir: Path):
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "Sea&lt;Lake&gt;" in page and "Sea<Lake>" not in page
    assert not re.search(r'(src|href)="https?:', page)


def test_report_with_one_student_and_bad_metrics(tmp_path: Path):
    run = tmp_path / "run"
    _write(run, "student", {"step": "student", "val": _scores([0] * 10)})
    (run / "baseline").mkdir()
    (run / "baseline" / "metrics.json").write_text("{not json")
    page = write_report(run).read_text(encoding="utf-8")
    assert "baseline/metrics.json could not be read" in page
    assert "validation set" in page and "40.0%" in page
    assert "No config.yaml" in page


def test_report_of_missing_run_folder_is_an_error(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        write_report(tmp_path / "nope")
