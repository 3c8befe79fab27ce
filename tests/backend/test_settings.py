"""Each setting is declared once (settings.setting on a dataclass field): its flag, `--set`
key, validation and `asymkd choices` entry all follow from that declaration."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from asymkd import choices, cli, config, settings
from asymkd.classify import ClassifyOptions
from asymkd.commands._options import overrides
from asymkd.commands.choices import choices_report
from asymkd.config import ClassifierConfig, DistillConfig, PairingConfig, RunConfig, TeacherConfig
from asymkd.errors import ConfigError
from asymkd.settings import BOTH, setting

TRAINING = ("teacher", "matcher", "pair", "distill", "run")
# options of the commands themselves, not settings
COMMAND_OPTIONS = {"-h", "--help", "--events", "--run", "--config", "--set", "--resume", "--out", "--demo"}
RUN_FLAGS = {"--run", "--config", "--set", "--device", "--seed", "--resume"}
# every flag each command had when its flags were still written by hand
EARLIER_FLAGS = {
    "teacher": RUN_FLAGS | {"--ms", "--bands", "--backbone", "--input-size", "--no-pretrained", "--epochs",
                            "--batch-size", "--lr", "--folds", "--weights"},
    "matcher": RUN_FLAGS | {"--ms", "--bands", "--rgb-paired", "--epochs", "--positives", "--embed-dim"},
    "pair": RUN_FLAGS | {"--ms", "--bands", "--rgb", "--rgb-unlabeled", "--method"},
    "distill": RUN_FLAGS | {"--ms", "--bands", "--rgb", "--rgb-unlabeled", "--rgb-test", "--rgb-gsd", "--backbone",
                            "--input-size",
                            "--semi-supervised", "--no-pretrained", "--epochs", "--batch-size", "--lr",
                            "--repair-every", "--w-feat", "--w-pseudo", "--w-gt", "--pseudo", "--temperature",
                            "--domain-loss", "--baseline", "--no-baseline", "--all-teacher-classes"},
    "run": RUN_FLAGS | {"--out", "--demo"},
    "classify": {"--out", "--bands", "--bbox", "--mask", "--bbox-crs", "--mask-layer", "--tile", "--stride",
                 "--xyz-zoom", "--batch-size", "--class-raster", "--overwrite", "--device", "--min-valid", "--threads",
                 "--streams", "--spinning", "--no-spinning", "--workers", "--scheduler", "--shard-tiles",
                 "--uncertain-below", "--uncertain-by", "--regions", "--min-region-ha", "--vote", "--scale", "--yes"},
}


def _parser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cli._module(command).add_arguments(sub.choices[command])
    return sub.choices[command]


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: action for action in parser._actions for opt in action.option_strings}


# -- a setting added in one place ------------------------------------------------------------------
@dataclass
class _Pairing(PairingConfig):
    dummy_level: int = setting(3, range=(1, 9, "odd ones only"), help="a setting added for a test (default {default})")
    dummy_mode: str = setting("a", flag=False, choices={"a": "first", "b": "second"}, help="a named choice")


@dataclass
class _Run(RunConfig):
    pairing: _Pairing = field(default_factory=_Pairing)


def test_a_setting_declared_once_is_a_flag_a_set_key_a_range_and_a_choice(monkeypatch):
    monkeypatch.setattr(config, "RunConfig", _Run)
    args = _parser("pair").parse_args(["--run", "R", "--dummy-level", "5", "--method", "nearest"])
    assert overrides(args) == {"pairing": {"dummy_level": 5, "method": "nearest"}}
    assert "a setting added for a test (default 3)" in _parser("pair").format_help()
    cfg = config.from_plain(config.parse_set(["pairing.dummy_level=7", "pairing.dummy_mode=b"]))
    assert isinstance(cfg.pairing, _Pairing) and (cfg.pairing.dummy_level, cfg.pairing.dummy_mode) == (7, "b")
    config.check_settings(cfg)
    with pytest.raises(ConfigError, match=r"pairing.dummy_level must be a whole number from 1 to 9 \(odd ones"):
        config.check_settings(config.from_plain({"pairing": {"dummy_level": 10}}))
    with pytest.raises(ConfigError, match="pairing.dummy_mode must be one of a, b"):
        config.check_settings(config.from_plain({"pairing": {"dummy_mode": "c"}}))
    report = choices_report()
    assert report["settings"]["pairing.dummy_level"] == {
        "help": "a setting added for a test (default 3)", "type": "int", "default": 3, "flags": ["--dummy-level"],
        "range": [1, 9, "odd ones only"]}
    assert report["settings"]["pairing.dummy_mode"]["flags"] == []
    assert report["config"]["pairing.dummy_mode"] == {"a": "first", "b": "second"}


@dataclass
class _Options:
    size: int | None = setting(None, metavar="PX", help="a size")
    folder: str | None = setting(None, path=True, help="a folder")
    device: str = setting("auto", choices=choices.DEVICES, help="a device")
    loud: bool = setting(False, help="turn it up")
    quiet: bool = setting(True, help="keep it down")
    both: bool = setting(True, flag=BOTH, help="either way")
    box: str | None = setting(None, group="area", help="a box")
    shape: str | None = setting(None, group="area", help="a shape")
    hidden: float = setting(1.0, flag=False, help="only the API sets it")


@pytest.mark.parametrize("given_only", [True, False])
def test_flags_follow_their_declarations(given_only):
    parser = argparse.ArgumentParser()
    settings.add_flags(parser, settings.entries(_Options), given_only=given_only)
    assert set(_flags(parser)) - {"-h", "--help"} == {"--size", "--folder", "--device", "--loud", "--no-quiet",
                                                      "--both", "--no-both", "--box", "--shape"}
    defaults = vars(parser.parse_args([]))
    expected = {f.name: None if given_only else f.default for f in dataclasses.fields(_Options) if f.name != "hidden"}
    assert {k: defaults[k] for k in expected} == expected
    args = parser.parse_args(["--size", "3", "--folder", "rel", "--device", "cuda:1", "--loud", "--no-quiet",
                              "--no-both", "--box", "b"])
    assert settings.given(args) == {"size": 3, "folder": str(Path("rel").resolve()), "device": "cuda:1",
                                    "loud": True, "quiet": False, "both": False, "box": "b"}
    for bad in (["--device", "gpu"], ["--device", "cuda:N"], ["--box", "b", "--shape", "s"], ["--size", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_a_field_without_a_declaration_is_refused():
    @dataclass
    class Bare:
        plain: int = 0
    with pytest.raises(TypeError, match="Bare.plain"):
        settings.entries(Bare)


# -- every field declared once, every flag a field -------------------------------------------------
def test_every_config_field_has_exactly_one_declaration():
    found = settings.entries(RunConfig)  # a field without its declaration raises
    keys = [e.key for e in found]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(_leaves(config.to_dict(RunConfig())))
    for f in dataclasses.fields(ClassifierConfig):  # inherited, not declared again
        shared = settings.declaration(ClassifierConfig, f.name)
        assert settings.declaration(TeacherConfig, f.name) is shared is settings.declaration(DistillConfig, f.name)
    for e in found:
        assert e.spec.help.strip(), e.key
        if e.kind is int:
            assert e.spec.range is not None, f"{e.key} has no range"
            assert config.INT_RANGES[e.name][:2] == e.spec.range[:2], f"{e.key}: sections disagree"
    declared = {e.key: e.spec.choices for e in found if e.spec.choices}
    assert declared == config.CONFIG_CHOICES
    assert [e.name for e in settings.entries(ClassifyOptions)] == [f.name for f in dataclasses.fields(ClassifyOptions)]


def _leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


@pytest.mark.parametrize("command", [*TRAINING, "classify"])
def test_every_flag_maps_to_a_field_and_no_flag_was_lost(command):
    parser = _parser(command)
    flags = _flags(parser)
    dests = parser.get_default(settings.DESTS) or {}
    for flag, action in flags.items():
        if flag in COMMAND_OPTIONS:
            continue
        key = dests.get(action.dest)
        assert key is not None, f"{command} {flag} is no setting"
        if command == "classify":
            assert key in {f.name for f in dataclasses.fields(ClassifyOptions)}
        else:
            settings.value(RunConfig(), key)  # an AttributeError when it names no field
    added = set(flags) - EARLIER_FLAGS[command] - {"-h", "--help", "--events"}
    assert EARLIER_FLAGS[command] <= set(flags) and added <= {"--weights"}, (EARLIER_FLAGS[command] - set(flags), added)


@pytest.mark.parametrize("command,section", [("teacher", "teacher"), ("matcher", "matcher"), ("pair", "pairing"),
                                             ("distill", "distill"), ("run", "")])
def test_each_step_offers_every_flag_its_section_declares(command, section):
    declared = {flag for e in settings.section(settings.entries(RunConfig), section) for flag in e.flags()}
    top = {flag for e in settings.section(settings.entries(RunConfig), "") for flag in e.flags()}
    assert declared | top <= set(_flags(_parser(command)))


def test_training_flags_default_to_not_given():
    args = _parser("distill").parse_args(["--run", "R"])
    assert overrides(args) == {}
    args = _parser("distill").parse_args(["--run", "R", "--no-pretrained", "--no-baseline", "--ms", "rel", "--bands",
                                          "sentinel2", "--device", "cuda:1", "--set", "distill.epochs=5"])
    assert overrides(args) == {"distill": {"pretrained": False, "baseline": False, "epochs": "5"},
                               "data": {"ms": str(Path("rel").resolve()), "bands": "sentinel2"}, "device": "cuda:1"}


def test_one_device_table_for_config_and_flags():
    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert choices.check("device", good, choices.DEVICES) == good
    for bad in ("gpu", "cuda:", "cuda:N", "cuda:1x", "mps"):
        with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda, cuda:N"):
            config.check_settings(config.from_plain({"device": bad}))
    assert list(choices.ONNX_DEVICES) == ["auto", "cpu", "cuda"]
    assert _flags(_parser("evaluate"))["--device"].choices is not None


@pytest.mark.parametrize("options,needle", [({"tile": 0}, "--tile 0 is out of range"),
                                            ({"batch_size": 0}, "--batch-size 0 is out of range"),
                                            ({"min_valid": 1.5}, "--min-valid 1.5 is out of range"),
                                            ({"workers": 0}, "--workers 0 is out of range")])
def test_classify_options_are_checked_against_their_declared_ranges(options, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        ClassifyOptions(**options).check()
    low, high, _ = settings.declaration(ClassifyOptions, next(iter(options))).range or ()
    assert f"use {low}..{high}" in (info.value.hint or "")
