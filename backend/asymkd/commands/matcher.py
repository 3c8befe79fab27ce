from __future__ import annotations

from ..choices import POSITIVES
from ..pipeline import resolve_config, step_matcher
from ..train import distributed
from ._options import add_data_options, add_run_options, overrides

FLAGS = {"epochs": "matcher.epochs", "positives": "matcher.positives", "embed_dim": "matcher.embed_dim"}


def add_arguments(p) -> None:
    add_run_options(p)
    add_data_options(p, "ms", "bands", "rgb_paired")
    p.add_argument("--epochs", type=int)
    p.add_argument("--positives", choices=list(POSITIVES),
                   help="same-target positives: explicit pairs, or pseudo-RGB from MS bands")
    p.add_argument("--embed-dim", type=int)


def run(args, events) -> int:
    with distributed.session():  # under torchrun: data-parallel over the ranks
        main, events = distributed.is_main(), distributed.rank_events(events)
        cfg = resolve_config(args.run, args.config, overrides(args, FLAGS), write=main)
        metrics = step_matcher(cfg, args.run, events, args.resume)
    if not main:
        return 0
    s = metrics["summary"]
    print(f"matcher written to {args.run}/matcher ({s['positives']}, {s['pairs']} positives, "
          f"top-1 retrieval {s['retrieval_top1']:.3f})")
    return 0
