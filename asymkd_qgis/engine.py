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


# The event protocol this plugin reads (the engine's `events.PROTOCOL_VERSION`, "major.minor").
# The engine sends its version in the first event of every command; another major is refused.
PROTOCOL_VERSION = "1.0"

# What the engine imports to run at all; an environment without one of them is broken.
REQUIRED_MODULES = ("numpy", "torch", "onnxruntime", "rasterio", "asymkd")

# Where the user fixes a missing or broken engine (the names of the plugin's own UI).
ENVIRONMENT_HINT = ("Create it with the button at the top of the AsymKD dock (or Plugins > AsymKD > "
                    "Create engine environment...), or choose an existing one in Plugins > AsymKD > "
                    "Diagnostics... > Choose engine Python...")

# Prints one PROBE line: the modules that cannot be found (or imported) and the engine version.
_PROBE = """
import importlib, importlib.util, json, sys
modules, do_import = json.loads(sys.argv[1]), sys.argv[2] == "1"
missing = {}
for name in modules:
    try:
        if do_import:
            importlib.import_module(name)
        elif importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named '{name}'")
    except Exception as exc:
        missing[name] = f"{type(exc).__name__}: {exc}"
version = ""
try:
    import asymkd
    version = str(asymkd.__version__)
except Exception as exc:
    missing.setdefault("asymkd", f"{type(exc).__name__}: {exc}")
print("PROBE " + json.dumps({"missing": missing, "version": version}), flush=True)
"""

MISSING, BROKEN, WORKING = "missing", "broken", "working"


class EngineUnavailable(Exception):
    """The engine environment is missing or broken; the message says which and how to fix."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


class EngineMismatch(EngineUnavailable):
    """The engine speaks another major version of the event protocol than this plugin."""


def _major(version: Any) -> str:
    return str(version).split(".", 1)[0] if version not in (None, "") else ""


def check_protocol(event: dict[str, Any]) -> None:
    """EngineMismatch unless `event` (an engine command's first) speaks this plugin's protocol."""
    version = event.get("protocol")
    if _major(version) == _major(PROTOCOL_VERSION):
        return
    engine = event.get("engine") or "(version unknown)"
    spoken = f"event protocol {version}" if version not in (None, "") else "no event protocol version (an older engine)"
    needed = paths.plugin_version()
    raise EngineMismatch(f"The AsymKD engine {engine} speaks {spoken}; this plugin reads protocol "
                         f"{PROTOCOL_VERSION} and needs AsymKD engine {needed}.",
                         f"Install engine {needed}: Plugins > AsymKD > Create engine environment... "
                         f"installs the engine that ships with this plugin.")


@dataclass
class EngineState:
    """What the engine environment is: missing, broken (which modules) or working (version)."""

    kind: str
    message: str
    hint: str = ""
    version: str = ""
    missing: tuple[str, ...] = ()

    @property
    def working(self) -> bool:
        return self.kind == WORKING


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
    engine_version: str | None = None  # from the first event, once its protocol is checked

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
    required: tuple[str, ...] = REQUIRED_MODULES

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
    def state(self, modules: Sequence[str] | None = None, imports: bool = False,
              timeout_s: float = 60.0) -> EngineState:
        """Whether the engine Python runs and has `modules` (default: what the engine needs).

        With imports=False the modules are only looked up (fast: no torch import), which finds
        what a failed or cancelled installation left out; imports=True imports each of them.
        """
        modules = list(self.required if modules is None else modules)
        if not self.python.exists():
            return EngineState(MISSING, f"The AsymKD engine environment is missing: {self.python} does not exist.",
                               ENVIRONMENT_HINT)
        argv = [str(self.python), "-c", _PROBE, json.dumps(modules), "1" if imports else "0"]
        try:
            proc = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL, **_popen_platform_kwargs(new_group=False))
        except (OSError, subprocess.TimeoutExpired) as exc:
            return EngineState(BROKEN, f"The AsymKD engine environment is broken: {self.python} cannot run ({exc}).",
                               ENVIRONMENT_HINT)
        report = next((line[6:] for line in proc.stdout.splitlines() if line.startswith("PROBE ")), None)
        if report is None:
            lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit code {proc.returncode}"
            return EngineState(BROKEN, f"The AsymKD engine environment is broken: {self.python} fails ({last}).",
                               ENVIRONMENT_HINT)
        found = json.loads(report)
        missing: dict[str, str] = found.get("missing") or {}
        if missing:
            names = ", ".join(missing)
            first = next(iter(missing.values()))
            return EngineState(BROKEN, f"The AsymKD engine environment of {self.python} is broken: {names} "
                               f"cannot be {'imported' if imports else 'found'} ({first}).", ENVIRONMENT_HINT,
                               missing=tuple(missing))
        version = str(found.get("version") or "")
        return EngineState(WORKING, f"AsymKD engine {version} in {self.python}", version=version)

    def check(self, modules: Sequence[str] | None = None, timeout_s: float = 60.0, imports: bool = False) -> str:
        """The engine version; EngineUnavailable (with what to do) unless state() says working."""
        state = self.state(modules, imports=imports, timeout_s=timeout_s)
        if not state.working:
            raise EngineUnavailable(state.message, state.hint)
        return state.version


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
    try:
        for raw in iter(stream.readline, b""):
            sink.put((tag, raw.decode("utf-8", errors="replace").rstrip("\r\n")))
    finally:
        # Closed by the thread that reads it (closing it from another thread could block on a
        # pipe a grandchild keeps open): no `ResourceWarning: unclosed file` in QGIS's log.
        stream.close()
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


def _pump_lines(lines: queue.Queue[tuple[str, str | None]], is_cancelled: Callable[[], bool],
                on_line: Callable[[str, str], None]) -> bool:
    """Hand each (stream tag, line) to on_line until both streams end; True when cancelled first."""
    open_streams = 2
    while open_streams:
        if is_cancelled():
            return True
        try:
            tag, text = lines.get(timeout=POLL_S)
        except queue.Empty:
            continue
        if text is None:
            open_streams -= 1
        else:
            on_line(tag, text)
    return False


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

    def on_line(tag: str, text: str) -> None:
        if tag == "err":
            stderr_tail.append(text)
            if on_stderr is not None:
                on_stderr(text)
        elif on_stdout is not None:
            on_stdout(text)

    try:
        if on_start is not None:
            on_start(proc.pid)
        cancelled = _pump_lines(lines, is_cancelled, on_line)
        if cancelled:
            _stop(proc, grace_s)
        else:
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
    An engine that speaks another event protocol is stopped at its first event (EngineMismatch).
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
                                ENVIRONMENT_HINT) from exc
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
    elif outcome.engine_version is None:
        check_protocol(event)  # raising here stops the process (stream_process)
        outcome.engine_version = str(event.get("engine") or "")
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
