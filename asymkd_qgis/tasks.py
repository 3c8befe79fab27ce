"""Background jobs: a QgsTask runs engine commands one after another in a worker thread.

`EngineJob` is the Python-side record of a job (state, outcomes, signals for the dock); it
outlives its `EngineTask`, which the task manager deletes when it ends. Events reach the
GUI through queued signals; log lines go to the QGIS log panel (thread-safe).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from qgis.core import Qgis, QgsApplication, QgsFeedback, QgsMessageLog, QgsTask
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .engine import Engine, EngineUnavailable, Outcome, describe_progress, run_engine
from .validation import InputError

LOG_TAG = "AsymKD"

_LOG_LEVELS = {"debug": Qgis.MessageLevel.Info, "info": Qgis.MessageLevel.Info, "warning": Qgis.MessageLevel.Warning,
               "error": Qgis.MessageLevel.Critical}


@dataclass
class PreStep:
    """Work in the job's worker thread before the engine starts (e.g. exporting a web layer):
    `run(feedback)` may raise InputError; a cancel sets the feedback."""

    label: str
    run: Callable[[QgsFeedback], Any]


@dataclass
class EngineCommand:
    """One engine command line (without the program) and what to call it in the GUI.

    `phases`: the progress steps the command reports one after the other (e.g. distill, then
    baseline), so that one bar covers them all.
    """

    args: list[str]
    label: str = ""
    weight: float = 1.0
    phases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.args = [str(a) for a in self.args]
        if not self.label:
            self.label = self.args[0] if self.args else "engine"


class ProgressMapper:
    """One fraction for a command whose progress events come from several sub-steps.

    Sub-steps named 'k/n' (e.g. 'teacher fold 2/5', followed by the final 'teacher') take
    equal shares; so do the command's known phases; anything else (an evaluation pass) keeps
    the bar where it is. The fraction never goes back.
    """

    def __init__(self, phases: tuple[str, ...] = ()):
        self.phases = tuple(phases)
        self.folds = 0
        self.value = 0.0

    def __call__(self, event: dict[str, Any]) -> float:
        step = str(event.get("step", ""))
        fraction = max(0.0, min(1.0, float(event.get("fraction") or 0.0)))
        numbered = re.search(r"(\d+)\s*/\s*(\d+)\s*$", step)
        phase = next((i for i, name in enumerate(self.phases) if step.startswith(name)), None)
        if numbered and int(numbered.group(2)) > 0:
            done, count = int(numbered.group(1)), int(numbered.group(2))
            self.folds = count
            value = (done - 1 + fraction) / (count + 1)
        elif self.folds:
            value = (self.folds + fraction) / (self.folds + 1)
        elif self.phases:
            if phase is None:
                return self.value
            value = (phase + fraction) / len(self.phases)
        else:
            value = fraction
        self.value = max(self.value, value)
        return self.value


def log(message: str, level: Any = Qgis.MessageLevel.Info) -> None:
    QgsMessageLog.logMessage(message, LOG_TAG, level)


class EngineJob(QObject):
    """A sequence of engine commands run by one QgsTask; emits events and the end state."""

    PENDING, RUNNING, OK, FAILED, CANCELLED = "pending", "running", "ok", "failed", "cancelled"

    eventReceived = pyqtSignal(dict)
    progressChanged = pyqtSignal(float, str)  # percent, text
    jobFinished = pyqtSignal(object)  # the job

    def __init__(self, name: str, commands: list[EngineCommand], engine: Engine | None = None,
                 parent: QObject | None = None, pre_steps: list[PreStep] | None = None):
        super().__init__(parent)
        self.name = name
        self.commands = commands
        self.pre_steps = list(pre_steps or [])
        self.engine = engine or Engine.from_settings()
        self.outcomes: list[Outcome] = []
        self.state = self.PENDING
        self.failure: str | None = None  # why it did not run (e.g. engine missing)
        self.engine_unavailable = False
        self.task: EngineTask | None = None
        self.pid: int | None = None

    # -- control ---------------------------------------------------------------------
    def start(self) -> "EngineJob":
        self.task = EngineTask(self)
        self.state = self.RUNNING
        QgsApplication.taskManager().addTask(self.task)
        return self

    def cancel(self) -> None:
        if self.task is not None and self.state == self.RUNNING:
            with contextlib.suppress(RuntimeError):  # the task already ended and was deleted
                self.task.cancel()

    @property
    def done(self) -> bool:
        return self.state in (self.OK, self.FAILED, self.CANCELLED)

    # -- results ---------------------------------------------------------------------
    @property
    def results(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for outcome in self.outcomes:
            merged.update(outcome.results)
        return merged

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for outcome in self.outcomes:
            merged.update(outcome.metrics)
        return merged

    def message(self) -> str:
        """Why the job failed or was cancelled, in the engine's words."""
        if self.failure:
            return self.failure
        if self.state == self.CANCELLED:
            return f"{self.name} was cancelled; nothing was added."
        for outcome in reversed(self.outcomes):
            if not outcome.ok:
                return outcome.message()
        return f"{self.name} finished."

    def _finish(self, state: str) -> None:
        self.state = state
        self.task = None
        self.jobFinished.emit(self)


class EngineTask(QgsTask):
    """Runs the commands of one EngineJob in the task manager's worker thread."""

    def __init__(self, job: EngineJob):
        super().__init__(f"AsymKD: {job.name}", QgsTask.Flag.CanCancel)
        self.job = job
        self.feedback = QgsFeedback()  # made in the main thread; cancel() sets it from there

    def cancel(self) -> None:
        self.feedback.cancel()
        super().cancel()

    def run(self) -> bool:  # worker thread
        job = self.job
        total_weight = sum(c.weight for c in job.commands) + 0.5 * len(job.pre_steps) or 1.0
        done_weight = 0.0
        try:
            for step in job.pre_steps:
                if self.isCanceled():
                    return False
                log(f"{job.name}: {step.label}")
                job.progressChanged.emit(100.0 * done_weight / total_weight, f"{step.label}...")
                step.run(self.feedback)
                done_weight += 0.5
                self.setProgress(100.0 * done_weight / total_weight)
            for command in job.commands:
                if self.isCanceled():
                    return False
                log(f"{job.name}: {command.label}: asymkd {' '.join(command.args)}")
                base = 100.0 * done_weight / total_weight
                span = 100.0 * command.weight / total_weight
                mapper = ProgressMapper(command.phases)

                def on_event(event: dict[str, Any], base=base, span=span, label=command.label, mapper=mapper) -> None:
                    self._on_event(event, base, span, label, mapper)

                outcome = run_engine(job.engine, command.args, on_event=on_event,
                                     on_stderr=lambda line: log(line, Qgis.MessageLevel.Info),
                                     is_cancelled=self.isCanceled,
                                     on_start=lambda pid: setattr(job, "pid", pid))
                job.outcomes.append(outcome)
                if not outcome.ok:
                    return False
                done_weight += command.weight
                self.setProgress(100.0 * done_weight / total_weight)
            return True
        except EngineUnavailable as exc:
            job.failure = str(exc)
            job.engine_unavailable = True
            return False
        except InputError as exc:
            job.failure = None if self.isCanceled() else str(exc)
            return False
        except Exception as exc:  # a plugin bug must not take QGIS down
            job.failure = f"{type(exc).__name__}: {exc}"
            return False

    def _on_event(self, event: dict[str, Any], base: float, span: float, label: str,
                  mapper: ProgressMapper) -> None:
        kind = event.get("event")
        if kind == "progress":
            percent = base + span * mapper(event)
            self.setProgress(percent)
            self.job.progressChanged.emit(percent, f"{label} - {describe_progress(event)}")
        elif kind == "log":
            log(str(event.get("message", "")), _LOG_LEVELS.get(str(event.get("level")), Qgis.MessageLevel.Info))
        elif kind == "warning":
            log(str(event.get("message", "")), Qgis.MessageLevel.Warning)
        elif kind == "error":
            log(f"{event.get('kind')}: {event.get('message')} {event.get('hint') or ''}".strip(),
                Qgis.MessageLevel.Critical)
        elif kind == "step" and event.get("status") == "started":
            self.job.progressChanged.emit(base, f"{label} - {event.get('step')}")
        self.job.eventReceived.emit(event)

    def finished(self, result: bool) -> None:  # main thread
        job = self.job
        if result:
            job._finish(EngineJob.OK)
        elif self.isCanceled() or any(o.cancelled for o in job.outcomes):
            job._finish(EngineJob.CANCELLED)
        else:
            job._finish(EngineJob.FAILED)
