"""The one runner of a prepared step (the dock's task and Processing both adapt to it): pre-steps
first, one monotonic bar over weighted commands, the engine's events as log lines, cancel."""

from __future__ import annotations

from pathlib import Path

import pytest

from asymkd_qgis.engine import Engine
from asymkd_qgis.errors import InputError
from asymkd_qgis.runner import CANCELLED, FAILED, OK, EngineCommand, Prepared, PreStep, Runner


class RecordingSink:
    """Keeps what the runner reports; `cancel_when(sink)` decides when to ask for a stop."""

    def __init__(self, cancel_when=lambda sink: False):
        self.bar: list[tuple[float, str]] = []
        self.lines: list[tuple[str, str]] = []
        self.cancel_when = cancel_when

    def progress(self, percent: float, label: str) -> None:
        self.bar.append((percent, label))

    def log(self, message: str, level: str) -> None:
        self.lines.append((level, message))

    def cancelled(self) -> bool:
        return bool(self.cancel_when(self))

    @property
    def percents(self) -> list[float]:
        return [percent for percent, _ in self.bar]


def _prepared(*weights: float, pre_steps: list[PreStep] | None = None) -> Prepared:
    commands = [EngineCommand([f"step{i}"], f"step {i}", weight=w) for i, w in enumerate(weights)]
    return Prepared("test", commands, list(pre_steps or []))


def test_one_monotonic_bar_over_the_pre_step_and_weighted_commands(fake_engine):
    ran = []
    export = PreStep("exporting 'web'", lambda feedback: ran.append(feedback))
    sink = RecordingSink()
    token = object()
    record = Runner(fake_engine("ok"), sink, feedback=token).run(_prepared(1.0, 3.0, pre_steps=[export]))
    assert record.state == OK and len(record.outcomes) == 2
    assert ran == [token]  # the pre-step ran, with the run's cancel object
    percents = sink.percents
    assert percents == sorted(percents) and percents[0] == 0.0 and percents[-1] == 100.0
    # weights 0.5 (the export), 1 and 3: the first command ends at a third of the bar
    first_end = max(p for p, label in sink.bar if label.startswith("step 0"))
    assert first_end == pytest.approx(100 * 1.5 / 4.5)
    assert ("info", "fake step0 done") in sink.lines
    assert any(level == "info" and text.startswith("step 1: asymkd step1") for level, text in sink.lines)
    assert record.metrics["step1"] == {"overall_accuracy": 0.5, "macro_f1": 0.25}


def test_a_cancel_between_commands_starts_nothing_more(fake_engine):
    sink = RecordingSink(cancel_when=lambda s: any(label.startswith("step 0 - step0: 5/5") for _, label in s.bar))
    record = Runner(fake_engine("ok"), sink).run(_prepared(1.0, 1.0))
    assert record.state == CANCELLED
    assert [o.command for o in record.outcomes] == ["step0"]
    assert not any("step1" in text for _, text in sink.lines)


def test_a_cancel_stops_the_running_command(fake_engine):
    sink = RecordingSink(cancel_when=lambda s: len(s.bar) > 3)
    record = Runner(fake_engine("sleep"), sink).run(_prepared(1.0, 1.0))
    assert record.state == CANCELLED and record.stopped_in == "step 0"
    assert len(record.outcomes) == 1 and record.outcomes[0].cancelled


def test_a_cancel_before_the_start_runs_no_pre_step(fake_engine):
    ran = []
    sink = RecordingSink(cancel_when=lambda s: True)
    record = Runner(fake_engine("ok"), sink).run(_prepared(1.0, pre_steps=[PreStep("export", ran.append)]))
    assert record.state == CANCELLED and not ran and not record.outcomes and record.stopped_in == ""


def test_a_failed_pre_step_stops_before_the_engine(fake_engine):
    def fail(feedback) -> None:
        raise InputError("Exporting 'web': the server did not answer")

    record = Runner(fake_engine("ok"), RecordingSink()).run(_prepared(1.0, pre_steps=[PreStep("export", fail)]))
    assert record.state == FAILED and not record.outcomes
    assert record.message() == "Exporting 'web': the server did not answer" and record.stopped_in == "export"


def test_an_engine_failure_ends_the_run_with_its_message(fake_engine):
    sink = RecordingSink()
    record = Runner(fake_engine("usererror"), sink).run(_prepared(1.0, 1.0))
    assert record.state == FAILED and len(record.outcomes) == 1 and record.stopped_in == "step 0"
    assert record.message() == "the MS dataset has 2 bands (point --ms to the MS patches)"
    assert ("error", "the MS dataset has 2 bands (point --ms to the MS patches)") in sink.lines


def test_a_missing_engine_is_reported_not_raised(tmp_path: Path):
    record = Runner(Engine(python=tmp_path / "no" / "python"), RecordingSink()).run(_prepared(1.0))
    assert record.state == FAILED and record.engine_unavailable and "could not be started" in record.message()
