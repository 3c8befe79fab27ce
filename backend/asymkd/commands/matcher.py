from __future__ import annotations

from ..pipeline import step_matcher
from ._options import add_config_flags, add_run_options, run_step


def add_arguments(p) -> None:
    add_run_options(p)
    add_config_flags(p, "data", "ms", "bands", "rgb_paired")
    add_config_flags(p, "matcher")


def run(args, events) -> int:
    metrics = run_step(args, events, step_matcher)
    if metrics is None:  # a rank other than 0 under torchrun
        return 0
    s = metrics["summary"]
    print(f"matcher written to {args.run}/matcher ({s['positives']}, {s['pairs']} positives, "
          f"top-1 retrieval {s['retrieval_top1']:.3f})")
    return 0
