"""Background jobs of the dock: a QgsTask runs one prepared step (runner.py) in a worker thread.

`EngineJob` is the Python-side record of a job (state, outcomes, signals for the dock); it
outlives its `EngineTask`, which the task manager deletes when it ends. Progress reaches the
GUI through a queued signal; log lines go to the QGIS log panel (thread-safe).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from qgis.core import Qgis, QgsApplication, QgsFeedback, QgsMessageLog, QgsTask
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .engine import Engine, Outcome
from .runner import CANCELLED, FAILED, OK, EngineCommand, Prepared, PreStep, Runner, RunRecord

LOG_TAG = "AsymKD"

_LOG_LEVELS = {"debug": Qgis.MessageLevel.Info, "info": Qgis.MessageLevel.Info, "warning": Qgis.MessageLevel.Warning,
               "error": Qgis.MessageLevel.Critical}


def log(message: str, level: Any = Qgis.MessageLevel.Info) -> None:
    QgsMessageLog.logMessage(message, LOG_TAG, level)


class EngineJob(QObject):
    """A sequence of engine commands run by one QgsTask; emits progress and the end state."""

    PENDING, RUNNING, OK, FAILED, CANCELLED = "pending", "running", OK, FAILED, CANCELLED

    progressChanged = pyqtSignal(float, str)  # percent, text
    jobFinished = pyqtSignal(object)  # the job

    def __init__(self, name: str, commands: list[EngineCommand], engine: Engine | None = None,
                 parent: QObject | None = None, pre_steps: list[PreStep] | None = None):
        super().__init__(parent)
        self.name = name
        self.commands = commands
        self.pre_steps = list(pre_steps or [])
        self.engine = engine or Engine.from_settings()
        self.record = RunRecord()
        self.state = self.PENDING
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
    def outcomes(self) -> list[Outcome]:
        return self.record.outcomes

    @property
    def engine_unavailable(self) -> bool:
        return self.record.engine_unavailable

    @property
    def results(self) -> dict[str, str]:
        return self.record.results

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        return self.record.metrics

    def message(self) -> str:
        """Why the job failed or was cancelled, in the engine's words."""
        if self.state == self.CANCELLED:
            return f"{self.name} was cancelled; nothing was added."
        return self.record.message() or f"{self.name} finished."

    def environment_broken(self) -> bool:
        """Whether a crash came from the environment (a module missing or failing to import)
        rather than from the engine: the user is then offered to repair it."""
        if self.engine_unavailable:
            return True
        crashed = [o for o in self.outcomes if o.returncode == 1]
        for outcome in crashed:
            text = "\n".join(outcome.stderr_tail) + (outcome.error.message if outcome.error else "")
            modules = re.findall(r"No module named '([^']+)'", text)
            if any(name.split(".")[0] != "asymkd" for name in modules) or "_ARRAY_API not found" in text:
                return True
        # Judge by what the engine needs, never by the wording of the error.
        return bool(crashed) and not self.engine.state().working

    def _finish(self, state: str) -> None:
        self.state = state
        self.task = None
        self.jobFinished.emit(self)


class _TaskSink:
    """The runner's sink for a job: the task's bar, the job's signal, the QGIS log."""

    def __init__(self, task: "EngineTask"):
        self.task = task

    def progress(self, percent: float, label: str) -> None:
        self.task.setProgress(percent)
        self.task.job.progressChanged.emit(percent, label)

    def log(self, message: str, level: str) -> None:
        log(message, _LOG_LEVELS.get(level, Qgis.MessageLevel.Info))

    def cancelled(self) -> bool:
        return self.task.isCanceled()


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
        runner = Runner(job.engine, _TaskSink(self), self.feedback, on_start=lambda pid: setattr(job, "pid", pid))
        job.record = runner.record
        try:
            runner.run(Prepared(job.name, job.commands, job.pre_steps))
        except Exception as exc:  # a plugin bug must not take QGIS down
            runner.record.end(FAILED, runner.label, f"{type(exc).__name__}: {exc}")
        return runner.record.state == OK

    def finished(self, result: bool) -> None:  # main thread
        state = self.job.record.state or FAILED  # empty: the task was cancelled before it ran
        if not result and self.isCanceled():
            state = CANCELLED
        self.job._finish(state)
