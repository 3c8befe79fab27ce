from __future__ import annotations

from ..layout import RunFolder
from ..pipeline import step_pair
from ._options import add_config_flags, add_run_options, run_step


def add_arguments(p) -> None:
    add_run_options(p)
    add_config_flags(p, "data", "ms", "bands", "rgb", "rgb_unlabeled")
    add_config_flags(p, "pairing")


def run(args, events) -> int:
    s = run_step(args, events, lambda cfg, run, events, resume: step_pair(cfg, run, events))
    if s is None:  # a rank other than 0 under torchrun
        return 0
    print(f"paired {s['rgb_samples']} RGB samples with MS samples: {RunFolder(args.run).pairs_file}")
    return 0
