"""The one training loop: epochs, optimiser and schedule, resume, checkpoints, history and
progress events. Every trainer (teacher, matcher, student, baseline) fills in a `Task`:
what one batch costs (named loss terms), what happens after a step and after an epoch,
and what extra state a checkpoint must carry.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import DataError
from ..events import Events
from . import common


class Task:
    """A training job for `fit`. Subclasses set `modules` (trained, checkpointed) and
    implement `batch_terms`; the hooks are optional."""

    modules: dict[str, nn.Module]

    def batch_terms(self, index: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Loss terms of one batch of sample indices; 'loss' is the one optimised."""
        raise NotImplementedError

    def after_step(self, global_step: int) -> None:
        """Called after every optimiser step (re-pairing lives here)."""

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """Called after every epoch with its record (validation adds to it)."""

    def state(self) -> dict[str, Any]:
        """Extra state a checkpoint carries (tensors, numbers, strings)."""
        return {}

    def load_state(self, extra: dict[str, Any]) -> None:
        """Restore what `state` returned."""

    def train(self) -> None:
        for m in self.modules.values():
            m.train()


@dataclass
class LoopSettings:
    step: str                       # name in events and logs
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    checkpoint: common.Checkpoint | None = None
    checkpoint_every: int = 1
    resume: bool = False
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what a resumed run must share


def steps_per_epoch(n: int, batch_size: int) -> int:
    return len(common.batches(n, batch_size, torch.Generator()))


def fit(task: Task, n_samples: int, settings: LoopSettings, gen: torch.Generator,
        events: Events) -> list[dict[str, Any]]:
    """Train `task` over `n_samples` sample indices; returns the per-epoch history."""
    per_epoch = steps_per_epoch(n_samples, settings.batch_size)
    total = settings.epochs * per_epoch
    params = [p for m in task.modules.values() for p in m.parameters() if p.requires_grad]
    opt, sched = common.optimizer_and_schedule(params, settings.lr, settings.weight_decay, total)
    state_modules: dict[str, Any] = {**task.modules, "opt": opt, "sched": sched}
    fingerprint = json.dumps(settings.fingerprint, sort_keys=True, default=str)
    start, history = 0, []
    ckpt = settings.checkpoint
    if ckpt is not None and settings.resume and ckpt.exists():
        start, extra = ckpt.load(state_modules, gen, fingerprint)
        history = json.loads(extra.pop("history", "[]"))
        task.load_state(extra)
        events.log(f"{settings.step}: resumed at epoch {start}")
    started = time.time()
    for epoch in range(start, settings.epochs):
        task.train()
        sums: dict[str, float] = {}
        epoch_start = time.perf_counter()
        for i, index in enumerate(common.batches(n_samples, settings.batch_size, gen)):
            terms = task.batch_terms(index, gen)
            loss = float(terms["loss"].detach())
            if not math.isfinite(loss):
                raise DataError(f"{settings.step}: the training loss became {loss} at epoch {epoch + 1}",
                                "check the data for extreme values and lower the learning rate (lr)")
            common.optimiser_step(terms["loss"], opt, sched)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            task.after_step(epoch * per_epoch + i + 1)
        record: dict[str, Any] = {"epoch": epoch + 1,
                                  **{f"train_{n}": s / per_epoch for n, s in sums.items()},
                                  "lr": sched.get_last_lr()[0],
                                  "epoch_seconds": time.perf_counter() - epoch_start}
        task.end_epoch(epoch + 1, record)
        history.append(record)
        events.progress(settings.step, (epoch + 1) * per_epoch, total, started, unit="step", epoch=epoch + 1,
                        loss=record["train_loss"],
                        **({"val_accuracy": record["val_accuracy"]} if "val_accuracy" in record else {}))
        if ckpt is not None and ((epoch + 1) % settings.checkpoint_every == 0 or epoch + 1 == settings.epochs):
            ckpt.save(epoch + 1, state_modules, gen, {**task.state(), "history": json.dumps(history)},
                      fingerprint)
    return history
