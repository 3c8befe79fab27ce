"""Step 1: the MS teacher (cross-entropy on labeled MS patches), frozen afterwards.

Besides the teacher itself this step writes out-of-fold soft labels: each MS patch's
class probabilities from a teacher that did not train on it. A teacher's outputs on its own
training patches are nearly one-hot (it memorises them), so they carry little beyond the
label; out-of-fold outputs keep the class similarities the student should learn.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..config import RunConfig, TeacherConfig
from ..data.patches import PatchSet, require_classes
from ..events import NULL_EVENTS, Events
from ..models.backbones import SceneClassifier
from ..models.files import atomic_write_text, save_model
from . import common
from .evaluate import classification_metrics, write_metrics_json


@dataclass
class FitResult:
    model: SceneClassifier
    history: list[dict]


def fit_classifier(x: torch.Tensor, y: torch.Tensor, cfg: TeacherConfig, num_classes: int,
                   device: torch.device, gen: torch.Generator, events: Events, step: str,
                   amp: bool = True, checkpoint: common.Checkpoint | None = None,
                   resume: bool = False) -> FitResult:
    """Plain supervised training with dihedral augmentation and label smoothing."""
    model = common.prepare_model(SceneClassifier(cfg.backbone, x.shape[1], num_classes,
                                                 weights=cfg.weights), device)
    steps_per_epoch = len(common.batches(len(x), cfg.batch_size, torch.Generator()))
    epochs = common.epochs_for(cfg.epochs, cfg.min_steps, steps_per_epoch, auto_floor=40)
    opt, sched = common.optimizer_and_schedule(model.parameters(), cfg.lr, cfg.weight_decay,
                                               epochs * steps_per_epoch)
    start_epoch, history = 0, []
    if checkpoint is not None and resume and checkpoint.exists():
        start_epoch, extra = checkpoint.load({"model": model, "opt": opt, "sched": sched}, gen)
        history = json.loads(extra.get("history", "[]"))
        events.log(f"{step}: resumed at epoch {start_epoch}")
    total = epochs * steps_per_epoch
    started = time.time()
    for epoch in range(start_epoch, epochs):
        model.train()
        losses = []
        for b in common.batches(len(x), cfg.batch_size, gen):
            xb = common.dihedral(x[b], gen).to(device)
            yb = y[b].to(device)
            with common.autocast(device, amp):
                loss = F.cross_entropy(model(xb).float(), yb, label_smoothing=cfg.label_smoothing)
            losses.append(common.optimiser_step(loss, opt, sched))
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses))})
        events.progress(step, (epoch + 1) * steps_per_epoch, total, started, unit="step",
                        epoch=epoch + 1, loss=history[-1]["train_loss"])
        if checkpoint is not None:
            checkpoint.save(epoch + 1, {"model": model, "opt": opt, "sched": sched}, gen,
                            {"history": json.dumps(history)})
    return FitResult(model.eval(), history)


def train_teacher(cfg: RunConfig, ms: PatchSet, out_dir: Path, events: Events = NULL_EVENTS,
                  resume: bool = False) -> dict:
    """Train the teacher (and out-of-fold teachers) on all labeled MS patches; write
    out_dir/{model.safetensors, meta.json, soft_labels.npy, metrics.json}."""
    require_classes(ms)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = common.resolve_device(cfg.device)
    labeled = np.flatnonzero(ms.labeled)
    ms = ms.subset(labeled)
    mean, std = common.band_stats(ms.images)
    x = common.normalize(ms.images, mean, std)
    y = torch.as_tensor(ms.labels)
    k = len(ms.class_names)
    tc = cfg.teacher
    soft = np.zeros((len(ms), k), dtype=np.float32)
    folds = common.kfold_indices(ms.labels, tc.folds, cfg.seed) if tc.folds >= 2 else []
    fold_file = out_dir / "folds.npz"
    done = dict(np.load(fold_file)) if resume and fold_file.is_file() else {}
    for f, held in enumerate(folds):
        key = f"fold{f}"
        if key in done:
            soft[held] = done[key]
            continue
        train_idx = np.setdiff1d(np.arange(len(ms)), held)
        gen = common.generator(cfg.seed * 1000 + f + 1)
        fit = fit_classifier(x[train_idx], y[train_idx], tc, k, device, gen, events,
                             f"teacher fold {f + 1}/{len(folds)}", cfg.amp)
        logp = common.predict_logits(fit.model, x[held], device, amp=cfg.amp, tta=True)
        soft[held] = logp.exp().numpy()
        done[key] = soft[held]
        np.savez(fold_file, **done)  # a killed run keeps the folds it finished
    gen = common.generator(cfg.seed)
    fit = fit_classifier(x, y, tc, k, device, gen, events, "teacher", cfg.amp,
                         common.Checkpoint(out_dir / "checkpoint.pt"), resume)
    if not folds:  # no folds: in-sample soft labels (memorised, weaker)
        soft = common.predict_logits(fit.model, x, device, amp=cfg.amp, tta=True).exp().numpy()
    oof_acc = float((soft.argmax(1) == ms.labels).mean())
    summary = {"ms_samples": len(ms), "classes": k, "folds": tc.folds,
               "out_of_fold_accuracy": oof_acc if folds else None,
               "soft_label_confidence": float(soft.max(1).mean())}
    meta = {"backbone": tc.backbone, "class_names": ms.class_names, "band_names": ms.band_names,
            "mean": mean, "std": std, "patch_size": ms.size, "role": "teacher",
            "gsd": ms.gsd, "summary": summary}
    save_model(out_dir, fit.model.cpu(), meta)
    np.save(out_dir / "soft_labels.npy", soft)
    atomic_write_text(out_dir / "ms_index.json", json.dumps({"stems": ms.stems, "paths": ms.paths,
                                                            "labels": ms.labels.tolist()}))
    val = None
    if folds:
        val = classification_metrics(ms.labels, soft.argmax(1), ms.class_names)
    metrics = {"step": "teacher", "val": val, "history": fit.history, "summary": summary}
    write_metrics_json(out_dir / "metrics.json", metrics)
    common.Checkpoint(out_dir / "checkpoint.pt").remove()
    fold_file.unlink(missing_ok=True)
    events.metrics("teacher", summary)
    return metrics

