"""A scene classifier trained on augmented patches with an objective: the task that the
teacher, the baseline and the distilled student fill into the one training loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..models.backbones import SceneClassifier
from . import common, distributed
from .loop import Task
from .objectives import Batch, SupervisedObjective


@dataclass
class Consistency:
    """FixMatch-style use of unlabeled samples: each batch of labeled samples brings `ratio`
    times as many unlabeled ones; where the model is at least `threshold` sure of a weak
    view, its class is the target of a strong view of the same sample."""

    index: torch.Tensor     # unlabeled sample indices
    ratio: int
    threshold: float
    weight: float


def trained_rows(train_index: np.ndarray, consistency: Consistency | None) -> np.ndarray:
    """Every sample a task trains on: its training rows and, with semi-supervision, the
    unlabeled ones (sorted)."""
    if consistency is None or not len(consistency.index):
        return np.asarray(train_index)
    return np.union1d(train_index, consistency.index.numpy())


class ClassifierTask(Task):
    """Trains `model` on `x[train_index]` (normalised) with `objective`.

    With a validation index the best epoch by validation accuracy is kept (on every rank,
    and in the checkpoint, so a resumed run keeps it too); without one, the last epoch is
    the model.
    """

    def __init__(self, model: SceneClassifier, objective: SupervisedObjective, x: torch.Tensor,
                 y: torch.Tensor, train_index: np.ndarray, device: torch.device, amp: bool,
                 val_index: np.ndarray | None = None,
                 consistency: Consistency | None = None, shift: int = 0,
                 jitter_rows: torch.Tensor | None = None):
        self.model, self.objective = model, objective
        self.shift = shift  # random translation of the labeled view, pixels
        self.jitter_rows = jitter_rows  # rows whose labeled view gets colour jitter (bool per row)
        self.modules: dict[str, nn.Module] = {"model": model}
        attention = getattr(objective, "attention", None)
        if attention is not None:
            self.modules["attention"] = attention
        self.x, self.y = x, y
        self.train_index = torch.as_tensor(train_index, dtype=torch.int64)
        self.val_index = val_index if val_index is not None and len(val_index) else None
        self.device, self.amp = device, amp
        self.best_acc = -1.0
        self.best: dict[str, torch.Tensor] | None = None  # the weights of the best epoch so far
        self.consistency = consistency if consistency is not None and len(consistency.index) else None
        self._rows = torch.as_tensor(trained_rows(train_index, self.consistency), dtype=torch.int64)

    def trained_rows(self) -> torch.Tensor:
        """Every sample this task trains on (labeled and unlabeled)."""
        return self._rows

    def forward_batch(self, index: torch.Tensor, gen: torch.Generator) -> tuple[Batch, dict[str, torch.Tensor]]:
        rows = self.train_index[index]
        views = [common.dihedral(self.x[rows], gen)]
        if self.shift:  # no draw otherwise: runs without it stay bit for bit as they were
            views[0] = common.shift(views[0], gen, self.shift)
        if self.jitter_rows is not None:  # likewise: no draw without it
            sel = self.jitter_rows[rows]
            views[0][sel] = common.colour_jitter(views[0][sel], gen)
        c = self.consistency
        unlabeled = rows[:0]
        if c is not None:  # weak and strong views of unlabeled samples, in the same forward pass
            unlabeled = c.index[torch.randint(0, len(c.index), (len(rows) * c.ratio,), generator=gen)]
            x_u = self.x[unlabeled]
            views += [common.dihedral(x_u, gen), common.strong_augment(x_u, gen)]
        # under torchrun each rank drew the global batch's augmentation and keeps its slice
        take = self.shard.take
        rows, unlabeled, views = take(rows), take(unlabeled), [take(v) for v in views]
        if c is not None:
            rows = torch.cat([rows, unlabeled])
        with common.autocast(self.device, self.amp):
            feats = self.model.forward_features(torch.cat(views).to(self.device))
            logits = self.model.forward_head(feats).float()
        n = len(rows)
        batch = Batch(feats=feats[:n], logits=logits[:n], labels=self.y[rows].to(self.device), index=rows)
        terms = self.objective(batch)
        if c is not None:
            terms.update(consistency_terms(logits[n - len(unlabeled):n], logits[n:], c))
            terms["loss"] = terms["loss"] + terms["unlabeled"]
        return batch, terms

    def batch_terms(self, index: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return self.forward_batch(index, gen)[1]

    def validate(self) -> float | None:
        if self.val_index is None:
            return None
        # under torchrun each rank predicts its slice; the slices' accuracies weighted by their
        # sizes give every rank the same whole-set accuracy, so all ranks choose the same epoch
        index = self.shard.take(torch.as_tensor(self.val_index)).numpy()
        acc = common.accuracy(common.predict_normalised(self.model, self.x[index], self.device, amp=self.amp),
                              self.y[index]) if len(index) else 0.0
        if self.shard.world == 1:
            return acc
        parts = distributed.gather((acc, len(index)))
        return sum(a * n for a, n in parts) / sum(n for _, n in parts)

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        val_acc = self.validate()
        if val_acc is None:
            return
        record["val_accuracy"] = val_acc
        if val_acc >= self.best_acc:  # select on validation, never on test
            self.best_acc = val_acc
            self.best = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def state(self) -> dict[str, Any]:
        # the best weights travel with the checkpoint: a resumed run selects among all epochs
        return {"best_acc": self.best_acc, **({"best": self.best} if self.best is not None else {})}

    def load_state(self, extra: dict[str, Any]) -> None:
        self.best_acc = float(extra.get("best_acc", -1.0))
        self.best = extra.get("best")

    def final_model(self) -> SceneClassifier:
        """The selected model (best validation epoch, else the last), on the CPU in eval mode."""
        if self.val_index is not None and self.best is not None:
            self.model.load_state_dict(self.best)
        return self.model.cpu().eval()


def consistency_terms(weak: torch.Tensor, strong: torch.Tensor, c: Consistency) -> dict[str, torch.Tensor]:
    """FixMatch: CE(strong view, class of the weak view) where the weak view is confident."""
    confidence, target = weak.detach().softmax(-1).max(-1)
    mask = (confidence >= c.threshold).float()
    ce = F.cross_entropy(strong, target, reduction="none")
    return {"unlabeled": c.weight * (ce * mask).mean(), "confident_share": mask.mean()}
