"""Model folders: `model.safetensors` (weights) + `meta.json` (everything needed to rebuild
and use the model: backbone, bands, classes, normalisation, patch size, metrics).

Weights are safetensors, so loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load

from ..errors import DataError, ModelFileError
from ..fileio import atomic_write_text, read_regular
from ..layout import META, WEIGHTS
from .backbones import SceneClassifier
from .metadata import MATCHER_KIND, ModelMeta
from .statefile import save_state

__all__ = ["WEIGHTS", "META", "atomic_write_text", "save_state", "save_model", "read_meta", "load_model",
           "check_bands"]

CLASSIFIER_KINDS = ("student", "teacher")  # `kind` in meta.json; a matcher folder says MATCHER_KIND


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
