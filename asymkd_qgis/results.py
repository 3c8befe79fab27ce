"""What each step shows when it ends: the few numbers that matter, read from the files the
engine wrote in the run folder (chips.json, <step>/metrics.json), plus links and images."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import layout
from .layout import RunLayout


@dataclass
class StepResults:
    rows: dict[str, Any] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    note: str = ""


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _scores(metrics: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """('test', {...}) or ('validation', {...}): the held-out scores of a metrics.json."""
    for key, name in (("test", "test"), ("val", "validation")):
        part = metrics.get(key)
        if isinstance(part, dict) and part.get("overall_accuracy") is not None:
            return name, part
    return None


def data_results(run: RunLayout) -> StepResults:
    out = StepResults(note=f"Chips written under {run.data}")
    for label, folder in (("MS chips", run.ms), ("RGB chips", run.rgb), ("RGB test chips", run.rgb_test)):
        manifest = _json(folder / layout.CHIPS_MANIFEST)
        counts = manifest.get("counts") or {}
        if counts:
            out.rows[label] = f"{sum(counts.values())} in {len(counts)} classes"
        if label == "MS chips" and manifest.get("paired_with"):
            out.rows["same-target RGB pairs"] = manifest.get("pairs", 0)
    return out


def teacher_results(run: RunLayout) -> StepResults:
    metrics = _json(run.metrics(layout.TEACHER))
    summary = metrics.get("summary") or {}
    out = StepResults()
    out.rows["MS samples"] = summary.get("ms_samples")
    out.rows["classes"] = summary.get("classes")
    if summary.get("out_of_fold_accuracy") is not None:
        out.rows["out-of-fold accuracy"] = summary["out_of_fold_accuracy"]
    scores = _scores(metrics)
    if scores:
        out.rows[f"{scores[0]} accuracy"] = scores[1]["overall_accuracy"]
    history = metrics.get("history") or []
    if history and isinstance(history[-1], dict):
        out.rows["epochs"] = history[-1].get("epoch")
        out.rows["final training loss"] = history[-1].get("train_loss")
    out.rows["soft-label confidence"] = summary.get("soft_label_confidence")
    out.rows = {k: v for k, v in out.rows.items() if v is not None}
    return out


def matcher_results(run: RunLayout) -> StepResults:
    matcher = (_json(run.metrics(layout.MATCHER)).get("summary") or {})
    pairs = (_json(run.metrics(layout.PAIRS)).get("summary") or {})
    rows = {"positives": matcher.get("positives"), "same-target pairs": matcher.get("pairs"),
            "retrieval top-1": matcher.get("retrieval_top1"),
            "retrieval same class": matcher.get("retrieval_same_class"),
            "RGB samples paired": pairs.get("rgb_samples"), "pairing": pairs.get("method"),
            "MS coverage": pairs.get("coverage"), "largest MS share": pairs.get("max_share")}
    return StepResults(rows={k: v for k, v in rows.items() if v is not None})


def distill_results(run: RunLayout) -> StepResults:
    out = StepResults()
    shown = {}
    for name in (layout.STUDENT, layout.BASELINE):
        scores = _scores(_json(run.metrics(name)))
        if scores:
            which, part = scores
            shown[name] = scores
            out.rows[f"{name} {which} accuracy"] = part["overall_accuracy"]
            out.rows[f"{name} {which} macro-F1"] = part.get("macro_f1")
    if len(shown) == 2 and shown[layout.STUDENT][0] == shown[layout.BASELINE][0]:  # same held-out set
        gain = shown[layout.STUDENT][1]["overall_accuracy"] - shown[layout.BASELINE][1]["overall_accuracy"]
        out.rows["the teacher's gain"] = f"{100 * gain:+.1f} points of accuracy"
    student = _json(run.metrics(layout.STUDENT)).get("summary") or {}
    if student.get("ms_rows"):
        out.rows["MS samples as RGB rows"] = f"{student['ms_rows']} ({student.get('ms_rows_source')})"
    if student.get("teacher_classes_left_out"):  # the RGB labels cover some of the teacher's classes
        out.rows["teacher classes not learned"] = ", ".join(map(str, student["teacher_classes_left_out"]))
    if run.report.is_file():
        out.links[f"Open the report ({layout.REPORT})"] = str(run.report)
    if run.confusion.is_file():
        out.image = str(run.confusion)
    out.rows = {k: v for k, v in out.rows.items() if v is not None}
    return out


def _device(provider: Any) -> Any:
    """'CPUExecutionProvider' -> 'CPU': onnxruntime's long names would widen the dock."""
    return provider[:-len("ExecutionProvider")] if isinstance(provider, str) and \
        provider.endswith("ExecutionProvider") and provider != "ExecutionProvider" else provider


def classify_results(metrics: dict[str, Any], layer_name: str, features: int, gpkg: str) -> StepResults:
    m = metrics.get("classify") or {}
    rows = {"tiles classified": m.get("tiles_classified", features), "tiles skipped": m.get("tiles_skipped"),
            "tiles per second": m.get("tiles_per_s"), "device": _device(m.get("provider"))}
    return StepResults(rows={k: v for k, v in rows.items() if v is not None},
                       links={f"Open {Path(gpkg).name}": gpkg},
                       note=f"Loaded '{layer_name}': {features} tiles.")
