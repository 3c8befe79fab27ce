"""Shared training pieces: the training context, device, seeding, normalisation, splits,
augmentation, batches, optimisers, and resumable checkpoints."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelFileError
from ..events import NULL_EVENTS, Events
from ..fileio import temp_path
from . import distributed, seeds


def resolve_device(name: str = "auto") -> torch.device:
    """The device a name stands for; under torchrun 'auto' and 'cuda' are the rank's own GPU."""
    if name == "auto":
        return distributed.rank_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name} requested but CUDA is not available",
                          "use --device cpu, or install the CUDA build of torch on a machine with an NVIDIA GPU")
    return distributed.rank_device(torch.device(name))


def generator(seed: int) -> torch.Generator:
    """One seeded CPU generator drives shuffling and augmentation (saved in checkpoints)."""
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


@dataclass(frozen=True)
class TrainContext:
    """What every trainer takes besides its own config section: where it runs and at which
    precision, the run's seed, how often it checkpoints, whether it resumes, and where it
    reports. None of it is part of a resume fingerprint: a run resumes on another device or
    with other checkpoint spacing."""

    device: torch.device = torch.device("cpu")
    amp: bool = True              # bfloat16 autocast on CUDA
    seed: int = 0                 # the run's seed; each random use takes a stream of it (`seeds`)
    checkpoint_every: int = 1     # epochs between resumable checkpoints
    resume: bool = False          # continue from the step's checkpoint where there is one
    events: Events = NULL_EVENTS

    def seed_for(self, name: str, *keys: int) -> int:
        """The seed of one named use of the run's seed (see `seeds.stream`)."""
        return seeds.stream(self.seed, name, *keys)

    def generator(self, name: str, *keys: int) -> torch.Generator:
        """A generator (and torch's global seed) for one named use of the run's seed."""
        return generator(self.seed_for(name, *keys))


def band_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-band mean and std over a training set (N, C, H, W); std floored for flat bands."""
    x = images.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3))
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-3 * np.maximum(np.abs(mean), 1.0))
    return mean.tolist(), std.tolist()


def normalize(images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per band (band axis = -3), as float32; the band counts must agree."""
    x = torch.as_tensor(images).float()
    m = torch.as_tensor(np.asarray(mean, dtype=np.float32), device=x.device)
    s = torch.as_tensor(np.asarray(std, dtype=np.float32), device=x.device)
    if m.numel() != x.shape[-3] or s.numel() != x.shape[-3]:
        raise ValueError(f"mean/std have {m.numel()}/{s.numel()} values for {x.shape[-3]} bands")
    return (x - m[:, None, None]) / s[:, None, None]


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of labeled samples; unlabeled (-1) all go to training."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        if c < 0:
            train.append(idx)
            continue
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(max(n_val, 1), len(idx) - 1) if len(idx) >= 2 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    return cat(train), cat(val)


def kfold_indices(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Stratified k folds (held-out index arrays)."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        for i, j in enumerate(idx):
            out[(i + offset) % folds].append(int(j))
        offset += len(idx)
    return [np.sort(np.array(f, dtype=np.int64)) for f in out]


def dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation by k*90 degrees and flip per sample (scenes have no 'up')."""
    k = torch.randint(0, 8, (x.shape[0],), generator=gen)
    out = x.clone()
    for code in range(1, 8):
        sel = (k == code).nonzero().flatten()
        if len(sel) == 0:
            continue
        v = x[sel]
        if code >= 4:
            v = v.flip(-1)
        out[sel] = torch.rot90(v, code % 4, dims=(-2, -1))
    return out


def shift(x: torch.Tensor, gen: torch.Generator, pixels: int) -> torch.Tensor:
    """Random translation of each patch by up to `pixels` in each direction, the edges
    mirrored in (a scene continues beyond its patch; mirroring keeps its textures)."""
    n, c, h, w = x.shape
    p = min(int(pixels), h - 1, w - 1)
    if p <= 0:
        return x
    padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
    dy = torch.randint(0, 2 * p + 1, (n, 1), generator=gen) + torch.arange(h)
    dx = torch.randint(0, 2 * p + 1, (n, 1), generator=gen) + torch.arange(w)
    rows = torch.gather(padded, 2, dy.view(n, 1, h, 1).expand(n, c, h, w + 2 * p))
    return torch.gather(rows, 3, dx.view(n, 1, 1, w).expand(n, c, h, w))


def colour_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample contrast, per-band gain and brightness jitter of normalised patches: another
    sensor's colour response, within the range one scene set shows."""
    n, c = x.shape[:2]
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)
    gain = 0.8 + 0.4 * torch.rand(n, c, 1, 1, generator=gen)
    brightness = 0.8 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    return x * contrast * gain + brightness


def strong_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A strong view of normalised patches for consistency training: a dihedral move, then
    colour jitter and a cut-out square."""
    x = dihedral(x, gen)
    n, c, h, w = x.shape

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    out = colour_jitter(x, gen)
    size = (torch.minimum(torch.tensor(h), torch.tensor(w)) * (0.25 + 0.25 * u(n))).long()
    top = (u(n) * (h - size + 1)).long()
    left = (u(n) * (w - size + 1)).long()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    cut = ((rows >= top.view(n, 1, 1)) & (rows < (top + size).view(n, 1, 1))
           & (cols >= left.view(n, 1, 1)) & (cols < (left + size).view(n, 1, 1)))
    return out.masked_fill(cut.unsqueeze(1), 0.0)


def batches(n: int, batch_size: int, gen: torch.Generator, shuffle: bool = True) -> list[torch.Tensor]:
    """Index batches; the last short batch is merged into the previous one (no size-1 batch)."""
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    parts = list(order.split(batch_size))
    if len(parts) > 1 and len(parts[-1]) < max(2, batch_size // 2):
        last = parts.pop()
        parts[-1] = torch.cat([parts[-1], last])
    return parts


def epochs_for(epochs: int, min_steps: int, steps_per_epoch: int, auto_floor: int) -> int:
    """Epochs to run: as configured, or when 0 (auto) `auto_floor` epochs, more where a
    small set would give fewer than `min_steps` optimiser steps."""
    if epochs > 0:
        return epochs
    return max(auto_floor, -(-min_steps // max(steps_per_epoch, 1)))


def optimizer_and_schedule(params, lr: float, weight_decay: float, total_steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total_steps, 1),
                                                pct_start=0.15, anneal_strategy="cos")
    return opt, sched


def optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched) -> float:
    """One update: clear gradients, backpropagate, step the optimiser and the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


M = TypeVar("M", bound=nn.Module)


def prepare_model(model: M, device: torch.device) -> M:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


class Checkpoint:
    """Resumable training state in one file, written atomically each epoch and loaded with
    `weights_only=True` (tensors, numbers, strings, lists, dicts only)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, epoch: int, modules: dict[str, Any], gen: torch.Generator,
             extra: dict[str, Any] | None = None, fingerprint: str = "") -> None:
        state = {"epoch": epoch, "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "modules": {k: v.state_dict() for k, v in modules.items()}, "extra": extra or {},
                 "fingerprint": fingerprint}
        with temp_path(self.path) as tmp:  # a full disk or a cancel leaves no temporary file behind
            torch.save(state, tmp)

    def load(self, modules: dict[str, Any], gen: torch.Generator,
             fingerprint: str = "") -> tuple[int, dict[str, Any]]:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelFileError(f"cannot resume from {self.path}: it is not a readable checkpoint "
                                 f"({type(exc).__name__})",
                                 "delete the checkpoint to start this step afresh") from None
        if not isinstance(state, dict) or state.get("fingerprint", "") != fingerprint:
            stored = _fingerprint_data(state.get("fingerprint") if isinstance(state, dict) else None)
            if stored is not None and stored != _fingerprint_data(fingerprint):
                raise data_changed(self.path)
            raise ConfigError(f"cannot resume from {self.path}: it was written with other settings or data",
                              "drop --resume to start this step afresh, or restore the settings and data "
                              "of the interrupted run")
        try:
            for k, v in modules.items():
                v.load_state_dict(state["modules"][k])
            gen.set_state(state["gen"])
            torch.set_rng_state(state["torch_rng"])
            return int(state["epoch"]), dict(state["extra"])
        except Exception as exc:
            raise ModelFileError(f"cannot resume from {self.path}: {type(exc).__name__}: {exc}",
                                 "delete the checkpoint to start this step afresh") from None

    def stored_data(self) -> Any:
        """The data identity (the fingerprint's "data") the checkpoint was written for, or
        None when there is no readable checkpoint or it names none (`load` reports those)."""
        if not self.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:
            return None
        return _fingerprint_data(state.get("fingerprint") if isinstance(state, dict) else None)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _fingerprint_data(fingerprint: Any) -> Any:
    """The "data" entry of a JSON fingerprint (see `loop.LoopSettings`), else None."""
    import json
    try:
        values = json.loads(fingerprint) if isinstance(fingerprint, str) else None
    except ValueError:
        return None
    return values.get("data") if isinstance(values, dict) else None


def data_changed(path: Path) -> ConfigError:
    """The refusal to resume from `path`, written for other training data."""
    return ConfigError(f"cannot resume from {path}: the data changed since it was written (other patch "
                       "files, or the same files with other contents)",
                       "start this step afresh: run it again without --resume, or restore the data of "
                       "the interrupted run")


def iterate_eval(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


def dihedral_views(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The 8 rotations/reflections of a (B, C, H, W) batch (scenes have no 'up')."""
    for k in range(4):
        rotated = torch.rot90(x, k, dims=(2, 3))
        yield rotated
        yield rotated.flip(3)


@torch.no_grad()
def batch_probs(model: nn.Module, xb: torch.Tensor, device: torch.device, amp: bool = False,
                tta: bool = False) -> torch.Tensor:
    """Class probabilities of one normalised batch (averaged over the 8 dihedral views
    with `tta`), float32 on the CPU. The caller sets eval mode."""
    xb = xb.to(device)
    views = list(dihedral_views(xb)) if tta else [xb]
    with autocast(device, amp):
        probs = torch.stack([torch.softmax(model(v).float(), dim=1) for v in views]).mean(0)
    return probs.cpu()


def predict_normalised(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 256,
                       amp: bool = True, tta: bool = False) -> torch.Tensor:
    """Probabilities (N, K) for normalised inputs; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        outs = [batch_probs(model, xb, device, amp, tta) for xb in iterate_eval(x, batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0)


def accuracy(logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    labels = torch.as_tensor(labels)
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(-1) == labels).float().mean())
