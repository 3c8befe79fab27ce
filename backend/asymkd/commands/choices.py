"""`asymkd choices`: the engine's named choices and settings as one JSON object, for the
plugin's forms.

The plugin offers backbones, losses and pairing methods from this output instead of a copy
of its own. Kept fast: nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import __version__, choices, config, settings
from ..classify import ClassifyOptions
from ..config import ClassifierConfig, DistillConfig, TeacherConfig
from ..events import PROTOCOL_VERSION
from ._report import send_report

HUB_NOTE = ("any timm model name works too (source 'hub': ImageNet weights downloaded once when "
            "pretrained, else random); 'weights=FILE' starts from a local state dict (source 'file')")


def add_arguments(parser) -> None:
    pass


def run(args, events) -> int:
    return send_report(args, events, "choices", "choices", choices_report())


def choices_report() -> dict[str, Any]:
    """Everything the plugin's forms offer, with the engine's defaults; `settings` holds each
    setting (config keys, and classify options as classify.NAME) as it is declared."""
    run_settings = settings.entries(config.RunConfig)
    classify_settings = settings.entries(ClassifyOptions)
    return {"engine": __version__, "protocol": PROTOCOL_VERSION,
            "config": {e.key: dict(e.spec.choices) for e in run_settings if e.spec.choices},
            "backbones": {name: dict(spec) for name, spec in choices.BACKBONES.items()}, "backbone_note": HUB_NOTE,
            "devices": dict(choices.DEVICES),
            "classify": {e.key: dict(e.spec.choices) for e in classify_settings if e.spec.choices},
            "defaults": {"teacher": _model_defaults(TeacherConfig()),
                         "distill": _model_defaults(DistillConfig())},
            "settings": {**{e.key: settings.report(e) for e in run_settings},
                         **{f"classify.{e.key}": settings.report(e) for e in classify_settings}}}


def _model_defaults(section: ClassifierConfig) -> dict[str, Any]:
    values = dataclasses.asdict(section)
    return {key: values[key] for key in ("backbone", "pretrained", "input_size")}
