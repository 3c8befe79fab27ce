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
from contextlib import ExitStack, suppress
from typing import Sequence, TextIO, cast

from . import __version__
from .errors import AsymKDError, Cancelled, StorageError, os_error_cause, storage_error
from .events import Events
from .launch import writes_files

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
    "sample": "draw the tiles to label for an accuracy assessment (stratified by map class)",
    "assess": "accuracy with confidence intervals and area estimates from reference labels",
    "bench": "benchmarks: accuracy, train, classify",
    "doctor": "print Python, torch, CUDA, onnxruntime versions and devices as JSON",
    "choices": "print the named choices (backbones, losses, pairing, devices) and defaults as JSON",
}


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM so `finally` blocks clean up."""


# SIGTERM cancels only while a command runs; once it has ended (the outputs are in place),
# a SIGTERM must not turn its exit code into 143 or a traceback.
_RUNNING = {"command": False, "terminated": False}


def _on_sigterm(signum, frame):
    if _RUNNING["command"]:
        # remembered: an extension module being imported turns the exception into its own
        # error (onnxruntime: "ImportError: initialization failed"), still a cancel
        _RUNNING["terminated"] = True
        raise _Terminated()


# Hints for errors raised without one, so every exit-2 message says what to do.
_DEFAULT_HINTS = {
    "ConfigError": "see `asymkd {command} --help` for the options and their ranges",
    "DataError": "check the input named above",
    "ModelFileError": "check the model file named above, or train or export it again",
}


class Parser(argparse.ArgumentParser):
    """argparse with a `hint:` line after its errors (exit 2), like every other refusal."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n  hint: see `{self.prog} --help` for the arguments\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="asymkd", description="AsymKD: an MS teacher teaches an RGB student without same-target pairs.")
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
    as_program = argv is None
    # SIGTERM cancels from the start: the command's imports take a while
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _RUNNING["command"], _RUNNING["terminated"] = True, False
    try:
        return _main(argv, as_program)
    except (KeyboardInterrupt, _Terminated):  # before the command started
        print("cancelled", file=sys.stderr)
        return 130
    finally:
        _RUNNING["command"] = False
        # As the program, the outcome is decided: a SIGTERM while Python shuts down must not
        # turn it into 143. SIG_IGN, unlike a Python handler, survives interpreter shutdown.
        signal.signal(signal.SIGTERM, signal.SIG_IGN if as_program else previous)


def _main(argv: Sequence[str] | None, as_program: bool) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Add the chosen command's own arguments before parsing (lazy import).
    command = next((a for a in argv if a in COMMANDS), None)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command is not None:
        _module(command).add_arguments(sub.choices[command])
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported with the command's usage and hint
        chosen = getattr(args, "_command", None)
        (sub.choices[chosen] if chosen else parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_command", None):
        parser.print_help()
        return 0
    if as_program and hasattr(signal, "SIGXFSZ"):
        # over the file-size limit a write fails with EFBIG (reported below) instead of
        # the process being killed without a word
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    with ExitStack() as stack:
        events = Events(stream=None)
        try:
            events = _open_events(args.events, stack)
            code = int(_module(args._command).run(args, events) or 0)
            _RUNNING["command"] = False
            return code
        except AsymKDError as exc:
            _RUNNING["command"] = False
            return _report(exc, events, args._command)
        except (KeyboardInterrupt, _Terminated):
            return _cancelled(events)
        except Exception as exc:
            _RUNNING["command"] = False
            if _RUNNING["terminated"]:
                return _cancelled(events)
            fault = storage_error(exc)
            if fault is not None:  # disk full, size limit, read-only: the environment, not a bug
                return _report(fault, events, args._command)
            _quietly(events.error, f"{type(exc).__name__}: {exc}", kind="InternalError",
                     hint="this is a bug; the traceback is on stderr")
            traceback.print_exc()
            return 1
        finally:
            _RUNNING["command"] = False


def _cancelled(events: Events) -> int:
    _RUNNING["command"] = False
    _quietly(events.error, "cancelled", kind="Cancelled")
    print("cancelled: nothing half-written was left behind", file=sys.stderr)
    return 130


class _EventFile:
    """The --events file. A failed write (a full disk) is one StorageError naming the file,
    whenever it comes (the outputs the command has moved into place by then are kept); the
    stream is dropped after it, and closing it never raises."""

    def __init__(self, target: str):
        self.target = target
        self.file = open(target, "a", encoding="utf-8")  # noqa: SIM115 (closed by the command's ExitStack)
        self.broken = False

    def write(self, text: str) -> int:
        return self._do(lambda: self.file.write(text)) or 0

    def flush(self) -> None:
        self._do(self.file.flush)

    def _do(self, action):
        if self.broken:
            return None
        try:
            return action()
        except OSError as exc:
            self.broken = True
            cause, hint = os_error_cause(exc) or (str(exc), "check the disk that holds the event file")
            raise StorageError(f"cannot write the event file {self.target} (--events): {cause}; the outputs "
                               "already in place are kept", hint) from exc

    def close(self) -> None:
        with suppress(OSError):  # what a failed write left in the buffer is dropped
            self.file.close()


def _open_events(target: str | None, stack: ExitStack) -> Events:
    if target == "-":
        return Events(stream=sys.stdout)
    if not target or not writes_files():  # under torchrun rank 0 alone keeps the event file
        return Events(stream=None)
    try:
        stream = _EventFile(target)
    except OSError as exc:
        fault = storage_error(exc)
        if fault is None:
            raise
        raise StorageError(f"cannot open the event file (--events): {fault.message}", fault.hint) from exc
    stack.callback(stream.close)
    return Events(stream=cast(TextIO, stream))


def _report(exc: AsymKDError, events: Events, command: str) -> int:
    kind = type(exc).__name__
    hint = exc.hint or _DEFAULT_HINTS.get(kind, "").format(command=command) or None
    _quietly(events.error, exc.message, kind=kind, hint=hint)
    print(f"error: {exc.message}", file=sys.stderr)
    if hint:
        print(f"  hint: {hint}", file=sys.stderr)
    return 130 if isinstance(exc, Cancelled) else 2


def _quietly(emit, *args, **kwargs) -> None:
    """Report on the event stream unless the stream itself is what failed (disk full, closed pipe)."""
    with suppress(OSError, ValueError):
        emit(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
