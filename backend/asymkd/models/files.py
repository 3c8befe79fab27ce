"""Model folders: `model.safetensors` (weights) + `meta.json` (everything needed to rebuild
and use the model: backbone, bands, classes, normalisation, patch size, metrics).

Weights are safetensors, so loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save_file

from ..errors import DataError, ModelFileError
from ..fileio import atomic_write_text, read_regular, temp_path
from ..layout import META, WEIGHTS
from .backbones import SceneClassifier
from .metadata import MATCHER_KIND, ModelMeta

__all__ = ["WEIGHTS", "META", "atomic_write_text", "save_state", "save_model", "read_meta", "load_model",
           "check_bands"]

CLASSIFIER_KINDS = ("student", "teacher")  # `kind` in meta.json; a matcher folder says MATCHER_KIND


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write a state dict atomically (a kill mid-write leaves the old file)."""
    with temp_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))


_STATE_HINT = ("give a .safetensors file, or a .pth file holding a plain state dict "
               "(torch.save(model.state_dict(), path))")


def load_error_text(exc: BaseException) -> str:
    """What a failed safe load says, in one line and without torch's advice to retry with
    `weights_only=False` (which would run code from the file)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = [line for line in lines if "weights_only" not in line and not line.startswith("Check the documentation")]
    if any("Weights only load failed" in line for line in lines):  # objects other than tensors
        detail = kept[0].removeprefix("WeightsUnpickler error:").strip() if kept else ""
        return ("it holds objects other than tensors, which are not loaded for safety"
                + (f" ({detail})" if detail else ""))
    first = kept[0] if kept else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def read_state_dict(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state dict (names -> tensors) from a .safetensors or .pth file, loaded without
    running code from it; ModelFileError for a damaged file or one of another structure
    (a checkpoint with a 'state_dict' entry is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} {path} does not exist", _STATE_HINT)
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors all mean "not a weights file"
        raise ModelFileError(f"{what} {path} cannot be read: {load_error_text(exc)}", _STATE_HINT) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        kind = type(state).__name__ if not isinstance(state, dict) else "a mapping that is not names -> tensors"
        raise ModelFileError(f"{what} {path} holds {kind}, not a state dict of tensors", _STATE_HINT)
    return state


def save_model(folder: Path, model: SceneClassifier, meta: ModelMeta) -> Path:
    """Save a classifier and its metadata; backbone and input_size are taken from the model
    (in_chans and num_classes from the name lists), so they cannot disagree with it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = dataclasses.replace(meta, backbone=model.backbone_name, input_size=model.input_size)
    # Weights and metadata are one unit: the old meta.json goes first, so a kill between
    # the two renames leaves a folder that is refused as incomplete, never a mixed pair.
    (folder / META).unlink(missing_ok=True)
    save_state(folder / WEIGHTS, model.state_dict())
    atomic_write_text(folder / META, json.dumps(meta.to_json(), indent=2))
    return folder


def read_meta(folder: Path) -> ModelMeta:
    """The validated metadata of a model folder (see models/metadata.py)."""
    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
        raise ModelFileError(f"{folder} is not a model folder (needs {WEIGHTS} and {META})",
                             "point to a step folder of a run, e.g. runs/demo/student; "
                             "if the step was interrupted, run it again")
    try:
        meta = json.loads(read_regular(folder, META).decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError too
        raise ModelFileError(f"{folder / META} is not valid JSON ({exc})",
                             "the file is damaged: train the step again (or restore the file)") from exc
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if isinstance(meta, dict) and kind is None and "ms_backbone" in meta:
        kind = MATCHER_KIND  # written before model folders named their kind
    if kind is not None and kind not in CLASSIFIER_KINDS:
        raise ModelFileError(f"{folder} holds a {kind} model; this needs a scene classifier "
                             f"({' or '.join(CLASSIFIER_KINDS)})",
                             "point to the run's student folder (e.g. runs/demo/student), or its teacher folder")
    return ModelMeta.from_json(meta, str(folder / META))


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[SceneClassifier, ModelMeta]:
    """The model of a folder, in eval mode; ModelFileError for damaged, mismatched or
    non-finite weights (a diverged training must not be scored or exported)."""
    meta = read_meta(folder)
    model = SceneClassifier.from_meta(meta)
    path = Path(folder) / WEIGHTS
    try:
        state = load(read_regular(folder, WEIGHTS))
    except DataError:  # a link or not a regular file: said so already
        raise
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise ModelFileError(f"{path} is not a readable safetensors file ({exc})",
                             "the file is damaged: train the step again (or restore the file)") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"weights in {folder} do not fit backbone {meta.backbone}: {exc}",
                             "keep model.safetensors and meta.json of the same training together") from exc
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelFileError(f"the weights in {path} are not finite (NaN or infinity in {', '.join(bad[:3])}"
                             f"{' ...' if len(bad) > 3 else ''}): the training diverged",
                             "train again with a lower learning rate, and check the data for NaN pixels")
    return model.to(device).eval(), meta


def check_bands(meta: ModelMeta, num_bands: int, what: str) -> None:
    if meta.in_chans != num_bands:
        raise ModelFileError(
            f"{what} has {num_bands} bands but the model was trained on {meta.in_chans} "
            f"({', '.join(meta.band_names)})",
            "use data with the model's bands, or train a new model on this data")
