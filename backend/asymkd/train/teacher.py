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

import numpy as np
import torch

from .. import layout
from ..config import ClassifierConfig, DistillConfig, RunConfig
from ..data.patches import PatchSet, content_identity, require_classes
from ..errors import ConfigError
from ..events import NULL_EVENTS, Events
from ..fileio import atomic_save_npy, atomic_save_npz, atomic_write_text, read_npz
from ..models.backbones import SceneClassifier, weights_source
from ..models.files import save_model
from ..models.metadata import ModelMeta
from . import common, distributed, loop
from .classifier import ClassifierTask
from .evaluate import classification_metrics, predict_probs, write_metrics_json
from .objectives import SupervisedObjective


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


def fit_classifier(x: torch.Tensor, y: torch.Tensor, cfg: ClassifierConfig, num_classes: int,
                   device: torch.device, gen: torch.Generator, events: Events, step: str,
                   amp: bool = True, checkpoint: common.Checkpoint | None = None,
                   resume: bool = False, band_names: list[str] | None = None,
                   data_parallel: bool = True) -> FitResult:
    """Plain supervised training with dihedral augmentation and label smoothing (under
    torchrun over all ranks, or with `data_parallel=False` on this rank alone)."""
    model = build_classifier(cfg, x.shape[1], num_classes, band_names, device)
    task = ClassifierTask(model, SupervisedObjective(1.0, cfg.label_smoothing), x, y, np.arange(len(x)),
                          device, amp)
    epochs = auto_epochs(cfg, len(x))
    data = content_identity(x, y) if checkpoint is not None else None  # what a resumed run trains on
    settings = loop.LoopSettings(step, epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, checkpoint,
                                 resume=resume, fingerprint={"config": asdict(cfg), "samples": len(x), "data": data},
                                 data_parallel=data_parallel)
    history = loop.fit(task, len(x), settings, gen, events)
    return FitResult(task.final_model().to(device), history, epochs)


def _fold_soft_labels(cfg: RunConfig, ms: PatchSet, x: torch.Tensor, y: torch.Tensor, folds: list[np.ndarray],
                      stats: tuple[list[float], list[float]], device: torch.device, fold_file: Path,
                      events: Events, resume: bool) -> np.ndarray:
    """Out-of-fold soft labels. Under torchrun the folds go one per rank (each trained as
    one process would, so the soft labels are the one process's); folds left over when the
    ranks outnumber them are trained data-parallel."""
    mean, std = stats
    # rank 0's finished folds (read there alone: the others take its copy)
    done = distributed.from_main(read_npz(fold_file.parent, fold_file.name)
                                 if distributed.is_main() and resume and fold_file.is_file() else {})
    data = content_identity(x, y)
    if done and str(done.get("data", "")) != data:  # folds of other data are not mixed in
        raise common.data_changed(fold_file)
    done["data"] = np.array(data)

    def train_fold(f: int, data_parallel: bool) -> np.ndarray:
        held = folds[f]
        train_idx = np.setdiff1d(np.arange(len(ms)), held)
        gen = common.generator(cfg.seed * 1000 + f + 1)
        fit = fit_classifier(x[train_idx], y[train_idx], cfg.teacher, len(ms.class_names), device, gen, events,
                             f"teacher fold {f + 1}/{len(folds)}", cfg.amp, band_names=ms.band_names,
                             data_parallel=data_parallel)
        return np.asarray(predict_probs(fit.model, ms.images[held], mean, std, device, tta=True), np.float32)

    def keep(new: dict[str, np.ndarray]) -> None:
        done.update(new)
        if new and distributed.is_main():
            atomic_save_npz(fold_file, **done)  # a killed run keeps the folds it finished

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


def train_teacher(cfg: RunConfig, ms: PatchSet, out_dir: Path, events: Events = NULL_EVENTS,
                  resume: bool = False) -> dict:
    """Train the teacher (and out-of-fold teachers) on all labeled MS patches; write
    out_dir/{model.safetensors, meta.json, soft_labels.npy, metrics.json}."""
    require_classes(ms)
    out_dir = Path(out_dir)
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    device = common.resolve_device(cfg.device)
    labeled = np.flatnonzero(ms.labeled)
    ms = ms.subset(labeled)
    if distributed.world() > 1:  # before any fold trains
        loop.check_ranks(len(ms), cfg.teacher.batch_size, "teacher")
    mean, std = common.band_stats(ms.images)
    x = common.normalize(ms.images, mean, std)
    y = torch.as_tensor(ms.labels)
    k = len(ms.class_names)
    tc = cfg.teacher
    folds = common.kfold_indices(ms.labels, tc.folds, cfg.seed) if tc.folds >= 2 else []
    fold_file = out_dir / layout.FOLDS
    if resume:  # before the folds train: a checkpoint of other data is refused now, not after them
        refusal = None
        if distributed.is_main():
            stored = common.Checkpoint(out_dir / layout.CHECKPOINT).stored_data()
            if stored is not None and stored != content_identity(x, y):
                error = common.data_changed(out_dir / layout.CHECKPOINT)
                refusal = (error.message, error.hint)
        refusal = distributed.from_main(refusal)  # every rank alike
        if refusal is not None:
            raise ConfigError(*refusal)
    soft = _fold_soft_labels(cfg, ms, x, y, folds, (mean, std), device, fold_file, events, resume)
    gen = common.generator(cfg.seed)
    fit = fit_classifier(x, y, tc, k, device, gen, events, "teacher", cfg.amp,
                         common.Checkpoint(out_dir / layout.CHECKPOINT), resume, band_names=ms.band_names)
    if not distributed.is_main():  # rank 0 writes the teacher
        return {}
    if not folds:  # no folds: in-sample soft labels (memorised, weaker)
        soft = predict_probs(fit.model, ms.images, mean, std, device, tta=True)
    oof_acc = float((soft.argmax(1) == ms.labels).mean())
    summary = {"ms_samples": len(ms), "classes": k, "folds": tc.folds,
               "out_of_fold_accuracy": oof_acc if folds else None,
               "soft_label_confidence": float(soft.max(1).mean())}
    meta = ModelMeta(backbone=fit.model.backbone_name, class_names=ms.class_names, band_names=ms.band_names,
                     mean=mean, std=std, patch_size=ms.size, gsd=ms.gsd, role="teacher", kind="teacher",
                     weights_source=start_source(tc), summary=summary)
    save_model(out_dir, fit.model.cpu(), meta)
    atomic_save_npy(out_dir / layout.SOFT_LABELS, soft)
    atomic_write_text(out_dir / layout.MS_INDEX, json.dumps({"stems": ms.stems, "paths": ms.paths,
                                                            "labels": ms.labels.tolist()}))
    val = None
    if folds:
        val = classification_metrics(ms.labels, soft.argmax(1), ms.class_names)
    metrics = {"step": "teacher", "val": val, "history": fit.history, "summary": summary}
    write_metrics_json(out_dir / layout.METRICS, metrics)
    common.Checkpoint(out_dir / layout.CHECKPOINT).remove()
    fold_file.unlink(missing_ok=True)
    events.metrics("teacher", summary)
    return metrics

