from __future__ import annotations

import importlib
import sys

from ..cli import Parser

KINDS = {"accuracy": "teacher, baseline and distilled students on a real folder dataset, over seeds",
         "train": "distillation epoch time vs a plain student epoch; re-pairing time",
         "classify": "onnxruntime compute vs end-to-end classify throughput; peak memory"}


class _KindParser(Parser):
    """A benchmark's parser that adds its flags when it parses (help included): only the
    benchmark that runs is imported (`bench train` imports torch), whether the arguments come
    from the command line or from `cli.main([...])`."""

    def __init__(self, *args, kind: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._kind, self._loaded = kind, False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(f"asymkd.bench.{self._kind}").add_arguments(self)
            self.add_argument("--markdown", metavar="FILE.md", default=None,
                              help="also write the results as this command's section of a Markdown file "
                                   "(e.g. docs/benchmarks.md), replacing its earlier section")

    def parse_known_args(self, args=None, namespace=None):
        self._load()
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.bench_argv = list(sys.argv[1:] if args is None else args)  # the section's key
        if extras:  # refused here, with this benchmark's usage
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True, parser_class=_KindParser)
    for kind, text in KINDS.items():
        sub.add_parser(kind, help=text, description=text, kind=kind)


def run(args, events) -> int:
    bench = importlib.import_module(f"asymkd.bench.{args.kind}")
    if not args.markdown:
        return int(bench.run(args, events))
    from ..bench import record
    record.check(args.markdown)
    with record.recording() as rec:
        code = int(bench.run(args, events))
    if code == 0:  # a failed benchmark leaves the file as it was
        path = record.write(args.markdown, record.command_line(args.kind, args.bench_argv), rec)
        print(f"written: {path}")
    return code
