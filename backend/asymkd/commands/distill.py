from __future__ import annotations

from ..layout import RunFolder
from ..pipeline import step_distill
from ..scores import held_out, split_name
from ._options import add_config_flags, add_run_options, run_step


def add_arguments(p) -> None:
    add_run_options(p)
    add_config_flags(p, "data", "ms", "bands", "rgb", "rgb_unlabeled", "rgb_test", "rgb_gsd")
    add_config_flags(p, "distill")


def run(args, events) -> int:
    results = run_step(args, events, step_distill)
    if results is None:  # a rank other than 0 under torchrun
        return 0
    for name, m in results.items():
        found = held_out(m)
        if found is None:  # every label trained and no test set: nothing held out to score on
            print(f"{name}: no held-out scores (no test set, no validation split)")
            continue
        split, part = found
        print(f"{name}: {split_name(split)} OA {part['overall_accuracy']:.4f}, macro-F1 {part['macro_f1']:.4f}")
    print(f"report: {RunFolder(args.run).report}")
    return 0
