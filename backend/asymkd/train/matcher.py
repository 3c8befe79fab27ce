"""Step 2: the matcher, two encoders (MS, RGB) with projection heads trained with InfoNCE.

Positives are one RGB and one MS image of the same target (`data.same_target`): explicit
pairs (files sharing a stem) and, for MS samples without one, their true-colour bands
(chosen from band metadata) calibrated on the pairs. Negatives are pairs of different
classes; same-class non-targets are masked out, since they may look alike for good reason.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .. import layout
from ..config import MatcherConfig
from ..data.patches import PatchSet
from ..data.same_target import same_target_rgb
from ..errors import AsymKDError, ModelFileError
from ..events import Events
from ..fileio import read_json, read_regular
from ..models.losses import masked_info_nce
from ..models.metadata import MatcherMeta
from . import common, loop, seeds
from .common import TrainContext
from .outputs import Trained


class Encoder(nn.Module):
    """timm body, global average pool and a 2-layer projection to a unit-length embedding."""

    def __init__(self, backbone: str, in_chans: int, embed_dim: int):
        super().__init__()
        from ..models.backbones import create_body
        self.body = create_body(backbone, in_chans)
        width: int = self.body.num_features  # type: ignore[assignment]  # timm sets an int
        self.proj = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.body(x)).float(), dim=-1)


class Matcher(nn.Module):
    def __init__(self, ms_backbone: str, rgb_backbone: str, ms_chans: int, embed_dim: int):
        super().__init__()
        self.ms = Encoder(ms_backbone, ms_chans, embed_dim)
        self.rgb = Encoder(rgb_backbone, 3, embed_dim)


class ContrastiveTask(loop.Task):
    """Masked InfoNCE between the two encoders on independent dihedral views of each pair."""

    def __init__(self, model: Matcher, x_ms: torch.Tensor, x_rgb: torch.Tensor, labels: torch.Tensor,
                 temperature: float, device: torch.device):
        self.modules = {"model": model}
        self.model, self.x_ms, self.x_rgb, self.labels = model, x_ms, x_rgb, labels
        self.temperature, self.device = temperature, device

    def batch_terms(self, index: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        # independent views: a scene is the same target under any rotation/flip; under
        # torchrun each rank keeps its slice of the global batch (negatives within the slice)
        take = self.shard.take
        zm = self.model.ms(take(common.dihedral(self.x_ms[index], gen)).to(self.device))
        zr = self.model.rgb(take(common.dihedral(self.x_rgb[index], gen)).to(self.device))
        lb = take(self.labels[index]).to(self.device)
        return {"loss": masked_info_nce(zr, zm, lb, lb, temperature=self.temperature)}


def train_matcher(section: MatcherConfig, ms: PatchSet, rgb_paired: PatchSet | None, work_dir: Path,
                  ctx: TrainContext) -> Trained:
    """Train the matcher on the same-target positives; `work_dir` holds its checkpoint, the
    model, its metadata and metrics are returned for `outputs.write_outputs`."""
    device = ctx.device
    positives = same_target_rgb(ms, rgb_paired, section.positives, events=ctx.events)
    ms_idx, rgb_images, source = positives.ms_index, positives.images, positives.source
    ctx.events.log(f"matcher: {len(ms_idx)} positives ({source})")
    ms_mean, ms_std = common.band_stats(ms.images)
    rgb_mean, rgb_std = common.band_stats(rgb_images)
    x_ms = common.normalize(ms.images[ms_idx], ms_mean, ms_std)
    x_rgb = common.normalize(rgb_images, rgb_mean, rgb_std)
    labels = torch.as_tensor(ms.labels[ms_idx])
    gen = ctx.generator(seeds.MATCHER)  # seeds torch before the network is built: reproducible
    model = common.prepare_model(Matcher(section.backbone_ms, section.backbone_rgb, ms.num_bands,
                                         section.embed_dim), device)
    task = ContrastiveTask(model, x_ms, x_rgb, labels, section.temperature, device)
    settings = loop.LoopSettings("matcher", section.epochs, section.batch_size, section.lr, 1e-4,
                                 common.Checkpoint(Path(work_dir) / layout.CHECKPOINT), ctx.checkpoint_every,
                                 resume=ctx.resume,
                                 fingerprint={"config": asdict(section), "pairs": len(ms_idx), "source": source,
                                              "data": ms.identity(rgb_paired)})
    history = loop.fit(task, len(x_ms), settings, gen, ctx.events)
    # Top-1 retrieval of the true partner among all positives: how well the matcher matches.
    with torch.no_grad():
        zm_all, zr_all = embed(model.ms, x_ms, device), embed(model.rgb, x_rgb, device)
        retrieval = float((( zr_all @ zm_all.T).argmax(1) == torch.arange(len(zr_all))).float().mean())
        same_class = float((labels[(zr_all @ zm_all.T).argmax(1)] == labels).float().mean())
    summary = {"positives": source, "pairs": len(ms_idx), "retrieval_top1": retrieval,
               "retrieval_same_class": same_class}
    warn_near_chance(same_class, len(torch.unique(labels)), ctx.events)
    meta = MatcherMeta(ms_backbone=section.backbone_ms, rgb_backbone=section.backbone_rgb, ms_chans=ms.num_bands,
                       embed_dim=section.embed_dim, ms_mean=ms_mean, ms_std=ms_std, rgb_mean=rgb_mean,
                       rgb_std=rgb_std, band_names=ms.band_names, summary=summary)
    metrics = {"step": "matcher", "history": history, "summary": summary}
    return Trained("matcher", model.cpu(), meta, metrics, summary)


def warn_near_chance(same_class: float, classes: int, events: Events) -> None:
    """Say so when the matcher finds a partner of the right class hardly more often than a
    random pick would: pairing by its similarity is then close to random pairing."""
    chance = 1.0 / max(classes, 1)
    if same_class < min(2 * chance, 0.5 + chance / 2):
        events.warning(f"matcher: a partner of the same class for {same_class:.0%} of the positives, near chance "
                       f"({chance:.0%} for {classes} classes): its pairing is close to random; check that the "
                       "paired RGB and the MS patches show the same targets, or train it for more epochs")


@torch.no_grad()
def embed(encoder: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(xb.to(device)).cpu() for xb in common.iterate_eval(x, batch_size)])


def load_matcher(folder: Path) -> tuple[Matcher, MatcherMeta]:
    """The trained matcher of a run's matcher folder; ModelFileError (exit 2) naming the
    file and `asymkd matcher` when it is missing or damaged."""
    from safetensors.torch import load
    folder = Path(folder)
    if not (folder / layout.META).is_file():
        raise ModelFileError(f"{folder} holds no trained matcher", "run `asymkd matcher` first")
    doc = read_json(folder, layout.META, MatcherMeta.REQUIRED)
    meta = MatcherMeta.from_json(doc, str(folder / layout.META), layout.remake_hint(folder))
    try:
        model = Matcher(meta.ms_backbone, meta.rgb_backbone, meta.ms_chans, meta.embed_dim)
        model.load_state_dict(load(read_regular(folder, layout.WEIGHTS)))
    except AsymKDError:
        raise
    except Exception as exc:  # safetensors' own error for a damaged file, torch's for other shapes
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelFileError(f"the matcher in {folder} cannot be loaded ({detail})",
                             layout.remake_hint(folder)) from exc
    return model.eval(), meta
