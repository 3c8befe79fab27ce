"""Scene classifiers on timm backbones, exposing the last feature map for distillation."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelFileError

# Narrow ResNet-18 (width 32) suits 64x64 patches and a CPU; registered under our own name
# so configs can say `resnet18_w32` like any timm model.
CUSTOM = {
    "resnet18_w32": ("resnet18", {"channels": (32, 64, 128, 256), "stem_width": 32}),
    "resnet18_w16": ("resnet18", {"channels": (16, 32, 64, 128), "stem_width": 16}),
    "resnet50_w32": ("resnet50", {"channels": (32, 64, 128, 256), "stem_width": 32}),
}


def resolve_backbone(name: str) -> tuple[str, dict[str, Any]]:
    """timm name and extra kwargs for a backbone name; unknown names suggest close ones."""
    import timm
    if name in CUSTOM:
        base, kwargs = CUSTOM[name]
        return base, dict(kwargs)
    if name in timm.list_models():
        return name, {}
    close = difflib.get_close_matches(name, list(CUSTOM) + timm.list_models(), n=5, cutoff=0.6)
    raise ConfigError(f"unknown backbone '{name}'",
                      f"did you mean: {', '.join(close)}?" if close else
                      "see timm.list_models() for names, e.g. resnet18, resnet50, mobilenetv3_small_100")


class SceneClassifier(nn.Module):
    """A timm backbone + pooled linear head; `forward_features` gives the (B, C, h, w) map."""

    def __init__(self, backbone: str, in_chans: int, num_classes: int, drop_rate: float = 0.0,
                 weights: str | None = None, input_size: int = 0):
        super().__init__()
        self.input_size = int(input_size)
        import timm
        base, kwargs = resolve_backbone(backbone)
        self.backbone_name = backbone
        self.body = timm.create_model(base, pretrained=False, in_chans=in_chans, num_classes=0,
                                      global_pool="", **kwargs)
        if weights:
            load_backbone_weights(self.body, weights)
        self.num_features = int(self.body.num_features)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "SceneClassifier":
        """The architecture a model folder's metadata describes (weights not loaded)."""
        return cls(meta["backbone"], meta["in_chans"], meta["num_classes"],
                   input_size=int(meta.get("input_size") or 0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size and x.shape[-1] != self.input_size:
            # inside the model, so the exported ONNX graph resizes too
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          align_corners=False, antialias=False)
        return self.body.forward_features(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(feats.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def load_backbone_weights(body: nn.Module, path: str) -> None:
    """Initialise a backbone from a local .safetensors or .pth state dict (no hub download).

    Weights whose shapes do not fit (first conv with another band count, classifier) are
    skipped, so ImageNet RGB weights can start an MS model's deeper layers.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"backbone weights file {p} does not exist", "give a local .safetensors or .pth file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = body.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ModelFileError(f"no weights in {p} fit backbone {type(body).__name__}",
                         "use weights of the same architecture")
    body.load_state_dict(usable, strict=False)
