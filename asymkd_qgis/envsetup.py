"""Creating the engine environment: a virtual environment with the pinned engine
requirements and the engine package itself, built from a system Python (never QGIS's own),
as a background task.

Where the wheels come from:
- online, torch for a machine without an NVIDIA GPU comes from torch's CPU index on Linux (the
  package registry's Linux torch is the 6 GB CUDA build); when that index cannot be reached the
  registry's build is installed instead and the message says so. With a GPU, and on Windows
  and macOS, torch comes from the registry (on Windows that is a CPU-only build: the message
  says how to get CUDA). Everything else comes from the registry.
- offline, from a folder of wheels (an offline bundle made by `make bundle`, or any folder of
  wheels): pip `--no-index --find-links`, after checking that the folder has a wheel of every
  requirement for this Python and platform.

The engine package is installed too (console script `asymkd`, `python -m asymkd`); when the
plugin runs the engine it still puts its own bundled copy first on PYTHONPATH, so plugin and
engine versions always match. A failed or cancelled creation removes what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from qgis.core import Qgis, QgsTask
from qgis.PyQt.QtCore import QObject, pyqtSignal

from . import paths, settings
from .engine import REQUIRED_MODULES, Engine, EngineUnavailable, stream_process
from .requirements import normalize, pinned, requirement_name, split_requirements
from .tasks import log

ENGINE_MODULES = REQUIRED_MODULES
# torch's own index of CPU builds (Linux); its CUDA indexes are siblings (cu126, cu128, ...).
DEFAULT_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEX_EXAMPLE = "https://download.pytorch.org/whl/cu128"
MIN_PYTHON = (3, 11)  # the engine uses tomllib and numpy 2.4
# The first pip version with `--progress-bar raw` (machine-readable download progress).
RAW_PROGRESS_PIP = (24, 1)
# Failing fast on an unreachable index: pip's default (5 retries, 15 s each) takes minutes.
FAST_FAIL = ["--retries", "1", "--timeout", "15"]
CANCELLED = "Creating the engine environment was cancelled; the partial environment was removed."
BASE_PYTHON_HINT = ("Install Python 3.11 or newer (python.org, or on Debian/Ubuntu: apt install python3 "
                    "python3-venv) or choose one in Plugins > AsymKD > Diagnostics... > Choose base Python...")


class SetupError(Exception):
    """Creating the environment cannot go on; the message says why and what to do."""


# -- the machine ---------------------------------------------------------------------------
def detect_gpu(nvidia_smi: str = "nvidia-smi", timeout_s: float = 15.0) -> str | None:
    """The first NVIDIA GPU `nvidia-smi -L` lists, or None (no driver, no GPU, error)."""
    exe = shutil.which(nvidia_smi) or (nvidia_smi if Path(nvidia_smi).is_file() else None)
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        match = re.match(r"\s*GPU\s+\d+:\s*(.+?)(\s+\(UUID.*)?$", line)
        if match:
            return match.group(1).strip()
    return None


def python_version(python: str) -> tuple[int, int] | None:
    try:
        proc = subprocess.run([python, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        major, minor = proc.stdout.split()
        return int(major), int(minor)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def find_base_python() -> str | None:
    """A system Python >= 3.11 to build the venv from: the setting, else the PATH."""
    stored = settings.get("engine/base_python", "", str)
    candidates = [stored] if stored else []
    names = ("python3.13", "python3.12", "python3.11", "python3", "python")
    if sys.platform == "win32":
        names = ("py", "python3", "python")
    candidates += [shutil.which(name) or "" for name in names]
    for candidate in candidates:
        if candidate and (python_version(candidate) or (0, 0)) >= MIN_PYTHON:
            return candidate
    return None


# -- requirements and wheels -----------------------------------------------------------------
@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # normalized
    version: str
    tags: frozenset[str]


def parse_wheel(path: Path) -> Wheel | None:
    """name-version(-build)-python-abi-platform.whl, with compressed tag sets expanded."""
    parts = path.name[:-4].split("-") if path.name.endswith(".whl") else []
    if len(parts) not in (5, 6):
        return None
    name, version, pythons, abis, platforms = parts[0], parts[1], parts[-3], parts[-2], parts[-1]
    tags = frozenset(f"{p}-{a}-{pl}"
                     for p in pythons.split(".") for a in abis.split(".") for pl in platforms.split("."))
    return Wheel(path, normalize(name), version, tags)


def find_wheels(folders: Sequence[Path]) -> list[Wheel]:
    wheels = (parse_wheel(path) for folder in folders for path in sorted(Path(folder).glob("*.whl")))
    return [w for w in wheels if w is not None]


def _version_matches(wheel_version: str, pin: str | None) -> bool:
    # `torch==2.14.1` accepts the local build `2.14.1+cpu`, as pip does.
    return pin is None or wheel_version == pin or wheel_version.split("+", 1)[0] == pin


def missing_wheels(requirements: Sequence[str], wheels: Sequence[Wheel], tags: set[str]) -> list[str]:
    """The requirements that no wheel in `wheels` satisfies for these tags, each with why."""
    missing = []
    for line in requirements:
        name, pin = normalize(requirement_name(line)), pinned(line)
        same = [w for w in wheels if w.name == name and _version_matches(w.version, pin)]
        if any(w.tags & tags for w in same):
            continue
        if same:
            missing.append(f"{line} (only for {', '.join(sorted({sorted(w.tags)[0] for w in same}))})")
        else:
            others = sorted({w.version for w in wheels if w.name == name})
            missing.append(f"{line}" + (f" (only versions {', '.join(others)})" if others else ""))
    return missing


# Run by the new environment's Python: its wheel tags (pip's own packaging) and pip version.
_TARGET_INFO = ("import json, platform, sys, pip\n"
                "from pip._vendor.packaging import tags\n"
                "print(json.dumps({'tags': [str(t) for t in tags.sys_tags()], 'pip': pip.__version__,"
                " 'python': platform.python_version(), 'platform': f'{sys.platform} {platform.machine()}'}))")


@dataclass
class Target:
    """What the new environment's Python is: for wheel checks and pip options."""

    tags: list[str]
    pip: tuple[int, ...]
    python: str
    platform: str

    @property
    def raw_progress(self) -> bool:
        return self.pip >= RAW_PROGRESS_PIP

    @property
    def minor_version(self) -> str:
        return ".".join(self.python.split(".")[:2])

    def describe(self) -> str:
        return f"Python {self.python} on {self.platform} ({self.tags[0] if self.tags else 'no wheel tags'})"


def target_info(python: Path) -> Target:
    proc = subprocess.run([str(python), "-c", _TARGET_INFO], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise SetupError(f"The new environment's Python {python} does not run pip: {last}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    version = tuple(int(p) for p in re.findall(r"\d+", info["pip"])[:2])
    return Target(info["tags"], version, info["python"], info["platform"])


def bundle_folders(folder: Path, gpu: str | None) -> tuple[list[Path], str]:
    """The wheel folders to install from, and which torch variant they hold.

    An offline bundle (`make bundle`) has wheels/common plus wheels/torch-cpu and/or
    wheels/torch-cuda; any other folder is taken as one flat folder of wheels.
    """
    root = Path(folder)
    wheels = root / "wheels" if (root / "wheels").is_dir() else root
    variants = {name: wheels / f"torch-{name}" for name in ("cpu", "cuda") if (wheels / f"torch-{name}").is_dir()}
    if not variants:
        return [wheels], "as found in the folder"
    choice = "cuda" if gpu and "cuda" in variants else ("cpu" if "cpu" in variants else "cuda")
    common = [wheels / "common"] if (wheels / "common").is_dir() else []
    return common + [variants[choice]], choice.upper()


# -- pip output ----------------------------------------------------------------------------------
_RETRY = re.compile(r"WARNING: Retrying \(Retry\(.*?\)\) after connection broken by '(.*)': (\S+)")
_REASON = re.compile(r"(\[Errno [^\]]+\][^'\")]*|[^'\"(]*timed out[^'\")]*|Cannot connect to proxy|"
                     r"certificate verify failed[^'\")]*|Max retries exceeded)")


def connection_problem(lines: Sequence[str]) -> str | None:
    """The reason in pip's connection retry or error lines ('Temporary failure in name
    resolution'), or None when pip did not have a connection problem."""
    for line in lines:
        if _RETRY.search(line) or "NewConnectionError" in line or "ConnectTimeoutError" in line \
                or "ProxyError" in line or "SSLError" in line:
            match = _REASON.search(line)
            return (match.group(1) if match else line.split(":", 1)[-1]).strip(" .'\"")
    return None


def pip_failure(lines: Sequence[str], returncode: int | None) -> str:
    """One line that says why pip failed (not the retries before it)."""
    errors = [line[len("ERROR: "):] if line.startswith("ERROR: ") else line
              for line in lines if line.startswith(("ERROR", "error:"))]
    useful = [e for e in errors if not e.startswith("Exception:")]
    if useful:
        return useful[0].strip()
    problem = connection_problem(lines)
    if problem:
        return f"the network failed: {problem}"
    last = next((line for line in reversed(lines) if line.strip()), "")
    return last.strip() or f"exit code {returncode}"


class PipProgress:
    """Reads pip's output lines: packages collected, the file being downloaded, bytes of it
    (`--progress-bar raw`: 'Progress 123 of 456'), installation; a fraction and a text."""

    def __init__(self, label: str, expected_packages: int):
        self.label = label
        self.expected = max(1, expected_packages)
        self.collected = 0
        self.current = ""
        self.size = ""
        self.done_bytes = 0
        self.total_bytes = 0
        self.downloaded_bytes = 0
        self.installing = False
        self.fraction = 0.0
        self.retries = 0

    def feed(self, line: str) -> bool:
        """Take one line; True when the progress text changed."""
        text = line.strip()
        if text.startswith("Collecting "):
            self.collected += 1
            self.current = requirement_name(text[len("Collecting "):])
            self.done_bytes = self.total_bytes = 0
        elif text.startswith(("Downloading ", "Processing ")):
            # a wheel from a folder is one "Processing FILE (from REQUIREMENT)" line, no "Collecting"
            if text.startswith("Processing "):
                self.collected += 1
            match = re.match(r"\S+\s+(\S+)(?:\s+\(([^)]+)\))?", text)
            if match:
                self.current = Path(match.group(1)).name.split("-")[0]
                size = match.group(2) or ""
                self.size = size if _SIZE.match(size) else ""
            self.done_bytes = self.total_bytes = 0
        elif text.startswith("Progress ") and " of " in text:
            try:
                done, total = (int(x) for x in text[len("Progress "):].split(" of ", 1))
            except ValueError:
                return False
            self.downloaded_bytes += max(0, done - self.done_bytes)
            self.done_bytes, self.total_bytes = done, total
        elif text.startswith("Installing collected packages"):
            self.installing = True
            self.collected = max(self.collected, len(text.split(":", 1)[-1].split(",")))
        elif _RETRY.search(text):
            self.retries += 1
            return False
        else:
            return False
        self._update_fraction()
        return True

    def _update_fraction(self) -> None:
        if self.installing:
            value = 0.9
        else:
            part = self.done_bytes / self.total_bytes if self.total_bytes else 0.0
            value = 0.85 * (max(0, self.collected - 1) + part) / max(self.expected, self.collected)
        self.fraction = max(self.fraction, min(0.95, value))

    def text(self) -> str:
        if self.installing:
            return f"{self.label}: installing {self.collected} packages"
        parts = [f"{self.label}: package {self.collected}"]
        if self.current:
            parts.append(self.current)
        if self.total_bytes:
            parts.append(f"{_mb(self.done_bytes)} of {_mb(self.total_bytes)}")
        elif self.size:
            parts.append(self.size)
        if self.downloaded_bytes:
            parts.append(f"{_mb(self.downloaded_bytes)} downloaded")
        return ", ".join(parts)


_SIZE = re.compile(r"^[\d.]+\s*[kMG]?B$")


def _mb(value: int) -> str:
    return f"{value / 1e6:.0f} MB" if value >= 10e6 else f"{value / 1e6:.1f} MB"


# -- the plan -----------------------------------------------------------------------------------
@dataclass
class PlanStep:
    label: str
    argv: list[str] = field(default_factory=list)
    weight: float = 1.0
    kind: str = "pip"  # venv, pip, torch, engine
    packages: int = 1  # how many requirements it installs (for progress)
    fallback: list[str] | None = None  # torch: the same from the package registry


@dataclass
class EnvPlan:
    """What creating the engine environment will run, in order."""

    venv: Path
    base_python: str
    gpu: str | None
    steps: list[PlanStep] = field(default_factory=list)
    check_modules: Sequence[str] = ENGINE_MODULES
    wheel_dirs: list[Path] = field(default_factory=list)  # offline: install from these only
    requirements: list[str] = field(default_factory=list)
    torch_index: str | None = None  # tried first for torch; the registry when it fails
    variant: str = ""  # which torch build the plan asks for
    engine_source: Path | None = None
    platform: str = sys.platform

    @property
    def python(self) -> Path:
        return settings.venv_python(self.venv)

    @property
    def offline(self) -> bool:
        return bool(self.wheel_dirs)

    @property
    def torch_build(self) -> str:
        return self.variant or (f"CUDA ({self.gpu})" if self.gpu else "CPU")

    def describe(self) -> str:
        """Where the packages come from, for the question before creating."""
        if self.offline:
            folders = ", ".join(map(str, self.wheel_dirs))
            return f"torch ({self.torch_build} build) and the engine packages from {folders} (no download)"
        if self.torch_index:
            return (f"torch as a CPU build from {self.torch_index} (the package registry's CUDA build when that "
                    "cannot be reached) and the engine packages from the package registry")
        windows_gpu = (f" (the package registry has no CUDA build of torch for Windows: the final message says how "
                       f"to get one for the {self.gpu})") if self.platform == "win32" and self.gpu else ""
        return f"torch ({self.torch_build} build){windows_gpu} and the engine packages from the package registry"


def torch_source(gpu: str | None, platform: str, cpu_index: str | None) -> tuple[str | None, str]:
    """(index to try first for torch, the build to expect) on this machine."""
    if platform.startswith("linux"):
        if gpu:
            return None, f"CUDA ({gpu})"
        return (cpu_index, "CPU") if cpu_index else (None, "CUDA (runs on the CPU too)")
    if platform == "win32":
        return None, "CPU"  # the registry's only build there (torch_notes says how to get CUDA)
    return None, "CPU/MPS"


def make_plan(venv: Path, base_python: str, requirements: Path | None, gpu: str | None,
              cpu_index: str | None = DEFAULT_CPU_INDEX, cuda_index: str | None = None,
              check_modules: Sequence[str] = ENGINE_MODULES, wheels: Path | None = None,
              engine_source: Path | None = None, platform: str = sys.platform,
              registry: Sequence[str] = ()) -> EnvPlan:
    """The steps for this machine. `wheels`: install offline from that folder (or bundle);
    `registry`: pip options that name the package registry (default: pip's own)."""
    plan = EnvPlan(Path(venv), base_python, gpu, check_modules=check_modules, engine_source=engine_source,
                   platform=platform)
    python = str(plan.python)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    plan.steps.append(PlanStep("creating the virtual environment", [base_python, "-m", "venv", str(plan.venv)],
                               1.0, kind="venv"))
    torch_lines, other = split_requirements(requirements)
    plan.requirements = torch_lines + other
    # A current pip shows download progress in bytes (--progress-bar raw); the venv's own may
    # be older. Not essential: a failure here is logged and the old pip goes on.
    upgrade = pip + ["--upgrade", "pip"]
    if wheels is not None:
        plan.wheel_dirs, plan.variant = bundle_folders(wheels, gpu)
        links = [arg for folder in plan.wheel_dirs for arg in ("--find-links", str(folder))]
        if any(w.name == "pip" for w in find_wheels(plan.wheel_dirs)):
            plan.steps.append(PlanStep("updating pip", upgrade[:-2] + ["--no-index", *links, "--upgrade", "pip"],
                                       0.2, kind="pip-upgrade"))
        if plan.requirements:
            plan.steps.append(PlanStep("installing the engine packages from the folder",
                                       pip + ["--no-index", *links, *plan.requirements], 6.0,
                                       packages=len(plan.requirements)))
    else:
        plan.steps.append(PlanStep("updating pip", pip[:6] + list(registry) + ["--upgrade", "pip"], 0.2,
                                   kind="pip-upgrade"))
        if torch_lines:
            if gpu and cuda_index:
                plan.torch_index, plan.variant = cuda_index, f"CUDA ({gpu})"
            else:
                plan.torch_index, plan.variant = torch_source(gpu, platform, cpu_index)
            first = ["--index-url", plan.torch_index, *FAST_FAIL] if plan.torch_index else list(registry)
            plan.steps.append(PlanStep(f"installing torch ({plan.variant} build)", pip + first + torch_lines, 6.0,
                                       kind="torch", packages=len(torch_lines) * 8,
                                       fallback=pip + list(registry) + torch_lines if plan.torch_index else None))
        if other:
            plan.steps.append(PlanStep("installing the engine requirements", pip + list(registry) + other, 3.0,
                                       packages=len(other) * 2))
    if engine_source is not None:
        plan.steps.append(PlanStep("installing the engine package", pip + ["--no-deps"], 0.5, kind="engine"))
    return plan


def engine_version(source: Path) -> str:
    text = (source / "asymkd" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return match.group(1) if match else ""


# -- running it -----------------------------------------------------------------------------------
class EnvironmentBuilder(QObject):
    """Python-side record of one environment creation (outlives its QgsTask)."""

    progressChanged = pyqtSignal(float, str)
    builderFinished = pyqtSignal(object)

    def __init__(self, plan: EnvPlan, parent: QObject | None = None):
        super().__init__(parent)
        self.plan = plan
        self.ok: bool | None = None
        self.cancelled = False
        self.message = ""
        self.version = ""
        self.torch = ""  # what torch build is really installed
        self.notes: list[str] = []  # what the user should know (fallbacks, CUDA on Windows)
        self.elapsed_s = 0.0
        self.task: EnvironmentTask | None = None

    def start(self) -> "EnvironmentBuilder":
        from qgis.core import QgsApplication
        self.task = EnvironmentTask(self)
        QgsApplication.taskManager().addTask(self.task)
        return self

    def cancel(self) -> None:
        if self.task is not None:
            with contextlib.suppress(RuntimeError):
                self.task.cancel()

    @property
    def done(self) -> bool:
        return self.ok is not None

    def _finish(self, ok: bool) -> None:
        self.ok = ok
        self.task = None
        if ok:
            settings.set_engine_python(self.plan.python)
        self.builderFinished.emit(self)


class EnvironmentTask(QgsTask):
    def __init__(self, builder: EnvironmentBuilder):
        super().__init__("AsymKD: creating the engine environment", QgsTask.Flag.CanCancel)
        self.builder = builder
        self.target: Target | None = None
        self.failure_lines: list[str] = []  # the output of the last program that failed
        self.owns_folder = False  # True once the folder is ours to fill (and to remove on failure)

    # worker thread ----------------------------------------------------------------------
    def run(self) -> bool:
        import time
        start = time.monotonic()
        plan = self.builder.plan
        log(f"Creating the engine environment in {plan.venv}: {plan.describe()}")
        try:
            self._prepare_folder(plan.venv)
            ok = self._run_steps(plan)
            if ok:
                self._check(plan)
            return ok
        except (SetupError, EngineUnavailable) as exc:
            self.builder.message = str(exc)
            return False
        except Exception as exc:  # never let a failure here take QGIS down
            self.builder.message = f"Creating the engine environment failed: {type(exc).__name__}: {exc}"
            return False
        finally:
            self.builder.elapsed_s = time.monotonic() - start
            if not self.builder.version and self.owns_folder:
                self._remove_partial(plan.venv)

    def _prepare_folder(self, venv: Path) -> None:
        """An existing environment there is replaced; anything else is left alone."""
        if venv.exists() and not (venv / "pyvenv.cfg").is_file() and any(venv.iterdir()):
            raise SetupError(f"{venv} exists and is not a Python environment: move it away, or choose an "
                             "existing engine Python (Plugins > AsymKD > Diagnostics...).")
        self.owns_folder = True
        if venv.exists():
            log(f"Replacing the environment in {venv}")
            shutil.rmtree(venv)

    def _remove_partial(self, venv: Path) -> None:
        if not venv.exists():
            return
        shutil.rmtree(venv, ignore_errors=True)
        if venv.exists():
            self.builder.message += f" The partial environment {venv} could not be removed completely: delete it."
        else:
            log(f"Removed the partial environment {venv}")

    def _run_steps(self, plan: EnvPlan) -> bool:
        total = sum(step.weight for step in plan.steps) + 1.0
        done = 0.0
        for step in plan.steps:
            if self.isCanceled():
                return self._cancelled()
            base, span = 100.0 * done / total, 100.0 * step.weight / total
            self._report(base, step.label)
            if step.kind == "venv":
                ok = self._run(step, step.argv, base, span)
                if ok:
                    self.target = target_info(plan.python)
                    if plan.offline:
                        self._check_wheels(plan)
            elif step.kind == "pip-upgrade":
                if self._run(step, step.argv, base, span, quiet_failure=True):
                    self.target = target_info(plan.python)
                elif self.builder.cancelled:
                    return False
                else:
                    log(f"pip could not be updated ({pip_failure(self.failure_lines, None)}); going on with "
                        "the environment's own pip", Qgis.MessageLevel.Warning)
                ok = True
            elif step.kind == "torch":
                ok = self._torch(plan, step, base, span)
            elif step.kind == "engine":
                ok = self._engine_package(plan, step, base, span)
            else:
                ok = self._run(step, self._pip_argv(step.argv), base, span)
            if not ok:
                return False
            done += step.weight
        self._report(100.0 * done / total, "checking the environment (importing torch takes a while)")
        return True

    def _pip_argv(self, argv: list[str]) -> list[str]:
        if self.target is not None and self.target.raw_progress and "pip" in argv[1:3]:
            return argv + ["--progress-bar", "raw"]
        return argv

    def _run(self, step: PlanStep, argv: list[str], base: float, span: float, quiet_failure: bool = False) -> bool:
        """One program to its end; False (and the message) when it fails or is cancelled."""
        progress = PipProgress(step.label, step.packages)
        lines: list[str] = []

        def on_line(line: str) -> None:
            lines.append(line)
            if progress.feed(line):
                self._report(base + span * progress.fraction, progress.text())
            elif progress.retries == 1 and _RETRY.search(line):
                log(line, Qgis.MessageLevel.Warning)  # the first retry only: the rest say the same
            elif line.strip() and not line.startswith(("Progress ", "WARNING: Retrying")):
                log(line, Qgis.MessageLevel.Warning if line.startswith(("ERROR", "error")) else Qgis.MessageLevel.Info)

        log(f"{step.label}: {' '.join(argv)}")
        result = stream_process(argv, on_stdout=on_line, on_stderr=on_line, is_cancelled=self.isCanceled)
        if progress.retries > 1:
            log(f"{step.label}: pip retried {progress.retries} times", Qgis.MessageLevel.Warning)
        if result.cancelled:
            return self._cancelled()
        if result.returncode != 0:
            self.failure_lines = lines
            if not quiet_failure:
                self.builder.message = self._failure(step, argv, lines, result.returncode)
            return False
        return True

    def _failure(self, step: PlanStep, argv: list[str], lines: list[str], returncode: int | None) -> str:
        if step.kind == "venv":
            last = next((line for line in reversed(lines) if line.strip()), f"exit code {returncode}")
            hint = " (on Debian/Ubuntu: apt install python3-venv)" if "ensurepip" in last or "venv" in last else ""
            return f"Creating the engine environment failed while {step.label}: {last}{hint}"
        reason = pip_failure(lines, returncode)
        if "--no-index" in argv and "satisfies the requirement" in reason:
            reason += " (the folder lacks this wheel or one of its dependencies)"
        return f"Creating the engine environment failed while {step.label}: {reason}"

    def _cancelled(self) -> bool:
        self.builder.cancelled = True
        self.builder.message = CANCELLED
        return False

    def _check_wheels(self, plan: EnvPlan) -> None:
        tags = set(self.target.tags) if self.target else set()
        found = find_wheels(plan.wheel_dirs)
        if not found:
            raise SetupError(f"{', '.join(map(str, plan.wheel_dirs))} holds no wheels (.whl files): choose the "
                             "unpacked offline bundle (the folder with install.sh and wheels/) or a folder of wheels.")
        missing = missing_wheels(plan.requirements, found, tags)
        if missing:
            folders = ", ".join(map(str, plan.wheel_dirs))
            raise SetupError(f"The wheel folder {folders} has no wheels for {self.target.describe()} of: "
                             f"{'; '.join(missing)}. Build a bundle for it (make bundle BUNDLE_PYTHON="
                             f"{self.target.minor_version}) or use Create engine environment (online).")

    def _torch(self, plan: EnvPlan, step: PlanStep, base: float, span: float) -> bool:
        """torch from the index chosen for this machine; from the registry when that fails (pip's
        own network settings apply; an unreachable index fails within seconds, see FAST_FAIL)."""
        if self._run(step, self._pip_argv(step.argv), base, span, quiet_failure=step.fallback is not None):
            return True
        if self.builder.cancelled or step.fallback is None:
            return False
        problem = connection_problem(self.failure_lines)
        host = re.sub(r"^\w+://([^/]+).*$", r"\1", plan.torch_index or "")
        why = (f"could not be reached ({problem})" if problem
               else f"failed ({pip_failure(self.failure_lines, None)})")
        note = (f"{host} {why}, so torch came from the package registry instead"
                + (" (on Linux: the CUDA build, a larger download)." if plan.platform.startswith("linux") else "."))
        self.builder.notes.append(note)
        log(note, Qgis.MessageLevel.Warning)
        fallback = PlanStep(f"installing torch from the package registry ({host} {why.split(' (')[0]})",
                            step.fallback, step.weight, packages=step.packages)
        return self._run(fallback, self._pip_argv(step.fallback), base, span)

    def _engine_package(self, plan: EnvPlan, step: PlanStep, base: float, span: float) -> bool:
        """The engine as a package (console script, python -m asymkd): its wheel from the folder,
        else built from a copy of the plugin's engine source (the copy keeps build files out
        of the plugin folder)."""
        source = plan.engine_source
        version = engine_version(source)
        if plan.offline and any(w.name == "asymkd" for w in find_wheels(plan.wheel_dirs)):
            links = [a for folder in plan.wheel_dirs for a in ("--find-links", str(folder))]
            return self._run(step, self._pip_argv(step.argv + ["--no-index", *links, f"asymkd=={version}"]), base, span)
        with tempfile.TemporaryDirectory(prefix="asymkd-engine-") as tmp:
            copy = Path(tmp) / "engine"
            shutil.copytree(source / "asymkd", copy / "asymkd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            shutil.copy2(source / "pyproject.toml", copy / "pyproject.toml")
            extra = ["--no-index", "--no-build-isolation"] if plan.offline else []
            return self._run(step, self._pip_argv(step.argv + extra + [str(copy)]), base, span)

    def _check(self, plan: EnvPlan) -> None:
        engine = Engine(python=plan.python, source=paths.engine_source_dir())
        state = engine.state(plan.check_modules, imports=True, timeout_s=300)
        if not state.working:
            raise SetupError(f"The new environment does not work: {state.message}")
        self.builder.version = state.version
        self.builder.torch = installed_torch(plan.python) if "torch" in plan.check_modules else ""
        self.builder.notes += torch_notes(self.builder.torch, plan)
        built = f" with {self.builder.torch}" if self.builder.torch else ""
        self.builder.message = " ".join([f"The engine environment is ready: {plan.python}{built}.",
                                         *self.builder.notes])

    def _report(self, percent: float, text: str) -> None:
        self.setProgress(percent)
        self.builder.progressChanged.emit(percent, text)

    # main thread ------------------------------------------------------------------------
    def finished(self, result: bool) -> None:
        self.builder._finish(bool(result))


_TORCH_INFO = "import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda}))"


def installed_torch(python: Path) -> str:
    """'torch 2.14.1+cpu (CPU build)' or 'torch 2.14.1 (CUDA 12.8 build)': what is really there."""
    try:
        proc = subprocess.run([str(python), "-c", _TORCH_INFO], capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return ""
    build = f"CUDA {info['cuda']} build" if info.get("cuda") else "CPU build"
    return f"torch {info.get('version')} ({build})"


def torch_notes(torch: str, plan: EnvPlan) -> list[str]:
    """What a user with this torch on this machine should know."""
    notes = []
    cuda_build = "CUDA" in torch
    if plan.platform == "win32" and plan.gpu and not cuda_build:
        notes.append(f"The package registry's torch for Windows is CPU-only. For CUDA on the {plan.gpu}, run: "
                     f"\"{plan.python}\" -m pip install --force-reinstall torch torchvision --index-url "
                     f"{CUDA_INDEX_EXAMPLE} (pick the CUDA version for your driver on pytorch.org).")
    elif not plan.gpu and cuda_build:
        notes.append("No NVIDIA GPU was found: this CUDA build runs on the CPU.")
    return notes


def default_plan(venv: Path | None = None, wheels: Path | None = None) -> EnvPlan:
    """The plan for this machine: the settings' base Python, bundled requirements, GPU check;
    `wheels`: install from that folder (or offline bundle) without any download."""
    base = find_base_python()
    if base is None:
        raise EngineUnavailable("No system Python 3.11 or newer was found to create the engine environment.",
                                BASE_PYTHON_HINT)
    requirements = paths.requirements_file()
    if requirements is None:
        raise EngineUnavailable("The engine source (backend/requirements.txt) is missing from the plugin.",
                                "Reinstall the plugin from its zip.")
    if wheels is not None and not Path(wheels).is_dir():
        raise EngineUnavailable(f"The wheel folder {wheels} does not exist.", "Choose the unpacked offline bundle.")
    gpu = detect_gpu(settings.get("engine/nvidia_smi", "nvidia-smi", str))
    cpu_index = settings.get("engine/torch_cpu_index", DEFAULT_CPU_INDEX, str) or None
    cuda_index = settings.get("engine/torch_cuda_index", "", str) or None
    return make_plan(venv or settings.default_engine_dir(), base, requirements, gpu, cpu_index, cuda_index,
                     wheels=Path(wheels) if wheels else None, engine_source=paths.engine_source_dir())
