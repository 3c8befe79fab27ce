"""Planning the engine environment: a virtual environment with the pinned engine
requirements and the engine package itself, built from a system Python (never QGIS's own).
This module makes the plan and reads pip's output; envbuilder.py runs the plan as a
background task.

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

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import paths, settings
from .engine import REQUIRED_MODULES, EngineUnavailable
from .requirements import normalize, pinned, requirement_name, split_requirements

ENGINE_MODULES = REQUIRED_MODULES
# torch's own index of CPU builds (Linux); its CUDA indexes are siblings (cu126, cu128, ...).
DEFAULT_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEX_EXAMPLE = "https://download.pytorch.org/whl/cu128"
MIN_PYTHON = (3, 11)  # the engine uses tomllib and numpy 2.4
# The first pip version with `--progress-bar raw` (machine-readable download progress).
RAW_PROGRESS_PIP = (24, 1)
# Failing fast on an unreachable index: pip's default (5 retries, 15 s each) takes minutes.
FAST_FAIL = ["--retries", "1", "--timeout", "15"]
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
RETRY_LINE = re.compile(r"WARNING: Retrying \(Retry\(.*?\)\) after connection broken by '(.*)': (\S+)")
_REASON = re.compile(r"(\[Errno [^\]]+\][^'\")]*|[^'\"(]*timed out[^'\")]*|Cannot connect to proxy|"
                     r"certificate verify failed[^'\")]*|Max retries exceeded)")


def connection_problem(lines: Sequence[str]) -> str | None:
    """The reason in pip's connection retry or error lines ('Temporary failure in name
    resolution'), or None when pip did not have a connection problem."""
    for line in lines:
        if RETRY_LINE.search(line) or "NewConnectionError" in line or "ConnectTimeoutError" in line \
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
        elif RETRY_LINE.search(text):
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
