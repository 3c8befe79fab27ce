"""Running one prepared step: its pre-steps (exports of layers that are not files), then its
engine commands, with one progress bar over all of them, the engine's events as log lines,
and cancel.

Qt-free on purpose: the dock's QgsTask and the Processing algorithms each adapt their own
object to the small `Sink` below, so a step runs the same way from both.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from .engine import Engine, EngineUnavailable, Outcome, describe_progress, run_engine
from .errors import InputError

OK, FAILED, CANCELLED = "ok", "failed", "cancelled"
LEVELS = ("debug", "info", "warning", "error")  # what Sink.log receives
PRE_STEP_WEIGHT = 0.5  # an export's share of the bar, against the commands' weights


class Sink(Protocol):
    """Where a run reports: the bar with its label, log lines, and whether to stop."""

    def progress(self, percent: float, label: str) -> None: ...

    def log(self, message: str, level: str) -> None: ...

    def cancelled(self) -> bool: ...


@dataclass
class PreStep:
    """Work before the engine starts (e.g. exporting a web layer): `run(feedback)` is given the
    run's cancel object (a QgsFeedback in QGIS, which its writers watch) and may raise InputError."""

    label: str
    run: Callable[[Any], Any]


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


@dataclass
class Prepared:
    """What one step runs: pre-steps, then the engine commands. Preparing writes nothing (a
    form's inputs can be checked with it)."""

    name: str
    commands: list[EngineCommand] = field(default_factory=list)
    pre_steps: list[PreStep] = field(default_factory=list)
    output: Path | None = None  # the file the step writes, when the form loads it

    def add(self, other: "Prepared") -> "Prepared":
        self.commands += other.commands
        self.pre_steps += other.pre_steps
        return self


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


@dataclass
class RunRecord:
    """How a run went: the engine's outcomes, its end state, and why it stopped early."""

    outcomes: list[Outcome] = field(default_factory=list)
    state: str = ""
    failure: str | None = None  # why it stopped outside the engine (no engine, a failed export)
    engine_unavailable: bool = False
    stopped_in: str = ""  # the pre-step or command under way when it stopped

    def end(self, state: str, stopped_in: str = "", failure: str | None = None) -> None:
        self.state, self.stopped_in, self.failure = state, stopped_in, failure

    def message(self) -> str:
        """Why it failed, in the engine's words where the engine said it; empty otherwise."""
        if self.failure:
            return self.failure
        failed = next((o for o in reversed(self.outcomes) if not o.ok), None)
        return failed.message() if failed is not None else ""

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


class Runner:
    """Runs a Prepared step through the engine, reporting to a Sink. `feedback` is handed to
    the pre-steps as is; `on_start(pid)` is called as each engine process starts."""

    def __init__(self, engine: Engine, sink: Sink, feedback: Any = None,
                 on_start: Callable[[int], None] | None = None):
        self.engine = engine
        self.sink = sink
        self.feedback = feedback
        self.on_start = on_start
        self.record = RunRecord()
        self.percent = 0.0
        self.label = ""

    def run(self, prepared: Prepared) -> RunRecord:
        """Run to the end, a failure or a cancel; the record says which (it raises only on a bug)."""
        try:
            self._run(prepared)
        except EngineUnavailable as exc:  # missing, broken, or another event protocol
            self.record.end(FAILED, self.label, str(exc))
            self.record.engine_unavailable = True
        except InputError as exc:  # an export failed, or stopped because of a cancel
            cancelled = self.sink.cancelled()
            self.record.end(CANCELLED if cancelled else FAILED, self.label, None if cancelled else str(exc))
        return self.record

    def _run(self, prepared: Prepared) -> None:
        total = PRE_STEP_WEIGHT * len(prepared.pre_steps) + sum(c.weight for c in prepared.commands) or 1.0
        done = 0.0
        for step in prepared.pre_steps:
            if self._stopped():
                return
            self._start(step.label, f"{step.label}...")
            step.run(self.feedback)
            done += PRE_STEP_WEIGHT
            self._report(100.0 * done / total)
        for command in prepared.commands:
            if self._stopped():
                return
            self._start(command.label, f"{command.label}: asymkd {' '.join(command.args)}")
            outcome = self._command(command, 100.0 * done / total, 100.0 * command.weight / total)
            self.record.outcomes.append(outcome)
            if not outcome.ok:
                self.record.end(CANCELLED if outcome.cancelled or self.sink.cancelled() else FAILED, command.label)
                return
            done += command.weight
            self._report(100.0 * done / total)
        self.record.end(OK)

    def _stopped(self) -> bool:
        """A cancel between two parts: nothing of the next one starts."""
        if self.sink.cancelled():
            self.record.end(CANCELLED)
            return True
        return False

    def _start(self, label: str, line: str) -> None:
        self.label = label
        self.sink.log(line, "info")
        self._report(self.percent, f"{label}...")

    def _report(self, percent: float, label: str | None = None) -> None:
        """The bar never goes back (a new phase's first event may map below the last one)."""
        self.percent = max(self.percent, min(100.0, percent))
        self.sink.progress(self.percent, self.label if label is None else label)

    def _command(self, command: EngineCommand, base: float, span: float) -> Outcome:
        mapper = ProgressMapper(command.phases)

        def on_event(event: dict[str, Any]) -> None:
            self._event(event, command.label, base, span, mapper)

        return run_engine(self.engine, command.args, on_event=on_event,
                          on_stderr=lambda line: self.sink.log(line, "debug"),
                          is_cancelled=self.sink.cancelled, on_start=self.on_start)

    def _event(self, event: dict[str, Any], label: str, base: float, span: float, mapper: ProgressMapper) -> None:
        kind = event.get("event")
        if kind == "progress":
            self._report(base + span * mapper(event), f"{label} - {describe_progress(event)}")
        elif kind == "step" and event.get("status") == "started":
            self._report(self.percent, f"{label} - {event.get('step')}")
        elif kind == "log":
            level = str(event.get("level"))
            self.sink.log(str(event.get("message", "")), level if level in LEVELS else "info")
        elif kind == "warning":
            self.sink.log(str(event.get("message", "")), "warning")
        elif kind == "metrics":
            self.sink.log(f"{event.get('step')}: {json.dumps(event.get('metrics'))}", "info")
        elif kind == "error":
            hint = f" ({event['hint']})" if event.get("hint") else ""
            self.sink.log(f"{event.get('message')}{hint}", "error")
