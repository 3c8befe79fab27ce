"""Model folders: `model.safetensors` (weights) + `meta.json` (everything needed to rebuild
and use the model: backbone, bands, classes, normalisation, patch size, metrics).

Weights are safetensors, so loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ModelFileError
from .backbones import SceneClassifier

WEIGHTS = "model.safetensors"
META = "meta.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write a state dict atomically (a kill mid-write leaves the old file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def save_model(folder: Path, model: SceneClassifier, meta: dict[str, Any]) -> Path:
    """Save a classifier and its metadata. meta must hold: backbone, in_chans, num_classes,
    class_names, band_names, mean, std, patch_size (and anything else worth keeping)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("backbone", "class_names", "band_names", "mean", "std", "patch_size"):
        if key not in meta:
            raise ValueError(f"model metadata lacks '{key}'")
    meta = {**meta, "in_chans": len(meta["band_names"]), "num_classes": len(meta["class_names"])}
    save_state(folder / WEIGHTS, model.state_dict())
    atomic_write_text(folder / META, json.dumps(meta, indent=2))
    return folder


def read_meta(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
        raise ModelFileError(f"{folder} is not a model folder (needs {WEIGHTS} and {META})",
                             "point to a step folder of a run, e.g. runs/demo/student")
    return json.loads((folder / META).read_text(encoding="utf-8"))


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[SceneClassifier, dict[str, Any]]:
    meta = read_meta(folder)
    model = SceneClassifier.from_meta(meta)
    try:
        model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    except RuntimeError as exc:
        raise ModelFileError(f"weights in {folder} do not fit backbone {meta['backbone']}: {exc}") from exc
    return model.to(device).eval(), meta


def check_bands(meta: dict[str, Any], num_bands: int, what: str) -> None:
    if meta["in_chans"] != num_bands:
        raise ModelFileError(
            f"{what} has {num_bands} bands but the model was trained on {meta['in_chans']} "
            f"({', '.join(meta['band_names'])})",
            "use data with the model's bands, or train a new model on this data")
