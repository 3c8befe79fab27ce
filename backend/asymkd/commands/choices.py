"""`asymkd choices`: the engine's named choices as one JSON object, for the plugin's forms.

The plugin offers backbones, losses and pairing methods from this output instead of a copy
of its own. Kept fast: the backbone table is read from the source of `models/backbones.py`
(importing it would import torch, seconds on a small machine); a test checks the result
against the imported table.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

from .. import __version__, choices
from ..config import ClassifierConfig, DistillConfig, TeacherConfig
from ..events import PROTOCOL_VERSION
from ._report import send_report

BACKBONES_SOURCE = Path(__file__).resolve().parents[1] / "models" / "backbones.py"
HUB_NOTE = ("any timm model name works too (source 'hub': ImageNet weights downloaded once when "
            "pretrained, else random); 'weights=FILE' starts from a local state dict (source 'file')")


def add_arguments(parser) -> None:
    pass


def run(args, events) -> int:
    return send_report(args, events, "choices", "choices", choices_report())


def choices_report() -> dict[str, Any]:
    """Everything the plugin's forms offer, with the engine's defaults."""
    return {"engine": __version__, "protocol": PROTOCOL_VERSION,
            "config": {key: dict(table) for key, table in choices.CONFIG_CHOICES.items()},
            "backbones": backbone_table(), "backbone_note": HUB_NOTE,
            "devices": dict(choices.DEVICES),
            "classify": {"uncertain_by": dict(choices.UNCERTAINTY_MEASURES)},
            "defaults": {"teacher": _model_defaults(TeacherConfig()),
                         "distill": _model_defaults(DistillConfig())}}


def _model_defaults(section: ClassifierConfig) -> dict[str, Any]:
    values = dataclasses.asdict(section)
    return {key: values[key] for key in ("backbone", "pretrained", "input_size")}


def backbone_table() -> dict[str, dict[str, str]]:
    """name -> {source: bundled|scratch, about} of the named backbones (models/backbones.py)."""
    try:
        return _parse_backbones(BACKBONES_SOURCE.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        # the table is no longer a plain literal: import it (slower, same answer)
        from ..models.backbones import BACKBONES
        return {name: {"source": spec.source, "about": spec.about} for name, spec in BACKBONES.items()}


def _parse_backbones(source: str) -> dict[str, dict[str, str]]:
    """The BACKBONES literal: {name: BackboneSpec(timm_name, ..., bundled=..., about="...")}."""
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if node.target.id == "BACKBONES" and isinstance(node.value, ast.Dict):
            return {_literal_key(key): _spec_entry(value)
                    for key, value in zip(node.value.keys, node.value.values, strict=True)}
    raise ValueError("no BACKBONES literal in models/backbones.py")


def _literal_key(key: ast.expr | None) -> str:
    if key is None:  # {**other}
        raise ValueError("the BACKBONES literal unpacks another mapping")
    return ast.literal_eval(key)


def _spec_entry(call: ast.expr) -> dict[str, str]:
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "BackboneSpec"):
        raise ValueError("a BACKBONES entry is not a BackboneSpec(...) call")
    keywords = {k.arg: k.value for k in call.keywords}
    bundled = "bundled" in keywords and not (isinstance(keywords["bundled"], ast.Constant)
                                             and keywords["bundled"].value is None)
    about = ast.literal_eval(keywords["about"]) if "about" in keywords else ""
    return {"source": "bundled" if bundled else "scratch", "about": str(about)}
