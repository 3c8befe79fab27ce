"""`asymkd choices`, the protocol version in the first event, and the run layout that the
engine and the plugin each spell once."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import time
from pathlib import Path

from asymkd import __version__, choices, config, layout
from asymkd.commands.choices import choices_report
from asymkd.config import DistillConfig, TeacherConfig
from asymkd.events import PROTOCOL_VERSION, Events

REPO = Path(__file__).resolve().parents[2]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asymkd", *args], capture_output=True, text=True,
                          cwd=REPO / "backend", timeout=120)


def test_choices_json_matches_the_engine_tables():
    from asymkd.models.backbones import BACKBONES
    proc = _run_cli("choices")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["engine"] == __version__ and report["protocol"] == PROTOCOL_VERSION
    assert report["config"] == {key: dict(table) for key, table in config.CONFIG_CHOICES.items()}
    assert set(report["config"]) >= {"distill.domain_loss", "pairing.method", "distill.pseudo",
                                     "distill.semi_supervised", "matcher.positives"}
    assert report["backbones"] == {name: {"source": spec.source, "about": spec.about}
                                   for name, spec in BACKBONES.items()}
    assert "hub" in report["backbone_note"]
    assert list(report["devices"]) == ["auto", "cpu", "cuda", "cuda:N"]
    for section, defaults in (("teacher", TeacherConfig()), ("distill", DistillConfig())):
        assert report["defaults"][section] == {"backbone": defaults.backbone, "pretrained": defaults.pretrained,
                                               "input_size": defaults.input_size}
        assert defaults.backbone in report["backbones"]


def test_choices_is_fast_and_imports_no_torch():
    code = ("import sys, time; t = time.time(); from asymkd.commands.choices import choices_report; "
            "choices_report(); print(time.time() - t, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO / "backend",
                          timeout=60)
    seconds, torch_loaded = proc.stdout.split()
    assert torch_loaded == "False"
    assert float(seconds) < 2.0


def test_the_backbone_catalogue_is_the_models_table():
    # choices.BACKBONES names the backbones without torch; models/backbones.py builds them
    from asymkd.models.backbones import BACKBONES, DEFAULT_BACKBONE
    built = {name: {"source": spec.source, "about": spec.about} for name, spec in BACKBONES.items()}
    assert built == choices.BACKBONES
    assert choices.DEFAULT_BACKBONE == DEFAULT_BACKBONE


def test_choices_reports_every_setting_with_its_declaration():
    report = choices_report()["settings"]
    assert report["teacher.input_size"]["range"] == [0, 1024, "0 = the patches as they are"]
    assert report["teacher.input_size"]["flags"] == ["--input-size"] and report["teacher.input_size"]["default"] == 96
    pretrained = report["distill.pretrained"]
    assert pretrained["flags"] == ["--no-pretrained"] and pretrained["type"] == "bool" and pretrained["default"] is True
    assert report["distill.baseline"]["flags"] == ["--baseline", "--no-baseline"]
    assert report["pairing.method"]["choices"] == choices.PAIRING_METHODS
    assert report["device"]["choices"] == choices.DEVICES
    assert report["distill.shift"]["flags"] == [] and "translation" in report["distill.shift"]["help"]
    assert report["classify.tile"]["range"][:2] == [1, 4096] and report["classify.tile"]["default"] is None
    assert report["classify.uncertain_by"]["choices"] == choices.UNCERTAINTY_MEASURES
    json.dumps(report)  # plain JSON


def test_choices_on_the_event_stream_carries_the_protocol():
    proc = _run_cli("choices", "--events", "-")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [e["event"] for e in events] == ["choices"]
    assert events[0]["protocol"] == PROTOCOL_VERSION and events[0]["engine"] == __version__
    assert events[0]["choices"]["backbones"]


def test_only_the_first_event_of_a_stream_carries_the_protocol():
    stream = io.StringIO()
    events = Events(stream=stream, progress_bars=False)
    events.log("one")
    events.progress("teacher", 1, 2, time.time(), force=True)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "log" and first["protocol"] == PROTOCOL_VERSION and first["engine"] == __version__
    assert "protocol" not in second and "engine" not in second
    major, minor = PROTOCOL_VERSION.split(".")
    assert major.isdigit() and minor.isdigit()


def test_an_error_before_any_other_event_carries_the_protocol():
    proc = _run_cli("teacher", "--run", str(REPO / "no" / "such" / "run"), "--events", "-", "--epochs", "0",
                    "--set", "teacher.folds=nonsense")
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 2 and events
    assert events[0]["protocol"] == PROTOCOL_VERSION


def _plugin_layout():
    spec = importlib.util.spec_from_file_location("plugin_layout", REPO / "asymkd_qgis" / "layout.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _names(module) -> dict[str, object]:
    return {k: v for k, v in vars(module).items() if k.isupper() and isinstance(v, (str, tuple))}


def test_plugin_and_engine_spell_the_run_layout_alike():
    engine, plugin = _names(layout), _names(_plugin_layout())
    assert engine, "the engine's layout has no names"
    missing = sorted(set(engine) - set(plugin))
    assert not missing, f"asymkd_qgis/layout.py lacks {missing}"
    assert {k: plugin[k] for k in engine} == engine
    run = layout.RunFolder(Path("RUN"))
    other = _plugin_layout().RunLayout(Path("RUN"))
    for name in ("teacher", "matcher", "pairs", "pairs_file", "student", "baseline", "report", "student_onnx"):
        assert getattr(run, name) == getattr(other, name), name
    assert run.metrics(layout.STUDENT) == other.metrics(layout.STUDENT)


def test_model_file_names_agree_with_the_layout():
    # models/files.py names the files it writes; the run layout must name the same ones
    from asymkd.models import files
    assert (files.WEIGHTS, files.META) == (layout.WEIGHTS, layout.META)
