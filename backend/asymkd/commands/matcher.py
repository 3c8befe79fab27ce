from __future__ import annotations

from ..choices import POSITIVES
from ..pipeline import step_matcher
from ._options import add_data_options, add_run_options, run_step

FLAGS = {"epochs": "matcher.epochs", "positives": "matcher.positives", "embed_dim": "matcher.embed_dim"}


def add_arguments(p) -> None:
    add_run_options(p)
    add_data_options(p, "ms", "bands", "rgb_paired")
    p.add_argument("--epochs", type=int)
    p.add_argument("--positives", choices=list(POSITIVES),
                   help="same-target positives: explicit pairs, or pseudo-RGB from MS bands")
    p.add_argument("--embed-dim", type=int)


def run(args, events) -> int:
    metrics = run_step(args, events, FLAGS, step_matcher)
    if metrics is None:  # a rank other than 0 under torchrun
        return 0
    s = metrics["summary"]
    print(f"matcher written to {args.run}/matcher ({s['positives']}, {s['pairs']} positives, "
          f"top-1 retrieval {s['retrieval_top1']:.3f})")
    return 0
