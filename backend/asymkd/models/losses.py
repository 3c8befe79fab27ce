"""Loss terms of the method: domain shift (CORAL, MMD), masked InfoNCE, distillation.

All functions are pure torch and differentiable; none of them reads or writes files.

Feature inputs of `coral_loss` and `mmd_loss` may be
- (N, D): N samples of dimension D,
- (B, L, D): token sets (e.g. the output of `CrossModalAttention`), flattened to (B*L, D),
- (B, C, h, w): feature maps, every spatial position a sample of dimension C.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data.patches import UNLABELED


def as_samples(x: torch.Tensor) -> torch.Tensor:
    """Flatten features to (samples, dim): (N,D) as is, (B,L,D) -> (B*L,D), (B,C,h,w) -> (B*h*w,C)."""
    if x.dim() == 2:
        return x
    if x.dim() == 3:
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    raise ValueError(f"features must be (N, D), (B, L, D) or (B, C, h, w); got shape {tuple(x.shape)}")


def _covariance(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(dim=0, keepdim=True)
    return centred.T @ centred / (x.shape[0] - 1)


def coral_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Deep CORAL: ||Cov(a) - Cov(b)||_F^2 / (4 D^2).

    `a` and `b` may have different sample counts (e.g. a 4x4 student map and a 2x2 teacher
    map) but must have the same feature dimension D. Computed in float32 even under autocast
    (covariances of half-precision features lose too much).
    """
    a, b = as_samples(a).float(), as_samples(b).float()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"coral_loss needs the same feature dimension, got {a.shape[1]} and {b.shape[1]}"
                         " (project both to a common width first, e.g. with CrossModalAttention)")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("coral_loss needs at least two samples (rows or spatial positions) on each side")
    d = a.shape[1]
    diff = _covariance(a) - _covariance(b)
    return (diff * diff).sum() / (4.0 * d * d)


DEFAULT_MMD_KERNELS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def mmd_loss(a: torch.Tensor, b: torch.Tensor,
             kernels: Sequence[float] = DEFAULT_MMD_KERNELS) -> torch.Tensor:
    """Squared MMD with a sum of Gaussian RBF kernels (biased estimate, >= 0).

    Bandwidths are `kernels` times the mean pairwise squared distance of the pooled samples
    (detached, so the bandwidth does not become a shortcut for the gradient), which makes
    the loss independent of the feature scale, as in DAN.
    """
    a, b = as_samples(a).float(), as_samples(b).float()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"mmd_loss needs the same feature dimension, got {a.shape[1]} and {b.shape[1]}")
    if not kernels:
        raise ValueError("mmd_loss needs at least one kernel bandwidth multiplier")
    n = a.shape[0]
    x = torch.cat([a, b], dim=0)
    sq = torch.cdist(x, x).pow(2)
    m = x.shape[0]
    base = sq.detach().sum() / max(m * m - m, 1)
    base = torch.clamp(base, min=1e-12)
    k = torch.stack([torch.exp(-sq / (base * float(w))) for w in kernels]).sum(0)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()


def relative_coral_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||Cov(a) - Cov(b)||_F^2 / (||Cov(a)||_F^2 + ||Cov(b)||_F^2), in [0, 2].

    Plain CORAL scales with the square of the features' variance, so a network can shrink it
    towards 0 (it falls to ~1e-6 within a few epochs) without aligning anything; relative to
    the covariances' size it keeps a gradient for as long as the shapes differ.
    """
    a, b = as_samples(a).float(), as_samples(b).float()
    ca, cb = _covariance(a), _covariance(b)
    diff = ca - cb
    return (diff * diff).sum() / ((ca * ca).sum() + (cb * cb).sum()).clamp_min(1e-12)


# Implementations of choices.DOMAIN_LOSSES, by the same names.
DOMAIN_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "coral": coral_loss, "coral_rel": relative_coral_loss, "mmd": mmd_loss}


def masked_info_nce(z_rgb: torch.Tensor, z_ms: torch.Tensor, rgb_labels: torch.Tensor,
                    ms_labels: torch.Tensor, pos_index: torch.Tensor | None = None,
                    temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE whose negatives are only pairs of different classes.

    z_rgb (N, D) and z_ms (M, D) are L2-normalised embeddings. Row i of z_rgb and row
    `pos_index[i]` of z_ms show the same target (default: the diagonal, M == N). For each
    positive pair (i, j):
      rgb->ms: -log exp(s_ij) / (exp(s_ij) + sum_{k negative to i} exp(s_ik))
      ms->rgb: -log exp(s_ij) / (exp(s_ij) + sum_{k negative to j} exp(s_kj))
    with s = z_rgb z_ms^T / temperature. Same-class pairs of other targets appear in no
    denominator, so they get no gradient; label -1 (unknown class) counts as a different
    class from every other target. Returns the mean of both directions over the N pairs.
    """
    if z_rgb.dim() != 2 or z_ms.dim() != 2 or z_rgb.shape[1] != z_ms.shape[1]:
        raise ValueError(f"embeddings must be (N, D) and (M, D); got {tuple(z_rgb.shape)} and {tuple(z_ms.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, m = z_rgb.shape[0], z_ms.shape[0]
    device = z_rgb.device
    rgb_labels = torch.as_tensor(rgb_labels, device=device).long()
    ms_labels = torch.as_tensor(ms_labels, device=device).long()
    if rgb_labels.shape != (n,) or ms_labels.shape != (m,):
        raise ValueError("rgb_labels and ms_labels need one label per embedding row")
    if pos_index is None:
        if n != m:
            raise ValueError("without pos_index, z_rgb and z_ms must have the same number of rows (row i = one target)")
        pos_index = torch.arange(n, device=device)
    pos_index = torch.as_tensor(pos_index, device=device).long()
    if pos_index.shape != (n,) or (n and (pos_index.min() < 0 or pos_index.max() >= m)):
        raise ValueError("pos_index must give, for each RGB row, a valid MS row index")

    logits = (z_rgb @ z_ms.T).float() / temperature
    positive, negative = contrastive_masks(rgb_labels, ms_labels, pos_index)
    rows = torch.arange(n, device=device)

    # rgb -> ms: row i over its positive column and its negatives.
    row_logits = logits.masked_fill(~(negative | positive), float("-inf"))
    loss_rgb = -(row_logits[rows, pos_index] - torch.logsumexp(row_logits, dim=1))

    # ms -> rgb: for pair (i, j=pos_index[i]) column j over row i and the rows negative to j.
    col_logits = logits[:, pos_index].T  # (N pairs, N rgb rows): pair p <-> column pos_index[p]
    col_allowed = negative[:, pos_index].T | torch.eye(n, dtype=torch.bool, device=device)
    col_logits = col_logits.masked_fill(~col_allowed, float("-inf"))
    loss_ms = -(col_logits[rows, rows] - torch.logsumexp(col_logits, dim=1))
    return 0.5 * (loss_rgb.mean() + loss_ms.mean())


def contrastive_masks(rgb_labels: torch.Tensor, ms_labels: torch.Tensor,
                      pos_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) boolean masks of shape (N_rgb, N_ms) for `masked_info_nce`.

    Positive: MS column `pos_index[i]` for RGB row i (the same target). Negative: a pair of
    different classes, or a pair where either side's class is unknown (-1), and never a
    same-target pair. Everything else (same class, other target) is neither: masked out.
    """
    n, m = rgb_labels.shape[0], ms_labels.shape[0]
    positive = torch.zeros(n, m, dtype=torch.bool, device=rgb_labels.device)
    positive[torch.arange(n, device=rgb_labels.device), pos_index] = True
    r, c = rgb_labels[:, None], ms_labels[None, :]
    negative = ((r != c) | (r == UNLABELED) | (c == UNLABELED)) & ~positive
    return positive, negative


def is_probability(x: torch.Tensor, atol: float = 1e-3) -> bool:
    """True if every row of x is a probability vector (non-negative, sums to 1)."""
    return bool(x.min() >= 0) and bool(torch.allclose(x.sum(dim=1), torch.ones_like(x[:, 0]), atol=atol))


def soften(teacher: torch.Tensor, temperature: float, kind: str = "auto") -> torch.Tensor:
    """Teacher probabilities at `temperature` from logits or (T=1) probabilities."""
    if kind == "auto":
        kind = "probs" if is_probability(teacher) else "logits"
    if kind == "logits":
        return F.softmax(teacher.float() / temperature, dim=1)
    if kind == "probs":
        # softmax(log p / T) == softmax(z / T) for p = softmax(z).
        return F.softmax(torch.log(teacher.float().clamp_min(1e-12)) / temperature, dim=1)
    raise ValueError(f"teacher kind must be 'auto', 'probs' or 'logits', got {kind!r}")


def _kl_per_sample(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float,
                   teacher_kind: str) -> torch.Tensor:
    t = soften(teacher, temperature, teacher_kind)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return (torch.xlogy(t, t) - t * log_s).sum(dim=1) * temperature ** 2


def _ce_per_sample(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float,
                   teacher_kind: str) -> torch.Tensor:
    return F.cross_entropy(student_logits.float(), teacher.argmax(dim=1), reduction="none")


# choices.PSEUDO_MODES name -> the per-sample term (a test holds the two tables alike)
KD_MODES: dict[str, Callable[[torch.Tensor, torch.Tensor, float, str], torch.Tensor]] = {
    "kl": _kl_per_sample, "ce": _ce_per_sample}


def kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
            mode: str = "kl", weights: torch.Tensor | None = None,
            teacher_kind: str = "auto") -> torch.Tensor:
    """Distillation term between student logits (N, K) and the teacher (N, K).

    mode 'kl': KL(teacher_T || student_T) * T^2 per sample (Hinton), the teacher softened
    at the same temperature. mode 'ce': cross-entropy of the (untempered) student against
    the teacher's hard pseudo-label argmax. `teacher` holds logits or probabilities
    (`teacher_kind='auto'` tells them apart: rows that are probability vectors are
    probabilities). `weights` (N,) scales each sample (e.g. trust in the teacher); the
    result is the mean over N of weight * loss, so lower trust means a weaker term.
    """
    if student_logits.shape != teacher.shape or student_logits.dim() != 2:
        raise ValueError(f"student logits and teacher outputs must both be (N, K); got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mode not in KD_MODES:
        raise ValueError(f"kd mode must be one of {', '.join(KD_MODES)}, got {mode!r}")
    per_sample = KD_MODES[mode](student_logits, teacher.detach(), temperature, teacher_kind)
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=per_sample.dtype, device=per_sample.device).detach()
        if weights.shape != per_sample.shape:
            raise ValueError(f"weights must be one per sample ({per_sample.shape[0]}), "
                             f"got shape {tuple(weights.shape)}")
        per_sample = per_sample * weights
    return per_sample.mean()
