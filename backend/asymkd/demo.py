"""The embedded default: a synthetic world and a config small enough for a laptop CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import layout
from .events import NULL_EVENTS, Events
from .fileio import read_json
from .layout import RunFolder

# Small epochs: the demo shows the whole loop in minutes on 2 CPU cores.
DEMO_CONFIG: dict[str, Any] = {
    "teacher": {"backbone": "resnet18_w16", "epochs": 25, "folds": 4, "input_size": 0},
    "matcher": {"epochs": 25},
    "distill": {"backbone": "resnet18_w16", "epochs": 20, "baseline": True, "input_size": 0},
}


def demo_world(run_dir: Path, events: Events = NULL_EVENTS) -> dict[str, Any]:
    """Write the synthetic world into RUN/world once; return the data section for the config."""
    from .data.synth import GSD, SynthConfig, make_world
    world = Path(run_dir) / "world"
    if not (world / "world.json").is_file():
        make_world(world, SynthConfig(), events)
    # the RGB camera's PNG patches carry no ground resolution: the world says it (a world
    # written before it had another camera is the MS sensor's true colour, at its 10 m)
    rgb_gsd = read_json(world, "world.json").get("rgb_gsd_m", GSD)
    return {"ms": str(world / "ms"), "rgb": str(world / "rgb_train"),
            "rgb_unlabeled": str(world / "rgb_unlabeled"), "rgb_paired": str(world / "rgb_paired"),
            "rgb_test": str(world / "rgb_test"), "bands": "sentinel2", "rgb_gsd": float(rgb_gsd)}



def demo_classify(run_dir: Path, events: Events = NULL_EVENTS) -> dict[str, Path]:
    """Export the student to ONNX and classify the synthetic RGB test scene with it."""
    from .classify import classify
    from .export import export_onnx
    from .models.files import read_meta
    from .pipeline import load_rgb_test, resolve_config
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    cfg = resolve_config(run_dir, write=False)
    test = load_rgb_test(cfg, read_meta(run.student).class_names)
    onnx = export_onnx(run.student, run.student_onnx, overwrite=True,
                       check_data=test.images[:128] if test is not None else None, events=events).path
    world = read_json(run_dir / "world", "world.json", ("paths",))
    scene = run_dir / "world" / world["paths"]["rgb_test_scene"]  # relative to the world folder
    out = run_dir / layout.CLASSIFIED / "rgb_test_tiles.gpkg"
    out.parent.mkdir(exist_ok=True)
    result = classify(onnx, scene, out, overwrite=True, events=events)
    return {"onnx": onnx, "gpkg": result.gpkg, "qml": result.qml}
