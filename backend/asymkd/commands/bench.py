from __future__ import annotations

import importlib
import sys

KINDS = {"accuracy": "teacher, baseline and distilled students on a real folder dataset, over seeds",
         "train": "distillation epoch time vs a plain student epoch; re-pairing time",
         "classify": "onnxruntime compute vs end-to-end classify throughput; peak memory"}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, text in KINDS.items():
        p = sub.add_parser(kind, help=text, description=text)
        if kind in sys.argv:  # import only the benchmark that runs
            importlib.import_module(f"asymkd.bench.{kind}").add_arguments(p)


def run(args, events) -> int:
    return importlib.import_module(f"asymkd.bench.{args.kind}").run(args, events)
