"""Which scores of a step's metrics.json stand for its model: the held-out ones, on the test
set where the step had one, else on the validation set (`held_out`). The run's last lines,
the `distill` command and the report all say the same number this way."""

from __future__ import annotations

from typing import Any, Mapping

# (key in metrics.json, name in words), the preferred split first
SPLITS = (("test", "test"), ("val", "validation"))
SCORE_KEYS = ("overall_accuracy", "macro_f1")


def split_scores(metrics: Mapping[str, Any], split: str) -> dict[str, Any] | None:
    """The scores of one split of a metrics.json object; None where it holds none (a step
    without that split, or a damaged entry)."""
    value = metrics.get(split)
    return value if isinstance(value, dict) and all(k in value for k in SCORE_KEYS) else None


def held_out(metrics: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(split key, scores): the test scores, else the validation scores; None with neither."""
    for split, _ in SPLITS:
        scores = split_scores(metrics, split)
        if scores is not None:
            return split, scores
    return None


def split_name(split: str) -> str:
    """A split's name in words: test, validation."""
    return dict(SPLITS).get(split, split)
