"""Weights files: a state dict written atomically as safetensors, and read from a
.safetensors or .pth file without running code from it.

Apart from `files` (model folders), so that a backbone can load starting weights without
importing the module that builds backbones from model folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ModelFileError
from ..fileio import temp_path


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
