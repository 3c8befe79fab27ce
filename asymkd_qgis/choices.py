"""The engine's named choices (backbones and where their weights come from, losses, pairing
methods, defaults), read from `asymkd choices` once per session and cached.

The plugin keeps no copy of its own: when the engine cannot be asked (not installed yet, or
broken), the forms offer a short built-in list of names, marked as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .engine import Engine, EngineUnavailable, run_engine

# How the forms name a backbone's source (the engine's `weights_source`).
SOURCE_TEXT = {"bundled": "bundled ImageNet weights", "scratch": "from scratch",
               "hub": "timm hub (downloaded once)", "file": "weights file"}


@dataclass(frozen=True)
class EngineChoices:
    backbones: dict[str, dict[str, str]]           # name -> {"source", "about"}
    config: dict[str, dict[str, str]] = field(default_factory=dict)  # config key -> {name: about}
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # teacher/distill -> defaults
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. classify.batch_size -> {default}
    note: str = ""
    fallback: bool = False                          # the engine was not asked

    def names(self, key: str, fallback: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The names of one config choice (e.g. 'pairing.method'), or `fallback`."""
        return tuple(self.config.get(key) or fallback)

    def default(self, section: str, key: str, fallback: Any = None) -> Any:
        return (self.defaults.get(section) or {}).get(key, fallback)

    def setting_default(self, key: str) -> Any:
        """The engine's default of one setting (e.g. 'classify.batch_size'); None when not named."""
        return (self.settings.get(key) or {}).get("default")

    def source(self, backbone: str, pretrained: bool = True, weights: bool = False) -> str:
        """Where a backbone's starting weights come from: file, scratch, bundled or hub."""
        if weights:
            return "file"
        if not pretrained:
            return "scratch"
        known = self.backbones.get(backbone)
        if known is None:
            return "hub"
        return known.get("source") or "unknown"

    def describe(self, backbone: str, pretrained: bool = True, weights: bool = False) -> str:
        """The source in words; empty where it is unknown (names from the built-in list)."""
        return SOURCE_TEXT.get(self.source(backbone, pretrained, weights), "")


# Names only, for a form shown before the engine exists; the engine checks every name anyway.
FALLBACK = EngineChoices(backbones={name: {"source": "", "about": ""} for name in
                                    ("efficientnet_lite0", "resnet18_w32", "resnet18_w16", "resnet50_w32")},
                         note="built-in list (the engine could not be asked): any timm name works too",
                         fallback=True)

_CACHE: dict[str, EngineChoices] = {}


def from_report(report: dict[str, Any]) -> EngineChoices:
    """EngineChoices from the JSON object `asymkd choices` prints."""
    backbones = {str(name): {"source": str(spec.get("source", "")), "about": str(spec.get("about", ""))}
                 for name, spec in (report.get("backbones") or {}).items()}
    if not backbones:
        raise ValueError("the engine's choices name no backbone")
    config = {str(key): {str(n): str(a) for n, a in table.items()}
              for key, table in (report.get("config") or {}).items()}
    # command options with named choices, e.g. classify --uncertain-by, as "classify.uncertain_by"
    for key, table in (report.get("classify") or {}).items():
        config[f"classify.{key}"] = {str(n): str(a) for n, a in table.items()}
    settings = {str(key): dict(spec) for key, spec in (report.get("settings") or {}).items() if isinstance(spec, dict)}
    return EngineChoices(backbones, config, dict(report.get("defaults") or {}), settings,
                         str(report.get("backbone_note", "")))


def engine_choices(engine: Engine, refresh: bool = False) -> EngineChoices:
    """The engine's choices, asked once per engine Python in a session; FALLBACK (not cached,
    so a later call asks again) when the engine cannot answer."""
    key = str(engine.python)
    if key in _CACHE and not refresh:
        return _CACHE[key]
    if not engine.python.exists():
        return FALLBACK
    try:
        outcome = run_engine(engine, ["choices"])
        report = next((e.get("choices") for e in outcome.events if e.get("event") == "choices"), None)
        if not outcome.ok or not isinstance(report, dict):
            return FALLBACK
        found = from_report(report)
    except (EngineUnavailable, ValueError, TypeError, AttributeError):
        return FALLBACK
    _CACHE[key] = found
    return found


def cached() -> EngineChoices:
    """The choices asked last in this session, or FALLBACK: for forms built before any engine
    call (e.g. Processing algorithms when QGIS starts)."""
    return next(reversed(_CACHE.values()), FALLBACK) if _CACHE else FALLBACK
