from __future__ import annotations

from ..choices import PAIRING_METHODS
from ..layout import RunFolder
from ..pipeline import step_pair
from ._options import add_data_options, add_run_options, run_step

FLAGS = {"method": "pairing.method"}


def add_arguments(p) -> None:
    add_run_options(p)
    add_data_options(p, "ms", "bands", "rgb", "rgb_unlabeled")
    p.add_argument("--method", choices=list(PAIRING_METHODS),
                   help="; ".join(f"{k}: {v}" for k, v in PAIRING_METHODS.items()) + " (default balanced)")


def run(args, events) -> int:
    s = run_step(args, events, FLAGS, lambda cfg, run, events, resume: step_pair(cfg, run, events))
    if s is None:  # a rank other than 0 under torchrun
        return 0
    print(f"paired {s['rgb_samples']} RGB samples with MS samples: {RunFolder(args.run).pairs_file}")
    return 0
