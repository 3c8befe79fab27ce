"""The HTML report of a run: one self-contained file (inline CSS, figures as base64 PNG, no
network) built only from what the run folder holds.

Read: `RUN/config.yaml` and `RUN/<step>/metrics.json` for the steps teacher, matcher, pairs,
baseline, student. metrics.json: `{"step", "test": metrics, "val": metrics, "history":
[{"epoch", ...}], "summary": {key: value}}` where metrics is a dict from
`train.evaluate.classification_metrics`; every part may be missing.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import layout
from .errors import DataError
from .fileio import read_json, read_regular
from .models.files import atomic_write_text
from .scores import SPLITS, held_out, split_name, split_scores

STEPS = layout.STEP_FOLDERS
STEP_TITLES = {layout.TEACHER: "MS teacher", layout.MATCHER: "Matcher", layout.PAIRS: "Pairing",
               layout.BASELINE: "Baseline student (no distillation)", layout.STUDENT: "Distilled student"}
REPORT_FILE = layout.REPORT
CONFIG_FILE = layout.CONFIG

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
 background:#f6f7f9;color:#1f2328;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.25em;margin:32px 0 10px;
 border-bottom:2px solid #d0d7de;padding-bottom:4px}h3{font-size:1.05em;margin:18px 0 8px}
.sub{color:#57606a;font-size:.9em}
table{border-collapse:collapse;background:#fff;margin:6px 0 12px;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:right}
td{white-space:nowrap}
th{background:#eef1f4;font-weight:600}td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#fafbfc}
table.headline td,table.headline th{font-size:1.1em;padding:8px 16px}
.pos{color:#1a7f37;font-weight:600}.neg{color:#cf222e;font-weight:600}
.figs{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
figure{margin:0;background:#fff;border:1px solid #d0d7de;padding:8px}
figure img{max-width:540px;height:auto;display:block}
figure.wide img{max-width:100%}
figcaption{font-size:.85em;color:#57606a;text-align:center;margin-top:4px}
pre{background:#fff;border:1px solid #d0d7de;padding:12px;overflow:auto;font-size:.85em}
.note{color:#57606a;font-style:italic}.warn{color:#9a6700}
"""


@dataclass
class Step:
    """One step folder's metrics.json, or why it could not be read."""

    name: str
    folder: Path
    doc: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def title(self) -> str:
        return STEP_TITLES.get(self.name, self.name)

    def scores(self, split: str) -> dict[str, Any] | None:
        return split_scores(self.doc, split)


def _read_step(run_dir: Path, name: str) -> Step | None:
    folder = run_dir / name
    if not folder.is_dir():
        return None
    path = folder / layout.METRICS
    where = f"{name}/{layout.METRICS}"
    if not os.path.lexists(path):
        return Step(name, folder, error=f"{where} is missing (step not finished?)")
    try:
        doc = read_json(folder, layout.METRICS)
    except (OSError, DataError) as exc:
        return Step(name, folder, error=f"{where} could not be read: {exc}")
    return Step(name, folder, doc=doc)


# -- small HTML helpers ------------------------------------------------------------------

def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A summary value as short text."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if value == int(value) and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 240 else text[:237] + "..."
    return str(value)


def pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "—"


def gain(new: Any, old: Any) -> str:
    """Difference in percentage points, coloured."""
    if not all(isinstance(v, (int, float)) for v in (new, old)):
        return "—"
    points = 100 * (new - old)
    cls = "pos" if points > 0.05 else "neg" if points < -0.05 else ""
    return f'<span class="{cls}">{points:+.1f} pts</span>'


def table(header: list[str], rows: list[list[str]], cls: str = "", left_cols: int = 1) -> str:
    """An HTML table; cells are already-escaped HTML; the first `left_cols` align left."""
    def cells(tag: str, values: list[str]) -> str:
        return "".join(f'<{tag}{" class=l" if i < left_cols else ""}>{v}</{tag}>'
                       for i, v in enumerate(values))
    head = f"<tr>{cells('th', header)}</tr>"
    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    cls_attr = f' class="{cls}"' if cls else ""
    return f"<table{cls_attr}>{head}{body}</table>"


def png_img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{esc(alt)}">'


def figure(data: bytes | None, caption: str, wide: bool = False) -> str:
    if data is None:
        return ""
    cls = ' class="wide"' if wide else ""
    return f"<figure{cls}>{png_img(data, caption)}<figcaption>{esc(caption)}</figcaption></figure>"


def note(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{esc(text)}</p>'


# -- figures from metrics ----------------------------------------------------------------

def _confusion_png(step: Step, split: str, scores: dict[str, Any]) -> bytes | None:
    from .train.evaluate import confusion_png_bytes
    names = scores.get("class_names") or list(scores.get("per_class", {}))
    try:
        return confusion_png_bytes(scores["confusion"], names,
                                   f"{step.title} ({split}): OA {pct(scores['overall_accuracy'])}")
    except (KeyError, TypeError, ValueError):
        # A metrics file without a usable matrix: fall back to the PNG the trainer wrote.
        return _run_png(step.folder, layout.CONFUSION)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_png(folder: Path, name: str) -> bytes | None:
    """A PNG the run wrote, read by the rule for run files (a regular file in its folder,
    never through a link); None when there is none or it is not a PNG."""
    try:
        data = read_regular(folder, name)
    except (OSError, DataError):
        return None
    return data if data.startswith(PNG_SIGNATURE) else None


def _curves_png(step: Step) -> bytes | None:
    from .train.evaluate import curves_png_bytes
    history = step.doc.get("history")
    if not isinstance(history, list):
        return None
    rows = [h for h in history if isinstance(h, dict)]
    try:
        return curves_png_bytes(rows, step.title)
    except (TypeError, ValueError):
        return None


# -- sections ----------------------------------------------------------------------------

def _present(*steps: Step | None) -> list[Step]:
    """The steps this run has, in the order given."""
    return [step for step in steps if step is not None]


def _comparable(baseline: Step | None, student: Step | None) -> tuple[str, dict, dict] | None:
    """The split both students were scored on (test first)."""
    if baseline is None or student is None:
        return None
    for split, _ in SPLITS:
        b, s = baseline.scores(split), student.scores(split)
        if b is not None and s is not None:
            return split, b, s
    return None


def section_headline(baseline: Step | None, student: Step | None) -> str:
    pair = _comparable(baseline, student)
    if pair is not None:
        split, b, s = pair
        rows = [[esc(label), pct(b[key]), pct(s[key]), gain(s[key], b[key])]
                for label, key in (("Overall accuracy", "overall_accuracy"), ("Macro-F1", "macro_f1"))]
        n_text = f"n = {b.get('n', '?')}" if b.get("n") == s.get("n") else \
            f"n = {b.get('n', '?')} / {s.get('n', '?')}"
        return ("<h2>Baseline vs distilled student</h2>"
                f'<p class="sub">Scores on the {esc(split_name(split))} set ({esc(n_text)}). '
                "The baseline is the same student trained on the same RGB labels without the teacher.</p>"
                + table(["", "Baseline", "Distilled student", "Gain"], rows, cls="headline"))
    for step in _present(student, baseline):
        found = held_out(step.doc)
        if found is not None:
            split, scores = found
            rows = [["Overall accuracy", pct(scores["overall_accuracy"])],
                    ["Macro-F1", pct(scores["macro_f1"])]]
            missing = "baseline" if step is student else "distilled student"
            return (f"<h2>{esc(step.title)}</h2>"
                    f'<p class="sub">Scores on the {esc(split_name(split))} set '
                    f"(n = {esc(scores.get('n', '?'))}). No {esc(missing)} scores in this run to compare with.</p>"
                    + table(["", esc(step.title)], [[esc(r[0]), r[1]] for r in rows], cls="headline"))
    return "<h2>Students</h2>" + note("No student scores in this run yet.")


def _per_class_rows(scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    per_class = scores.get("per_class")
    return per_class if isinstance(per_class, dict) else {}


def section_per_class(baseline: Step | None, student: Step | None) -> str:
    pair = _comparable(baseline, student)
    if pair is None:
        return ""
    split, b, s = pair
    bp, sp = _per_class_rows(b), _per_class_rows(s)
    names = list(dict.fromkeys(list(bp) + list(sp)))
    rows = []
    for name in names:
        brow, srow = bp.get(name, {}), sp.get(name, {})
        rows.append([esc(name), fmt(srow.get("support", brow.get("support"))),
                     pct(brow.get("precision")), pct(brow.get("recall")), pct(brow.get("f1")),
                     pct(srow.get("precision")), pct(srow.get("recall")), pct(srow.get("f1")),
                     gain(srow.get("f1"), brow.get("f1"))])
    header = ["Class", "Support", "Baseline precision", "Baseline recall", "Baseline F1",
              "Student precision", "Student recall", "Student F1", "F1 gain"]
    return (f"<h2>Per class ({esc(split_name(split))} set)</h2>" + table(header, rows))


def section_confusions(baseline: Step | None, student: Step | None) -> str:
    figs = []
    for step in _present(baseline, student):
        found = held_out(step.doc)
        if found is not None:
            split, scores = found
            figs.append(figure(_confusion_png(step, split, scores),
                               f"{step.title}, {split_name(split)} set (rows: true class; colour: share of row)"))
    figs = [f for f in figs if f]
    if not figs:
        return ""
    return '<h2>Confusion matrices</h2><div class="figs">' + "".join(figs) + "</div>"


def section_scores_overview(steps: list[Step]) -> str:
    rows = []
    for step in steps:
        for split, label in SPLITS:
            scores = step.scores(split)
            if scores is not None:
                rows.append([esc(step.title), esc(label), fmt(scores.get("n")),
                             pct(scores.get("overall_accuracy")), pct(scores.get("macro_f1"))])
    if not rows:
        return ""
    return ("<h2>All scores</h2>"
            + table(["Step", "Set", "n", "Overall accuracy", "Macro-F1"], rows, left_cols=2))


def section_curves(steps: list[Step]) -> str:
    figs = [figure(_curves_png(step), f"{step.title}: training curves", wide=True) for step in steps]
    figs = [f for f in figs if f]
    if not figs:
        return ""
    return '<h2>Training curves</h2><div class="figs">' + "".join(figs) + "</div>"


def summary_table(summary: Any) -> str:
    if not isinstance(summary, dict) or not summary:
        return ""
    rows = [[esc(key), esc(fmt(value))] for key, value in summary.items()]
    return table(["Key", "Value"], rows)


FINAL_PAIRS_PREFIX = "final_pairs_"


def section_pairing(matcher: Step | None, pairs: Step | None, student: Step | None = None) -> str:
    parts = []
    for step in (pairs, matcher):
        if step is None:
            continue
        parts.append(f"<h3>{esc(step.title)}</h3>")
        if step.error:
            parts.append(note(step.error, "warn"))
            continue
        parts.append(summary_table(step.doc.get("summary"))
                     or note("No summary recorded for this step."))
    # The distillation re-pairs as it trains; its last pairing is in the student's summary.
    summary = student.doc.get("summary") if student is not None else None
    if isinstance(summary, dict):
        final = {k[len(FINAL_PAIRS_PREFIX):]: v for k, v in summary.items()
                 if k.startswith(FINAL_PAIRS_PREFIX)}
        if final:
            parts.append("<h3>Pairs at the end of distillation (after re-pairing)</h3>"
                         + summary_table(final))
    if not parts:
        return ""
    return ("<h2>Matcher and pairing</h2>"
            '<p class="sub">How RGB samples were paired with MS samples: a balanced pairing uses '
            "many distinct MS samples and no MS sample takes a large share of the RGB set.</p>"
            + "".join(parts))


def section_teacher(teacher: Step | None) -> str:
    if teacher is None:
        return ""
    parts = ["<h2>MS teacher</h2>"]
    if teacher.error:
        return parts[0] + note(teacher.error, "warn")
    figs = []
    for split, label in SPLITS:
        scores = teacher.scores(split)
        if scores is None:
            continue
        parts.append(f"<h3>{esc(label.capitalize())} set: OA {pct(scores['overall_accuracy'])}, "
                     f"macro-F1 {pct(scores.get('macro_f1'))} (n = {esc(fmt(scores.get('n')))})</h3>")
        rows = [[esc(name), pct(r.get("precision")), pct(r.get("recall")), pct(r.get("f1")),
                 fmt(r.get("support"))] for name, r in _per_class_rows(scores).items()]
        if rows:
            parts.append(table(["Class", "Precision", "Recall", "F1", "Support"], rows))
        figs.append(figure(_confusion_png(teacher, split, scores), f"MS teacher, {label} set"))
    figs = [f for f in figs if f]
    if figs:
        parts.append('<div class="figs">' + "".join(figs) + "</div>")
    summary = summary_table(teacher.doc.get("summary"))
    if summary:
        parts.append("<h3>Summary</h3>" + summary)
    if len(parts) == 1:
        parts.append(note("No teacher scores recorded."))
    return "".join(parts)


def section_student_summaries(baseline: Step | None, student: Step | None) -> str:
    parts = []
    for step in _present(baseline, student):
        summary = step.doc.get("summary")
        if isinstance(summary, dict):
            summary = {k: v for k, v in summary.items() if not k.startswith(FINAL_PAIRS_PREFIX)}
            if summary:
                parts.append(f"<h3>{esc(step.title)}</h3>" + summary_table(summary))
    return "<h2>Student training summaries</h2>" + "".join(parts) if parts else ""


def section_config(run_dir: Path) -> str:
    if not os.path.lexists(run_dir / CONFIG_FILE):
        return "<h2>Resolved configuration</h2>" + note(f"No {CONFIG_FILE} in the run folder.")
    try:
        text = read_regular(run_dir, CONFIG_FILE).decode("utf-8", errors="replace")
    except (OSError, DataError) as exc:
        return "<h2>Resolved configuration</h2>" + note(f"{CONFIG_FILE} could not be read: {exc}", "warn")
    return f"<h2>Resolved configuration</h2><pre>{esc(text)}</pre>"


# -- the page ----------------------------------------------------------------------------

def build_report_html(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    found = {name: _read_step(run_dir, name) for name in STEPS}
    steps = [s for s in found.values() if s is not None]
    problems = "".join(note(s.error, "warn") for s in steps if s.error)
    baseline, student = found[layout.BASELINE], found[layout.STUDENT]
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    present = ", ".join(s.name for s in steps) or "none"
    body = "".join([
        f"<h1>AsymKD run: {esc(run_dir.resolve().name)}</h1>",
        f'<p class="sub">{esc(run_dir.resolve())} · generated {esc(generated)} · steps: {esc(present)}</p>',
        problems,
        section_headline(baseline, student),
        section_per_class(baseline, student),
        section_confusions(baseline, student),
        section_scores_overview(steps),
        section_curves(steps),
        section_pairing(found[layout.MATCHER], found[layout.PAIRS], student),
        section_teacher(found[layout.TEACHER]),
        section_student_summaries(baseline, student),
        section_config(run_dir),
    ])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>AsymKD report: {esc(run_dir.resolve().name)}</title>"
            f"<style>{CSS}</style></head><body><main>{body}</main></body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.html from the run folder's config and metrics; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder {run_dir} does not exist",
                        "give the --out folder of a run (it holds config.yaml and the step folders)")
    path = run_dir / REPORT_FILE
    atomic_write_text(path, build_report_html(run_dir))
    return path
