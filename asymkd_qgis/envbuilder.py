"""Running an environment plan (envsetup.py) as a background task: each program's output is
read for progress, a failure or cancel removes what was written, and the new environment is
checked by importing the engine's modules before it is used.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from qgis.core import Qgis, QgsApplication, QgsTask
from qgis.PyQt.QtCore import QObject, pyqtSignal

from . import paths, settings
from .engine import Engine, EngineUnavailable, stream_process
from .envsetup import (
    CUDA_INDEX_EXAMPLE,
    RETRY_LINE,
    EnvPlan,
    PipProgress,
    PlanStep,
    SetupError,
    Target,
    connection_problem,
    engine_version,
    find_wheels,
    missing_wheels,
    pip_failure,
    target_info,
)
from .tasks import log

CANCELLED = "Creating the engine environment was cancelled; the partial environment was removed."


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
            elif progress.retries == 1 and RETRY_LINE.search(line):
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
