"""Training objectives of a scene classifier: modules that return their named loss terms
({'loss', 'gt', 'pseudo', 'feat'}), so the loop can log each one and stays a loop.

`SupervisedObjective` is the baseline's (and the teacher's) loss; `DistillObjective` adds
the teacher's soft labels and the feature term (steps 4-5 of the method).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..models.attention import CrossModalAttention
from ..models.losses import DOMAIN_LOSSES, kd_loss


@dataclass
class Batch:
    """What an objective sees of one training batch."""

    feats: torch.Tensor      # (B, C, h, w) student feature map
    logits: torch.Tensor     # (B, K) float32
    labels: torch.Tensor     # (B,) class or -1 (unlabeled)
    index: torch.Tensor      # (B,) sample indices into the training set (CPU)


class SupervisedObjective(nn.Module):
    """w_gt * CE(logits, label) over the labeled samples of the batch."""

    def __init__(self, w_gt: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.w_gt = w_gt
        self.label_smoothing = label_smoothing

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        lab = batch.labels >= 0
        if lab.any():
            gt = self.w_gt * F.cross_entropy(batch.logits[lab], batch.labels[lab],
                                             label_smoothing=self.label_smoothing)
        else:
            gt = batch.logits.sum() * 0.0
        return {"loss": gt, "gt": gt}


class DistillObjective(SupervisedObjective):
    """Ground truth + the teacher's soft label of each sample's MS partner + the domain-shift
    term between the attention-aligned student and teacher feature maps.

    `partners` (N_rgb,) is the current MS partner of every RGB sample (re-pairing updates it
    in place); `soft`, `features` and `trust` are the frozen teacher's cache per MS sample;
    `row_trust` (N_rgb,) weighs each RGB sample's pseudo-label (pairing confidence); `gate`
    lowers every pseudo-label term once the student nears the teacher; `taught` (N_rgb,
    bool, default all) names the samples that take a soft label at all.
    """

    def __init__(self, *, soft: torch.Tensor, features: torch.Tensor, trust: torch.Tensor,
                 partners: torch.Tensor, row_trust: torch.Tensor, attention: CrossModalAttention | None,
                 w_gt: float, w_pseudo: float, w_feat: float, temperature: float, pseudo: str,
                 domain_loss: str, use_trust: bool, label_smoothing: float = 0.0,
                 taught: torch.Tensor | None = None):
        super().__init__(w_gt, label_smoothing)
        self.soft, self.features, self.trust = soft, features, trust
        self.partners, self.row_trust = partners, row_trust
        self.taught = taught
        self.attention = attention
        self.w_pseudo, self.w_feat = w_pseudo, w_feat
        self.temperature, self.pseudo, self.use_trust = temperature, pseudo, use_trust
        self.domain = DOMAIN_LOSSES[domain_loss]
        self.gate = 1.0

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        terms = super().forward(batch)
        device = batch.logits.device
        j = self.partners[batch.index].to(device)
        weights = None
        if self.use_trust:
            weights = self.trust[j] * self.row_trust[batch.index].to(device) * self.gate
        share: float | torch.Tensor = 1.0  # of the batch taught: the term is a mean over those samples
        if self.taught is not None:
            taught = self.taught[batch.index].to(device).float()
            weights = taught if weights is None else weights * taught
            share = taught.mean().clamp_min(1.0 / len(taught))
        terms["pseudo"] = self.w_pseudo * kd_loss(batch.logits, self.soft[j], self.temperature, self.pseudo,
                                                  weights=weights, teacher_kind="probs") / share
        if self.w_feat > 0 and self.attention is not None:
            s_tok, t_tok = self.attention(batch.feats.float(), self.features[j])
            terms["feat"] = self.w_feat * self.domain(s_tok.reshape(-1, s_tok.shape[-1]),
                                                      t_tok.reshape(-1, t_tok.shape[-1]))
        terms["loss"] = torch.stack([v for k, v in terms.items() if k != "loss"]).sum()
        return terms
