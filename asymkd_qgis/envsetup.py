"""Creating the engine environment: a virtual environment with the pinned engine
requirements, built from a system Python (never QGIS's own), as a background task.

torch comes as a CUDA build when `nvidia-smi` lists a GPU, as a CPU build otherwise (the
CPU build is a fraction of the download). The engine source itself is not installed: the
plugin puts its bundled copy on PYTHONPATH when it starts the engine, so plugin and engine
versions always match.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from qgis.core import Qgis, QgsTask
from qgis.PyQt.QtCore import QObject, pyqtSignal

from . import paths, settings
from .engine import Engine, EngineUnavailable, stream_process
from .tasks import log

TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")
# Modules the engine needs at run time; a missing one means a broken environment.
ENGINE_MODULES = ("numpy", "torch", "timm", "rasterio", "pyogrio", "onnxruntime", "safetensors", "asymkd")
# Where torch CPU wheels live (torch's own package index; configurable in the settings).
DEFAULT_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MIN_PYTHON = (3, 10)


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
    """A system Python >= 3.10 to build the venv from: the setting, else the PATH."""
    stored = settings.get("engine/base_python", "", str)
    candidates = [stored] if stored else []
    names = ("python3.12", "python3.11", "python3.10", "python3", "python")
    if sys.platform == "win32":
        names = ("py", "python3", "python")
    candidates += [shutil.which(name) or "" for name in names]
    for candidate in candidates:
        if candidate and (python_version(candidate) or (0, 0)) >= MIN_PYTHON:
            return candidate
    return None


def split_requirements(requirements: Path | None) -> tuple[list[str], list[str]]:
    """(torch lines, other lines) of a pinned requirements file."""
    torch_lines: list[str] = []
    other: list[str] = []
    if requirements is None:
        return torch_lines, other
    for raw in requirements.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower()
        (torch_lines if name in TORCH_PACKAGES else other).append(line)
    return torch_lines, other


@dataclass
class PlanStep:
    label: str
    argv: list[str]
    weight: float = 1.0


@dataclass
class EnvPlan:
    """What creating the engine environment will run, in order."""

    venv: Path
    base_python: str
    gpu: str | None
    steps: list[PlanStep] = field(default_factory=list)
    check_modules: Sequence[str] = ENGINE_MODULES

    @property
    def python(self) -> Path:
        return settings.venv_python(self.venv)

    @property
    def torch_build(self) -> str:
        return f"CUDA ({self.gpu})" if self.gpu else "CPU"


def make_plan(venv: Path, base_python: str, requirements: Path | None, gpu: str | None,
              cpu_index: str | None = DEFAULT_CPU_INDEX, cuda_index: str | None = None,
              check_modules: Sequence[str] = ENGINE_MODULES) -> EnvPlan:
    plan = EnvPlan(Path(venv), base_python, gpu, check_modules=check_modules)
    python = str(plan.python)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    plan.steps.append(PlanStep("creating the virtual environment", [base_python, "-m", "venv", str(plan.venv)], 1.0))
    torch_lines, other = split_requirements(requirements)
    if torch_lines:
        index = cuda_index if gpu else cpu_index
        extra = ["--index-url", index] if index else []
        plan.steps.append(PlanStep(f"installing torch ({plan.torch_build} build)", pip + extra + torch_lines, 6.0))
    if other:
        plan.steps.append(PlanStep("installing the engine requirements", pip + other, 3.0))
    return plan


class EnvironmentBuilder(QObject):
    """Python-side record of one environment creation (outlives its QgsTask)."""

    progressChanged = pyqtSignal(float, str)
    builderFinished = pyqtSignal(object)

    def __init__(self, plan: EnvPlan, parent: QObject | None = None):
        super().__init__(parent)
        self.plan = plan
        self.ok: bool | None = None
        self.message = ""
        self.version = ""
        self.task: EnvironmentTask | None = None

    def start(self) -> "EnvironmentBuilder":
        from qgis.core import QgsApplication
        self.task = EnvironmentTask(self)
        QgsApplication.taskManager().addTask(self.task)
        return self

    def cancel(self) -> None:
        if self.task is not None:
            try:
                self.task.cancel()
            except RuntimeError:
                pass

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
        super().__init__("AsymKD: creating the engine environment", QgsTask.CanCancel)
        self.builder = builder

    def run(self) -> bool:  # worker thread
        plan = self.builder.plan
        total = sum(step.weight for step in plan.steps) + 0.5
        done = 0.0
        log(f"Creating the engine environment in {plan.venv} (torch: {plan.torch_build} build)")
        try:
            for step in plan.steps:
                if self.isCanceled():
                    self.builder.message = "Creating the engine environment was cancelled."
                    return False
                self._report(100.0 * done / total, step.label)
                log(f"{step.label}: {' '.join(step.argv)}")
                result = stream_process(step.argv, on_stdout=self._pip_line, on_stderr=self._pip_line,
                                        is_cancelled=self.isCanceled)
                if result.cancelled:
                    self.builder.message = "Creating the engine environment was cancelled."
                    return False
                if result.returncode != 0:
                    last = next((l for l in reversed(result.stderr_tail) if l.strip()), f"exit code {result.returncode}")
                    hint = " (on Debian/Ubuntu: apt install python3-venv)" if "venv" in step.argv else ""
                    self.builder.message = f"Creating the engine environment failed while {step.label}: {last}{hint}"
                    return False
                done += step.weight
            self._report(100.0 * done / total, "checking the environment")
            engine = Engine(python=plan.python, source=paths.engine_source_dir())
            self.builder.version = engine.check(plan.check_modules, timeout_s=300)
            self.builder.message = f"The engine environment is ready: {plan.python} (torch: {plan.torch_build} build)."
            return True
        except EngineUnavailable as exc:
            self.builder.message = str(exc)
            return False
        except Exception as exc:  # never let a failure here take QGIS down
            self.builder.message = f"Creating the engine environment failed: {type(exc).__name__}: {exc}"
            return False

    def _report(self, percent: float, text: str) -> None:
        self.setProgress(percent)
        self.builder.progressChanged.emit(percent, text)

    def _pip_line(self, line: str) -> None:
        if line.strip():
            level = Qgis.Warning if line.startswith(("ERROR", "error")) else Qgis.Info
            log(line, level)

    def finished(self, result: bool) -> None:  # main thread
        self.builder._finish(bool(result))


def default_plan(venv: Path | None = None) -> EnvPlan:
    """The plan for this machine: the settings' base Python, bundled requirements, GPU check."""
    base = find_base_python()
    if base is None:
        raise EngineUnavailable("No system Python 3.10 or newer was found to create the engine environment.",
                                "Install Python 3.10+ or set its path in the AsymKD diagnostics view.")
    requirements = paths.requirements_file()
    if requirements is None:
        raise EngineUnavailable("The engine source (backend/requirements.txt) is missing from the plugin.",
                                "Reinstall the plugin from its zip.")
    gpu = detect_gpu(settings.get("engine/nvidia_smi", "nvidia-smi", str))
    cpu_index = settings.get("engine/torch_cpu_index", DEFAULT_CPU_INDEX, str) or None
    cuda_index = settings.get("engine/torch_cuda_index", "", str) or None
    return make_plan(venv or settings.default_engine_dir(), base, requirements, gpu, cpu_index, cuda_index)
