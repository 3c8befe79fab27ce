"""A scene classifier trained on augmented patches with an objective: the task that the
teacher, the baseline and the distilled student fill into the one training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..models.backbones import SceneClassifier
from ..models.files import save_state
from . import common
from .loop import Task
from .objectives import Batch, SupervisedObjective


class ClassifierTask(Task):
    """Trains `model` on `x[train_index]` (normalised) with `objective`.

    With a validation index the best epoch by validation accuracy is kept (in `best_path`,
    so a resumed run keeps it too); without one, the last epoch is the model.
    """

    def __init__(self, model: SceneClassifier, objective: SupervisedObjective, x: torch.Tensor,
                 y: torch.Tensor, train_index: np.ndarray, device: torch.device, amp: bool,
                 val_index: np.ndarray | None = None, best_path: Path | None = None):
        self.model, self.objective = model, objective
        self.modules: dict[str, nn.Module] = {"model": model}
        attention = getattr(objective, "attention", None)
        if attention is not None:
            self.modules["attention"] = attention
        self.x, self.y = x, y
        self.train_index = torch.as_tensor(train_index, dtype=torch.int64)
        self.val_index = val_index if val_index is not None and len(val_index) else None
        self.device, self.amp = device, amp
        self.best_path = best_path
        self.best_acc = -1.0

    def forward_batch(self, index: torch.Tensor, gen: torch.Generator) -> tuple[Batch, dict[str, torch.Tensor]]:
        b = self.train_index[index]
        xb = common.dihedral(self.x[b], gen).to(self.device)
        with common.autocast(self.device, self.amp):
            feats = self.model.forward_features(xb)
            logits = self.model.forward_head(feats).float()
        batch = Batch(feats=feats, logits=logits, labels=self.y[b].to(self.device), index=b)
        return batch, self.objective(batch)

    def batch_terms(self, index: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return self.forward_batch(index, gen)[1]

    def validate(self) -> float | None:
        if self.val_index is None:
            return None
        logits = common.predict_logits(self.model, self.x[self.val_index], self.device, amp=self.amp)
        return common.accuracy(logits, self.y[self.val_index])

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        val_acc = self.validate()
        if val_acc is None:
            return
        record["val_accuracy"] = val_acc
        if val_acc >= self.best_acc and self.best_path is not None:  # select on validation, never on test
            self.best_acc = val_acc
            save_state(self.best_path, self.model.state_dict())

    def state(self) -> dict[str, Any]:
        return {"best_acc": self.best_acc}

    def load_state(self, extra: dict[str, Any]) -> None:
        self.best_acc = float(extra.get("best_acc", -1.0))

    def final_model(self) -> SceneClassifier:
        """The selected model (best validation epoch, else the last), on the CPU in eval mode."""
        if self.val_index is not None and self.best_path is not None and self.best_path.is_file():
            self.model.load_state_dict(load_file(str(self.best_path)))
            self.best_path.unlink()
        return self.model.cpu().eval()
