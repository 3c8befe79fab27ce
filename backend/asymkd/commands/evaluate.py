"""`asymkd evaluate`: score a saved model folder on a labeled folder dataset."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from .. import choices
from ..errors import ConfigError
from ..settings import Names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model folder (model.safetensors + meta.json), e.g. runs/demo/student")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="labeled folder dataset root/<Class>/<images> with the model's bands")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where metrics.json and confusion.png go (default: MODEL/eval/<data folder name>)")
    parser.add_argument("--device", choices=Names(choices.DEVICES), default="auto", metavar="auto|cpu|cuda[:N]",
                        help="where to run the model (default: auto = CUDA when available)")
    parser.add_argument("--tta", action="store_true",
                        help="average predictions over the 8 rotations/flips of each patch")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N",
                        help="patches per forward pass (default: 256)")


def format_metrics(metrics: dict[str, Any]) -> str:
    """OA, macro-F1 and a per-class table as plain text."""
    names = metrics["class_names"]
    width = max([len("class")] + [len(n) for n in names])
    lines = [f"overall accuracy  {100 * metrics['overall_accuracy']:6.2f}%   (n = {metrics['n']})",
             f"macro-F1          {100 * metrics['macro_f1']:6.2f}%",
             "",
             f"{'class':<{width}}  precision  recall     F1  support"]
    for name in names:
        row = metrics["per_class"][name]
        lines.append(f"{name:<{width}}  {100 * row['precision']:8.1f}%  {100 * row['recall']:5.1f}%  "
                     f"{100 * row['f1']:5.1f}%  {row['support']:7d}")
    return "\n".join(lines)


def run(args: argparse.Namespace, events, out: TextIO | None = None) -> int:
    # torch is imported only when the command runs (keeps `asymkd --help` fast).
    from ..fileio import check_writable
    from ..train.evaluate import default_out_dir, evaluate_model_folder

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, not {args.batch_size}",
                          "give a positive number, e.g. --batch-size 256")
    out_dir = args.out or default_out_dir(args.model, args.data)
    check_writable(out_dir)  # before the model runs over the whole data set
    metrics = evaluate_model_folder(args.model, args.data, out_dir=out_dir, device=args.device,
                                    events=events, tta=args.tta, batch_size=args.batch_size)
    # With `--events -` stdout carries the JSON-lines stream only.
    if args.events != "-":
        stream = out or sys.stdout
        print(format_metrics(metrics), file=stream)
        print(f"\nwritten to {out_dir}", file=stream)
    return 0
