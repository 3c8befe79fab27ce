"""Running the AsymKD engine as a subprocess and reading its JSON-lines events.

The engine lives in its own Python environment (torch, current numpy); QGIS's Python never
imports it. One engine command = one subprocess started with an argument list (no shell),
`--events -` so every event arrives as one JSON line on stdout. This module has no Qt
dependency: the QgsTask (tasks.py) and the Processing algorithms both call `run_engine`.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import paths

# Exit codes of the engine CLI.
EXIT_OK, EXIT_CRASH, EXIT_USER_ERROR, EXIT_CANCELLED = 0, 1, 2, 130

# After SIGTERM the engine gets this long to clean up before the process group is killed;
# together with the poll interval this keeps a cancel under 5 seconds.
TERMINATE_GRACE_S = 3.0
POLL_S = 0.1

# Environment variables of the QGIS process that must not leak into the engine's Python
# or its own GDAL/PROJ (rasterio wheels bring their own data files).
_DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PYTHONSAFEPATH",
                "VIRTUAL_ENV", "GDAL_DATA", "GDAL_DRIVER_PATH", "PROJ_LIB", "PROJ_DATA",
                "QGIS_PREFIX_PATH", "LD_PRELOAD")

# Runs the CLI without relying on a console script or `python -m` entry point.
_LAUNCH = "import sys; from asymkd.cli import main; sys.exit(main())"


class EngineUnavailable(Exception):
    """The engine environment is missing or broken; the message says which and how to fix."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


@dataclass
class EngineError:
    kind: str
    message: str
    hint: str | None = None

    def text(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


@dataclass
class Outcome:
    """What one engine command did: exit code, results, metrics, the last error."""

    command: str
    returncode: int | None = None
    cancelled: bool = False
    results: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: EngineError | None = None
    warnings: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == EXIT_OK and not self.cancelled

    def message(self) -> str:
        """A one-paragraph explanation for the user of why the command did not succeed."""
        if self.cancelled or self.returncode == EXIT_CANCELLED:
            return f"'{self.command}' was cancelled; nothing was added."
        if self.error is not None:
            return self.error.text()
        if self.returncode == EXIT_OK:
            return f"'{self.command}' finished."
        tail = [line for line in self.stderr_tail if line.strip()]
        last = tail[-1] if tail else "no error message"
        return f"The engine stopped with exit code {self.returncode} during '{self.command}': {last}"


@dataclass
class Engine:
    """How to start the engine: its Python and the engine source folder it imports."""

    python: Path
    source: Path | None = None

    @classmethod
    def from_settings(cls) -> "Engine":
        from . import settings  # QGIS import kept out of module import for plain tests
        return cls(python=settings.engine_python(), source=paths.engine_source_dir())

    def argv(self, args: Sequence[str], events: bool = True) -> list[str]:
        argv = [str(self.python), "-c", _LAUNCH, *[str(a) for a in args]]
        if events:
            argv += ["--events", "-"]
        return argv

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        if self.source is not None:
            env["PYTHONPATH"] = str(self.source)  # the engine version that ships with the plugin
        env.update(PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8",
                   PYTHONUTF8="1")
        return env

    # -- health ----------------------------------------------------------------------
    def check(self, modules: Sequence[str] = ("asymkd",), timeout_s: float = 60.0) -> str:
        """Raise EngineUnavailable unless the engine Python runs and imports `modules`.

        Returns the engine version. Importing torch takes seconds, so callers pass the heavy
        modules only where it matters (diagnostics, environment creation).
        """
        hint = "Create the engine environment (AsymKD toolbar > Create engine environment) or choose its Python in the diagnostics view."
        if not self.python.exists():
            raise EngineUnavailable(f"The AsymKD engine environment is missing: {self.python} does not exist.", hint)
        code = "import importlib, sys\n" \
               f"mods = {list(modules)!r}\n" \
               "for m in mods:\n" \
               "    try:\n        importlib.import_module(m)\n" \
               "    except Exception as e:\n        print('MISSING', m, type(e).__name__, e); sys.exit(3)\n" \
               "import asymkd; print('VERSION', asymkd.__version__)"
        try:
            proc = subprocess.run([str(self.python), "-c", code], env=self.env(), capture_output=True,
                                  text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
                                  **_popen_platform_kwargs(new_group=False))
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EngineUnavailable(f"The AsymKD engine environment is broken: {self.python} cannot run ({exc}).", hint) from exc
        lines = (proc.stdout + proc.stderr).splitlines()
        for line in lines:
            if line.startswith("MISSING"):
                raise EngineUnavailable(f"The AsymKD engine environment is broken: {line[8:]}.", hint)
            if line.startswith("VERSION"):
                return line.split(" ", 1)[1].strip()
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise EngineUnavailable(f"The AsymKD engine environment is broken: {last}", hint)


def _popen_platform_kwargs(new_group: bool = True) -> dict[str, Any]:
    if sys.platform == "win32":
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        if new_group:
            flags |= getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        return {"creationflags": flags}
    # Own process group: a cancel can kill data-loader workers the engine started too.
    return {"start_new_session": new_group}


def parse_line(line: str) -> dict[str, Any] | None:
    """One stdout line -> event dict, or None for a line that is not an event."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "event" in record else None


def _reader(stream, tag: str, sink: "queue.Queue[tuple[str, str | None]]") -> None:
    for raw in iter(stream.readline, b""):
        sink.put((tag, raw.decode("utf-8", errors="replace").rstrip("\r\n")))
    sink.put((tag, None))


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM (the engine cleans up and exits 130), then kill the whole group."""
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=grace_s)
        return
    except subprocess.TimeoutExpired:
        pass
    except OSError:
        return
    try:
        if sys.platform != "win32":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (OSError, ProcessLookupError):
        pass
    proc.wait(timeout=grace_s)


EventCallback = Callable[[dict[str, Any]], None]
LineCallback = Callable[[str], None]


@dataclass
class ProcessResult:
    returncode: int | None
    cancelled: bool
    stderr_tail: list[str]


def stream_process(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                   on_stdout: LineCallback | None = None, on_stderr: LineCallback | None = None,
                   is_cancelled: Callable[[], bool] = lambda: False,
                   on_start: Callable[[int], None] | None = None,
                   grace_s: float = TERMINATE_GRACE_S) -> ProcessResult:
    """Run a program (argument list, no shell), hand each output line to a callback in the
    calling thread, and terminate it within grace_s + POLL_S once `is_cancelled()` says so."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=cwd, **_popen_platform_kwargs())
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    readers = [threading.Thread(target=_reader, args=(proc.stdout, "out", lines), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, "err", lines), daemon=True)]
    for reader in readers:
        reader.start()
    stderr_tail: deque[str] = deque(maxlen=40)
    cancelled = False
    open_streams = 2
    try:
        if on_start is not None:
            on_start(proc.pid)
        while open_streams:
            if is_cancelled():
                cancelled = True
                _stop(proc, grace_s)
                break
            try:
                tag, text = lines.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if text is None:
                open_streams -= 1
            elif tag == "err":
                stderr_tail.append(text)
                if on_stderr is not None:
                    on_stderr(text)
            elif on_stdout is not None:
                on_stdout(text)
        if not cancelled:
            proc.wait()
    finally:
        if proc.poll() is None:  # an exception in a callback: never leave the process running
            _stop(proc, grace_s)
        for reader in readers:
            reader.join(timeout=1.0)
    return ProcessResult(proc.returncode, cancelled, list(stderr_tail))


def run_engine(engine: Engine, args: Sequence[str], *, on_event: EventCallback | None = None,
               on_stderr: LineCallback | None = None,
               is_cancelled: Callable[[], bool] = lambda: False,
               on_start: Callable[[int], None] | None = None,
               cwd: str | None = None, grace_s: float = TERMINATE_GRACE_S) -> Outcome:
    """Run one engine command to the end (or until cancelled) and return its outcome.

    `on_event` is called in the calling thread for every event, `on_stderr` for every
    stderr line. A cancel terminates the subprocess and returns within grace_s + POLL_S.
    """
    outcome = Outcome(command=str(args[0]) if args else "")
    start = time.monotonic()
    try:
        result = stream_process(engine.argv(args), env=engine.env(), cwd=cwd,
                                on_stdout=lambda text: _handle_stdout(text, outcome, on_event),
                                on_stderr=on_stderr, is_cancelled=is_cancelled, on_start=on_start,
                                grace_s=grace_s)
    except OSError as exc:
        raise EngineUnavailable(f"The AsymKD engine could not be started with {engine.python}: {exc}",
                                "Create the engine environment or choose its Python in the diagnostics view.") from exc
    outcome.returncode = result.returncode
    outcome.cancelled = result.cancelled or result.returncode == EXIT_CANCELLED
    outcome.stderr_tail = result.stderr_tail
    outcome.elapsed_s = time.monotonic() - start
    return outcome


def _handle_stdout(text: str, outcome: Outcome, on_event: EventCallback | None) -> None:
    event = parse_line(text)
    if event is None:
        if not text.strip():
            return
        event = {"event": "log", "level": "info", "message": text}  # a stray print
    kind = event.get("event")
    if kind == "result":
        outcome.results.update({str(k): str(v) for k, v in (event.get("paths") or {}).items()})
    elif kind == "metrics":
        outcome.metrics[str(event.get("step", ""))] = dict(event.get("metrics") or {})
    elif kind == "error":
        outcome.error = EngineError(kind=str(event.get("kind", "error")),
                                    message=str(event.get("message", "")), hint=event.get("hint"))
    elif kind == "warning":
        outcome.warnings.append(str(event.get("message", "")))
    if kind != "progress":  # progress events are many and only the latest matters
        outcome.events.append(event)
    if on_event is not None:
        on_event(event)


def describe_progress(event: dict[str, Any]) -> str:
    """'teacher: 3/10 epochs, 2.1 it/s, 12 s left' from a progress event."""
    step = event.get("step", "")
    done, total = event.get("done"), event.get("total")
    parts = [f"{step}: {done}/{total}" + (f" {event['unit']}" if event.get("unit") else "")]
    if event.get("rate"):
        parts.append(f"{event['rate']:.3g}/s")
    eta = event.get("eta_s")
    if eta is not None:
        parts.append(f"{_seconds(eta)} left")
    return ", ".join(parts)


def _seconds(value: float) -> str:
    value = int(round(float(value)))
    if value < 90:
        return f"{value} s"
    if value < 5400:
        return f"{value // 60} min {value % 60:02d} s"
    return f"{value // 3600} h {(value % 3600) // 60:02d} min"
