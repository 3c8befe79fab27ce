"""Step 1: the MS teacher (cross-entropy on labeled MS patches), frozen afterwards.

Besides the teacher itself this step writes out-of-fold soft labels: each MS patch's
class probabilities from a teacher that did not train on it. A teacher's outputs on its own
training patches are nearly one-hot (it memorises them), so they carry little beyond the
label; out-of-fold outputs keep the class similarities the student should learn.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import layout
from ..config import ClassifierConfig, DistillConfig, TeacherConfig
from ..data.patches import PatchSet, content_identity, require_classes
from ..fileio import atomic_save_npz, read_npz
from ..models.backbones import SceneClassifier, weights_source
from ..models.metadata import ModelMeta
from . import common, distributed, loop, seeds
from .classifier import ClassifierTask
from .common import TrainContext
from .evaluate import classification_metrics, predict_probs
from .objectives import SupervisedObjective
from .outputs import Trained


@dataclass
class FitResult:
    model: SceneClassifier
    history: list[dict]
    epochs: int


def start_source(section: ClassifierConfig) -> str:
    """Where a config section's backbone starts from: file, bundled, hub or scratch."""
    return weights_source(section.backbone, section.pretrained, section.weights)


def auto_epochs(section: ClassifierConfig, n: int) -> int:
    """Configured epochs, or when 0 (auto) 30 for a pretrained start and 80 from scratch,
    more where a small set would give fewer than `min_steps` optimiser steps."""
    return common.epochs_for(section.epochs, section.min_steps, loop.steps_per_epoch(n, section.batch_size),
                             auto_floor=80 if start_source(section) == "scratch" else 30)


def auto_shift(section: DistillConfig, patch_size: int) -> int:
    """Configured translation, or when -1 (auto) an eighth of the patch from scratch (a net
    that learns its filters from a few hundred patches gains from it: 8 px of 64) and none
    for a pretrained start."""
    if section.shift >= 0:
        return section.shift
    return patch_size // 8 if start_source(section) == "scratch" else 0


def build_classifier(section: ClassifierConfig, in_chans: int, num_classes: int,
                     band_names: list[str] | None, device: torch.device) -> SceneClassifier:
    """The classifier a config section describes, started from its weights, on `device`."""
    model = SceneClassifier(section.backbone, in_chans, num_classes, weights=section.weights,
                            input_size=section.input_size, pretrained=section.pretrained, band_names=band_names)
    return common.prepare_model(model, device)


def fit_classifier(x: torch.Tensor, y: torch.Tensor, section: ClassifierConfig, num_classes: int,
                   ctx: TrainContext, gen: torch.Generator, step: str,
                   checkpoint: common.Checkpoint | None = None, band_names: list[str] | None = None,
                   data_parallel: bool = True) -> FitResult:
    """Plain supervised training with dihedral augmentation and label smoothing (under
    torchrun over all ranks, or with `data_parallel=False` on this rank alone)."""
    model = build_classifier(section, x.shape[1], num_classes, band_names, ctx.device)
    task = ClassifierTask(model, SupervisedObjective(1.0, section.label_smoothing), x, y, np.arange(len(x)),
                          ctx.device, ctx.amp)
    epochs = auto_epochs(section, len(x))
    data = content_identity(x, y) if checkpoint is not None else None  # what a resumed run trains on
    settings = loop.LoopSettings(step, epochs, section.batch_size, section.lr, section.weight_decay, checkpoint,
                                 ctx.checkpoint_every, resume=ctx.resume,
                                 fingerprint={"config": asdict(section), "samples": len(x), "data": data},
                                 data_parallel=data_parallel)
    history = loop.fit(task, len(x), settings, gen, ctx.events)
    return FitResult(task.final_model().to(ctx.device), history, epochs)


def _finished_folds(fold_file: Path) -> dict[str, np.ndarray]:
    return read_npz(fold_file.parent, fold_file.name) if fold_file.is_file() else {}


def _fold_soft_labels(section: TeacherConfig, ms: PatchSet, x: torch.Tensor, y: torch.Tensor,
                      folds: list[np.ndarray], stats: tuple[list[float], list[float]], fold_file: Path,
                      ctx: TrainContext) -> np.ndarray:
    """Out-of-fold soft labels. Under torchrun the folds go one per rank (each trained as
    one process would, so the soft labels are the one process's); folds left over when the
    ranks outnumber them are trained data-parallel."""
    mean, std = stats
    # rank 0's finished folds (read there alone: the others take its copy)
    done = distributed.main_value(_finished_folds, fold_file) if ctx.resume else {}
    data = content_identity(x, y)
    if done and str(done.get("data", "")) != data:  # folds of other data are not mixed in
        raise common.data_changed(fold_file)
    done["data"] = np.array(data)

    def train_fold(f: int, data_parallel: bool) -> np.ndarray:
        held = folds[f]
        train_idx = np.setdiff1d(np.arange(len(ms)), held)
        fit = fit_classifier(x[train_idx], y[train_idx], section, len(ms.class_names), ctx,
                             ctx.generator(seeds.TEACHER_FOLD, f), f"teacher fold {f + 1}/{len(folds)}",
                             band_names=ms.band_names, data_parallel=data_parallel)
        return np.asarray(predict_probs(fit.model, ms.images[held], mean, std, ctx.device, tta=True), np.float32)

    def keep(new: dict[str, np.ndarray]) -> None:
        done.update(new)
        if new:  # every rank alike; a killed run keeps the folds it finished
            distributed.on_main(atomic_save_npz, fold_file, **done)

    world = distributed.world()
    solo = len(folds) - len(folds) % world if world > 1 else 0
    for first in range(0, solo, world):
        f = first + distributed.rank()
        mine = {} if f"fold{f}" in done else {f"fold{f}": train_fold(f, data_parallel=False)}
        keep({k: v for part in distributed.gather(mine) for k, v in part.items()})
    for f in range(solo, len(folds)):
        if f"fold{f}" not in done:
            keep({f"fold{f}": train_fold(f, data_parallel=True)})
    soft = np.zeros((len(ms), len(ms.class_names)), dtype=np.float32)
    for f, held in enumerate(folds):
        soft[held] = done[f"fold{f}"]
    return soft


def _refuse_other_data(checkpoint: common.Checkpoint, data: str) -> None:
    """Refuse, before the folds train rather than after them, a checkpoint of other data
    (rank 0 reads it; every rank refuses alike)."""
    stored = distributed.main_value(checkpoint.stored_data)
    if stored is not None and stored != data:
        raise common.data_changed(checkpoint.path)


def train_teacher(section: TeacherConfig, ms: PatchSet, work_dir: Path, ctx: TrainContext) -> Trained:
    """Train the teacher (and out-of-fold teachers) on all labeled MS patches. `work_dir`
    holds the resumable state (checkpoint, finished folds); the model, its metadata, the
    soft labels, the MS index and the metrics are returned for `outputs.write_outputs`."""
    require_classes(ms)
    work_dir = Path(work_dir)
    ms = ms.subset(np.flatnonzero(ms.labeled))
    if distributed.world() > 1:  # before any fold trains
        loop.check_ranks(len(ms), section.batch_size, "teacher")
    mean, std = common.band_stats(ms.images)
    x = common.normalize(ms.images, mean, std)
    y = torch.as_tensor(ms.labels)
    folds = common.kfold_indices(ms.labels, section.folds, ctx.seed) if section.folds >= 2 else []
    checkpoint = common.Checkpoint(work_dir / layout.CHECKPOINT)
    if ctx.resume:
        _refuse_other_data(checkpoint, content_identity(x, y))
    soft = _fold_soft_labels(section, ms, x, y, folds, (mean, std), work_dir / layout.FOLDS, ctx)
    # the final teacher draws from the run's seed itself (see `seeds`)
    fit = fit_classifier(x, y, section, len(ms.class_names), ctx, common.generator(ctx.seed), "teacher",
                         checkpoint, band_names=ms.band_names)
    if not folds:  # no folds: in-sample soft labels (memorised, weaker)
        soft = predict_probs(fit.model, ms.images, mean, std, ctx.device, tta=True)
    return _teacher_outputs(section, ms, fit, soft, bool(folds), (mean, std))


def _teacher_outputs(section: TeacherConfig, ms: PatchSet, fit: FitResult, soft: np.ndarray, out_of_fold: bool,
                     stats: tuple[list[float], list[float]]) -> Trained:
    mean, std = stats
    summary: dict[str, Any] = {"ms_samples": len(ms), "classes": len(ms.class_names), "folds": section.folds,
                               "out_of_fold_accuracy": float((soft.argmax(1) == ms.labels).mean())
                               if out_of_fold else None,
                               "soft_label_confidence": float(soft.max(1).mean())}
    meta = ModelMeta(backbone=fit.model.backbone_name, class_names=ms.class_names, band_names=ms.band_names,
                     mean=mean, std=std, patch_size=ms.size, gsd=ms.gsd, role="teacher", kind="teacher",
                     weights_source=start_source(section), summary=summary)
    val = classification_metrics(ms.labels, soft.argmax(1), ms.class_names) if out_of_fold else None
    metrics = {"step": "teacher", "val": val, "history": fit.history, "summary": summary}
    index = json.dumps({"stems": ms.stems, "paths": ms.paths, "labels": ms.labels.tolist()})
    return Trained("teacher", fit.model.cpu(), meta, metrics, summary,
                   files={layout.SOFT_LABELS: np.asarray(soft), layout.MS_INDEX: index}, scratch=(layout.FOLDS,))
