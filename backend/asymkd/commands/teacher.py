from __future__ import annotations

from ..pipeline import step_teacher
from ._options import add_config_flags, add_run_options, run_step


def add_arguments(p) -> None:
    add_run_options(p)
    add_config_flags(p, "data", "ms", "bands")
    add_config_flags(p, "teacher")


def run(args, events) -> int:
    metrics = run_step(args, events, step_teacher)
    if metrics is None:  # a rank other than 0 under torchrun
        return 0
    acc = metrics["summary"].get("out_of_fold_accuracy")
    print(f"teacher written to {args.run}/teacher" + (f" (out-of-fold accuracy {acc:.3f})" if acc is not None else ""))
    return 0
