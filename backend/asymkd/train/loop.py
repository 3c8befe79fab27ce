"""The one training loop: epochs, optimiser and schedule, resume, checkpoints, history and
progress events. Every trainer (teacher, matcher, student, baseline) fills in a `Task`:
what one batch costs (named loss terms), what happens after a step and after an epoch,
and what extra state a checkpoint must carry.

Under torchrun the same loop runs data-parallel (see `distributed`): `batch_size` stays the
global batch, every rank trains on its slice of it, and rank 0 alone writes checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import DataError
from ..events import Events
from . import common, distributed


class Task:
    """A training job for `fit`. Subclasses set `modules` (trained, checkpointed) and
    implement `batch_terms`; the hooks are optional."""

    modules: dict[str, nn.Module]
    shard = distributed.Shard()      # this rank's slice of each batch; set by `fit`
    unused_parameters = False        # whether some trained parameter may get no gradient in a step

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
    data_parallel: bool = True      # under torchrun: split each batch over the ranks (else this rank alone)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return len(common.batches(n, batch_size, torch.Generator()))


def check_ranks(n_samples: int, batch_size: int, step: str) -> None:
    """Under torchrun: refuse (on every rank alike) a split that leaves a rank without samples."""
    sizes = [len(b) for b in common.batches(n_samples, batch_size, torch.Generator())]
    distributed.check_split(sizes, n_samples, step)


def _resume(task: Task, settings: LoopSettings, state_modules: dict[str, Any], gen: torch.Generator,
            fingerprint: str, events: Events) -> tuple[int, list[dict[str, Any]]]:
    """The epoch to start at and the history so far: from the checkpoint when resuming (every
    rank loads rank 0's: the decision is rank 0's too)."""
    ckpt = settings.checkpoint
    if ckpt is None or not settings.resume:
        return 0, []
    found = ckpt.exists() if task.shard.world == 1 else distributed.from_main(ckpt.exists())
    if not found:
        return 0, []
    start, extra = ckpt.load(state_modules, gen, fingerprint)
    history = json.loads(extra.pop("history", "[]"))
    task.load_state(extra)
    events.log(f"{settings.step}: resumed at epoch {start}")
    return start, history


def _epoch(task: Task, step_fn: Callable[..., dict[str, torch.Tensor]], n_samples: int, settings: LoopSettings,
           epoch: int, per_epoch: int, opt: Any, sched: Any, gen: torch.Generator) -> dict[str, float]:
    """One epoch of optimiser steps; returns the mean of each loss term over the global batches."""
    shard = task.shard
    sums: dict[str, float] = {}
    for i, index in enumerate(common.batches(n_samples, settings.batch_size, gen)):
        terms = step_fn(index, gen)
        weight = shard.weight(len(index))  # this rank's share of the global batch (1 in one process)
        loss = float(terms["loss"].detach())
        if shard.world > 1:  # every rank sees the global loss, so all stop together
            loss = distributed.all_mean([loss * weight])[0]
        if not math.isfinite(loss):
            raise DataError(f"{settings.step}: the training loss became {loss} at epoch {epoch + 1}",
                            "check the data for extreme values and lower the learning rate (lr)")
        common.optimiser_step(terms["loss"] if shard.world == 1 else terms["loss"] * weight, opt, sched)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * weight
        task.after_step(epoch * per_epoch + i + 1)
    if shard.world > 1:
        sums = dict(zip(sums, distributed.all_mean(list(sums.values())), strict=True))
        distributed.sync_buffers(task.modules)  # validation and checkpoints see rank 0's statistics
    return {n: s / per_epoch for n, s in sums.items()}


def fit(task: Task, n_samples: int, settings: LoopSettings, gen: torch.Generator,
        events: Events) -> list[dict[str, Any]]:
    """Train `task` over `n_samples` sample indices; returns the per-epoch history."""
    per_epoch = steps_per_epoch(n_samples, settings.batch_size)
    total = settings.epochs * per_epoch
    task.shard = distributed.shard() if settings.data_parallel else distributed.Shard()
    if task.shard.world > 1:
        check_ranks(n_samples, settings.batch_size, settings.step)
    params = [p for m in task.modules.values() for p in m.parameters() if p.requires_grad]
    opt, sched = common.optimizer_and_schedule(params, settings.lr, settings.weight_decay, total)
    state_modules: dict[str, Any] = {**task.modules, "opt": opt, "sched": sched}
    fingerprint = json.dumps(settings.fingerprint, sort_keys=True, default=str)
    start, history = _resume(task, settings, state_modules, gen, fingerprint, events)
    step_fn = task.batch_terms if task.shard.world == 1 else \
        distributed.data_parallel(task.modules, task.batch_terms, task.unused_parameters)
    ckpt = settings.checkpoint if distributed.is_main() else None  # rank 0 alone writes
    started = time.time()
    for epoch in range(start, settings.epochs):
        task.train()
        epoch_start = time.perf_counter()
        means = _epoch(task, step_fn, n_samples, settings, epoch, per_epoch, opt, sched, gen)
        record: dict[str, Any] = {"epoch": epoch + 1, **{f"train_{n}": v for n, v in means.items()},
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
