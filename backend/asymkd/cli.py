"""The `asymkd` command line: one subcommand per job, each in `asymkd/commands/<name>.py`.

Every command module has `HELP`, `add_arguments(parser)` and `run(args, events) -> int`.
Modules are imported only when their command runs, so `asymkd doctor` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import traceback
from contextlib import ExitStack
from typing import Sequence

from . import __version__
from .errors import AsymKDError, Cancelled
from .events import Events

# name -> one-line help (kept here so `asymkd --help` lists commands without importing them)
COMMANDS: dict[str, str] = {
    "synth": "write the synthetic Sentinel-2-like world (patches, scenes, labels)",
    "chips": "cut a raster and its labeled polygons/points into a patch folder dataset",
    "teacher": "train the MS teacher",
    "matcher": "train the MS/RGB matcher (contrastive, same-target positives)",
    "pair": "pair every RGB sample with an MS sample of its class",
    "distill": "distill the teacher into the RGB student (with optional baseline)",
    "evaluate": "evaluate a student on a labeled RGB test set",
    "run": "all steps from one config file (YAML or TOML)",
    "export": "export a student to ONNX with its metadata",
    "classify": "classify the tiles of a raster into a styled GeoPackage",
    "bench": "benchmarks: accuracy, train, classify",
    "doctor": "print Python, torch, CUDA, onnxruntime versions and devices as JSON",
}


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM so `finally` blocks clean up."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asymkd", description="AsymKD: an MS teacher teaches an RGB student without same-target pairs.")
    parser.add_argument("--version", action="version", version=f"asymkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--events", metavar="FILE|-", default=None,
                       help="write JSON-lines events to FILE, or to stdout with '-'")
        p.set_defaults(_command=name)
        # Arguments are added lazily in main() for the chosen command only.
    return parser


def _module(name: str):
    return importlib.import_module(f"asymkd.commands.{name}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Add the chosen command's own arguments before parsing (lazy import).
    command = next((a for a in argv if a in COMMANDS), None)
    if command is not None:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        _module(command).add_arguments(sub.choices[command])
    args = parser.parse_args(argv)
    if not getattr(args, "_command", None):
        parser.print_help()
        return 0
    with ExitStack() as stack:
        stream = None
        if args.events == "-":
            stream = sys.stdout
        elif args.events:
            stream = stack.enter_context(open(args.events, "a", encoding="utf-8"))
        events = Events(stream=stream)
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return int(_module(args._command).run(args, events) or 0)
        except AsymKDError as exc:
            kind = type(exc).__name__
            events.error(exc.message, kind=kind, hint=exc.hint)
            print(f"error: {exc.message}", file=sys.stderr)
            if exc.hint:
                print(f"  hint: {exc.hint}", file=sys.stderr)
            return 130 if isinstance(exc, Cancelled) else 2
        except (KeyboardInterrupt, _Terminated):
            events.error("cancelled", kind="Cancelled")
            print("cancelled: nothing half-written was left behind", file=sys.stderr)
            return 130
        except Exception as exc:  # an engine bug: report it on the stream, then the traceback
            events.error(f"{type(exc).__name__}: {exc}", kind="InternalError",
                         hint="this is a bug; the traceback is on stderr")
            traceback.print_exc()
            return 1
        finally:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
