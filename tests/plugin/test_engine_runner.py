"""The engine subprocess: events parsed, arguments passed intact, errors explained, cancel fast."""

from __future__ import annotations

import threading
import time

from asymkd_qgis.engine import Engine, EngineUnavailable, describe_progress, parse_line, run_engine
from conftest import process_alive


def test_events_progress_metrics_results(fake_engine):
    seen = []
    outcome = run_engine(fake_engine("ok"), ["teacher", "--run", "r"], on_event=seen.append)
    assert outcome.ok and outcome.returncode == 0
    kinds = [e["event"] for e in seen]
    assert kinds.count("progress") == 5 and "metrics" in kinds and "result" in kinds
    assert outcome.metrics["teacher"] == {"overall_accuracy": 0.5, "macro_f1": 0.25}
    assert seen[kinds.index("progress") + 4]["fraction"] == 1.0


def test_arguments_with_spaces_quotes_and_non_ascii_arrive_intact(fake_engine, tmp_path):
    odd = str(tmp_path / "dossier d'été" / "scène \"1\" $HOME; rm -rf x.tif")
    outcome = run_engine(fake_engine("echo"), ["chips", "--raster", odd, "--field", "classé"])
    assert outcome.ok
    assert outcome.results == {"0": "chips", "1": "--raster", "2": odd, "3": "--field", "4": "classé",
                               "5": "--events", "6": "-"}


def test_crash_without_error_event_reports_the_last_stderr_line(fake_engine):
    outcome = run_engine(fake_engine("crash"), ["distill"])
    assert not outcome.ok and outcome.returncode == 1
    assert "RuntimeError: CUDA error: device-side assert triggered" in outcome.message()
    assert "exit code 1" in outcome.message()


def test_error_event_message_and_hint_are_shown(fake_engine):
    outcome = run_engine(fake_engine("usererror"), ["teacher"])
    assert outcome.returncode == 2
    assert outcome.message() == "the MS dataset has 2 bands (point --ms to the MS patches)"


def test_cancel_stops_a_process_that_ignores_sigterm_within_5_seconds(fake_engine):
    pids = []
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    start = time.monotonic()
    outcome = run_engine(fake_engine("stubborn"), ["teacher"], is_cancelled=cancel.is_set, on_start=pids.append)
    stopped_after = time.monotonic() - start - 0.5
    assert outcome.cancelled and not outcome.ok
    assert stopped_after < 5.0
    assert not process_alive(pids[0])


def test_cancel_lets_the_engine_clean_up(fake_engine):
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    outcome = run_engine(fake_engine("sleep"), ["teacher"], is_cancelled=cancel.is_set)
    assert outcome.cancelled and outcome.returncode == 130
    assert "cancelled" in outcome.message()


def test_missing_and_broken_engine_environments(tmp_path, fake_engine):
    missing = Engine(python=tmp_path / "nowhere" / "python")
    try:
        missing.check()
        raise AssertionError("a missing engine passed the check")
    except EngineUnavailable as exc:
        assert "missing" in exc.message
        # the hint names the plugin's real UI
        assert "Plugins > AsymKD > Create engine environment..." in exc.hint and "Choose engine Python..." in exc.hint
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'Fatal Python error: init_fs_encoding' >&2\nexit 1\n")
    broken.chmod(0o755)
    try:
        Engine(python=broken).check()
        raise AssertionError("a broken engine passed the check")
    except EngineUnavailable as exc:
        assert "broken" in exc.message and "init_fs_encoding" in exc.message
    assert fake_engine("ok").check() == "0.0.0-fake"
    try:
        fake_engine("ok").check(modules=("a_module_that_is_not_there",))
        raise AssertionError("a missing module passed the check")
    except EngineUnavailable as exc:
        assert "a_module_that_is_not_there" in exc.message


def test_engine_environment_drops_qgis_python_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", "/usr/share/qgis/python")
    monkeypatch.setenv("PYTHONHOME", "/qgis")
    monkeypatch.setenv("GDAL_DATA", "/qgis/gdal")
    env = Engine(python=tmp_path / "python", source=tmp_path).env()
    assert env["PYTHONPATH"] == str(tmp_path)
    assert "PYTHONHOME" not in env and "GDAL_DATA" not in env
    assert env["PYTHONNOUSERSITE"] == "1"


def test_parse_line_and_progress_text():
    assert parse_line("not json") is None
    assert parse_line('{"no_event": 1}') is None
    event = parse_line('{"event": "progress", "step": "teacher", "done": 3, "total": 10, "rate": 2.5, '
                       '"unit": "epochs", "eta_s": 125}')
    assert describe_progress(event) == "teacher: 3/10 epochs, 2.5/s, 2 min 05 s left"


def test_progress_of_several_sub_steps_maps_onto_one_bar():
    from asymkd_qgis.runner import ProgressMapper

    def p(step, fraction):
        return {"event": "progress", "step": step, "fraction": fraction}

    folds = ProgressMapper()
    values = [folds(p("teacher fold 1/2", 0.5)), folds(p("teacher fold 2/2", 1.0)), folds(p("teacher", 0.5)),
              folds(p("teacher", 1.0))]
    assert values == [1 / 6, 2 / 3, 5 / 6, 1.0]
    distill = ProgressMapper(("distill", "baseline"))
    values = [distill(p("distill", 1.0)), distill(p("evaluate", 0.1)), distill(p("baseline", 0.5))]
    assert values == [0.5, 0.5, 0.75]  # an evaluation pass does not move the bar back


# -- the event protocol -------------------------------------------------------------------
def test_another_major_protocol_is_refused_with_the_engine_version_needed(fake_engine, monkeypatch):
    import pytest

    from asymkd_qgis import paths
    from asymkd_qgis.engine import EngineMismatch
    monkeypatch.setenv("FAKE_ENGINE_PROTOCOL", "2.0")
    started = []
    begun = time.monotonic()
    with pytest.raises(EngineMismatch) as info:
        run_engine(fake_engine("sleep"), ["teacher"], on_start=started.append)
    assert time.monotonic() - begun < 10
    text = str(info.value)
    assert "engine 9.9.9 speaks event protocol 2.0" in text
    assert f"needs AsymKD engine {paths.plugin_version()}" in text and "Create engine environment" in text
    assert not process_alive(started[0])  # stopped at its first event
    assert isinstance(info.value, EngineUnavailable)  # the dock offers to repair the environment


def test_an_engine_without_a_protocol_version_is_refused(fake_engine, monkeypatch):
    import pytest

    from asymkd_qgis.engine import EngineMismatch
    monkeypatch.setenv("FAKE_ENGINE_PROTOCOL", "none")
    with pytest.raises(EngineMismatch, match="no event protocol version"):
        run_engine(fake_engine("ok"), ["teacher"])


def test_a_newer_minor_protocol_is_accepted(fake_engine, monkeypatch):
    monkeypatch.setenv("FAKE_ENGINE_PROTOCOL", "1.7")
    assert run_engine(fake_engine("ok"), ["teacher"]).ok


def test_the_plugin_reads_the_protocol_the_engine_sends():
    import re
    from pathlib import Path

    from asymkd_qgis import engine, paths
    events = (paths.engine_source_dir() or Path("backend")) / "asymkd" / "events.py"
    sent = re.search(r'^PROTOCOL_VERSION = "([^"]+)"', events.read_text(encoding="utf-8"), re.M).group(1)
    assert sent.split(".")[0] == engine.PROTOCOL_VERSION.split(".")[0]


def test_the_real_engine_passes_the_protocol_check(real_engine):
    outcome = run_engine(real_engine, ["choices"])
    assert outcome.ok and outcome.engine_version
