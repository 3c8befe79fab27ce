"""What a trainer hands back, and the one function that stores it in a step's folder.

Trainers only train: every rank of a torchrun job returns the same results, and rank 0
alone writes them (`write_outputs` does nothing on the others). The step's metrics.json
is written last, so it marks a finished step (`run --resume` skips it); the resumable
state (checkpoint, finished folds) is removed after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .. import layout
from ..events import NULL_EVENTS, Events
from ..fileio import atomic_save_npy, atomic_write_text
from ..models.backbones import SceneClassifier
from ..models.files import save_model, save_state
from ..models.metadata import MatcherMeta, ModelMeta
from . import common, distributed
from .evaluate import save_confusion_png, write_metrics_json


@dataclass(frozen=True)
class Confusion:
    """A confusion matrix to draw (confusion.png)."""

    matrix: list[list[int]]
    class_names: list[str]
    title: str


@dataclass
class Trained:
    """A trained model with its metadata and metrics, and the step's other files."""

    step: str                                  # the step's name in the metrics event
    model: nn.Module                           # on the CPU
    meta: ModelMeta | MatcherMeta
    metrics: dict[str, Any]                    # metrics.json
    reported: dict[str, Any]                   # the metrics event
    files: dict[str, np.ndarray | str] = field(default_factory=dict)  # name -> .npy array or text
    confusion: Confusion | None = None
    scratch: tuple[str, ...] = ()              # resumable state besides the checkpoint, removed at the end


def write_outputs(trained: Trained, folder: Path, events: Events = NULL_EVENTS) -> None:
    """Store `trained` in `folder` on rank 0 (in one process: always); nothing elsewhere."""
    if not distributed.is_main():
        return
    folder = Path(folder)
    if isinstance(trained.meta, MatcherMeta):
        save_state(folder / layout.WEIGHTS, trained.model.state_dict())
        atomic_write_text(folder / layout.META, json.dumps(trained.meta.to_json(), indent=2))
    else:
        assert isinstance(trained.model, SceneClassifier)
        save_model(folder, trained.model, trained.meta)
    for name, value in trained.files.items():
        if isinstance(value, np.ndarray):
            atomic_save_npy(folder / name, value)
        else:
            atomic_write_text(folder / name, value)
    if trained.confusion is not None:
        c = trained.confusion
        save_confusion_png(c.matrix, c.class_names, folder / layout.CONFUSION, c.title)
    write_metrics_json(folder / layout.METRICS, trained.metrics)
    common.Checkpoint(folder / layout.CHECKPOINT).remove()
    for name in trained.scratch:
        (folder / name).unlink(missing_ok=True)
    events.metrics(trained.step, trained.reported)
