"""Inputs refused before any work: bounded config files, every input folder of a step
checked before it trains, skipped dataset entries reported, resumes tied to their data,
bench arguments, argument errors with a hint, scheduler addresses, and a failing event file."""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from asymkd import cli, config, layout, pipeline
from asymkd.data.patches import load_folder, scan_folder
from asymkd.errors import ConfigError, DataError
from asymkd.events import Events
from asymkd.train import common
from tiny_data import CLASSES, TINY_CONFIG, make_dataset, write_ms

torch.set_num_threads(1)
TEACHER = ["teacher.backbone=resnet18_w16", "teacher.epochs=2", "teacher.folds=0", "teacher.batch_size=8",
           "teacher.input_size=0"]
MATCHER = ["matcher.backbone_ms=resnet18_w16", "matcher.backbone_rgb=resnet18_w16", "matcher.epochs=1",
           "matcher.batch_size=8", "matcher.embed_dim=16"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("tiny"), n_ms=4, n_rgb=4)


def _exit_2(capsys, argv: list[str], *needles: str) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "hint:" in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _argparse_exit_2(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    return err


# -- 1. config files are bounded -------------------------------------------------------------
BOMB = """a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
data:
  ms: [*c,*c,*c,*c,*c,*c,*c,*c,*c]
"""


def test_yaml_anchors_and_aliases_are_refused(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    with pytest.raises(ConfigError, match="aliases"):
        config.read_file(bomb)
    alias = tmp_path / "alias.yaml"
    alias.write_text(f"x: &d {tmp_path / 'nope'}\ndata:\n  ms: *d\n")
    _exit_2(capsys, ["teacher", "--run", str(tmp_path / "r"), "--config", str(alias)], "aliases", "alias.yaml")
    assert not (tmp_path / "r").exists()


def test_a_text_setting_is_one_bounded_text(tmp_path, capsys):
    for value in (["a", "b"], {"a": 1}):
        with pytest.raises(ConfigError, match="data.ms must be a single text value"):
            config.from_dict({"data": {"ms": value}})
    with pytest.raises(ConfigError, match="at most 4096 characters"):
        config.from_dict({"data": {"bands": "B" * 5000}})
    assert config.from_dict({"data": {"ms": "x" * 4096}}).data.ms == "x" * 4096
    listed = tmp_path / "list.yaml"
    listed.write_text("data:\n  ms: [a, b]\n")
    _exit_2(capsys, ["teacher", "--run", str(tmp_path / "r"), "--config", str(listed)], "single text value")


def test_a_lone_surrogate_in_a_config_file_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "s.yaml"
    bad.write_text('data:\n  ms: "\\ud800"\n')
    _exit_2(capsys, ["teacher", "--run", str(tmp_path / "r"), "--config", str(bad),
                     "--events", str(tmp_path / "ev.jsonl")], "not UTF-8 text", "data.ms")
    key = tmp_path / "k.yaml"
    key.write_text('"\\udc80": 1\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.read_file(key)


# -- 2. every input folder of a step checked before it trains --------------------------------------
@pytest.fixture(scope="module")
def paired_run(dataset, tmp_path_factory):
    """A run with its teacher, matcher and pairs, ready for `distill`."""
    run = tmp_path_factory.mktemp("run") / "run"
    assert cli.main(["teacher", "--run", str(run), "--ms", str(dataset["ms"]), "--set", *TEACHER, *MATCHER,
                     f"distill.batch_size={TINY_CONFIG['distill']['batch_size']}", "distill.backbone=resnet18_w16",
                     "distill.epochs=1", "distill.input_size=0", "distill.attention_dim=16",
                     "distill.attention_heads=2", "distill.baseline=false"]) == 0
    assert cli.main(["matcher", "--run", str(run)]) == 0
    assert cli.main(["pair", "--run", str(run), "--rgb", str(dataset["rgb_train"])]) == 0
    return run


def test_matcher_refuses_a_multispectral_paired_folder_before_training(tmp_path, dataset, capsys):
    run = tmp_path / "r"
    _exit_2(capsys, ["matcher", "--run", str(run), "--ms", str(dataset["ms"]), "--rgb-paired", str(dataset["ms"]),
                     "--set", *MATCHER], "--rgb-paired", "13 bands", "needs 3")
    assert not (run / layout.MATCHER).exists()


def test_distill_refuses_a_multispectral_test_folder_before_training(paired_run, dataset, capsys):
    start = time.perf_counter()
    _exit_2(capsys, ["distill", "--run", str(paired_run), "--rgb-test", str(dataset["ms"])],
            "RGB test folder", "13 bands", "--rgb-test")
    assert time.perf_counter() - start < 30
    assert not (paired_run / layout.STUDENT).exists()


def test_every_input_set_is_checked_by_one_call_per_step(tmp_path, dataset):
    cfg = config.from_dict({"data": {"ms": str(dataset["ms"]), "rgb": str(dataset["rgb_train"]),
                                     "rgb_unlabeled": str(dataset["ms"])}})
    for step in ("teacher", "matcher"):
        pipeline.check_inputs(cfg, step)  # neither reads the unlabeled folder
    for step in ("pair", "distill", "run"):
        with pytest.raises(DataError, match="unlabeled RGB folder .* has 13 bands"):
            pipeline.check_inputs(cfg, step)
    other = tmp_path / "rgb"
    shutil.copytree(dataset["rgb_train"], other)
    shutil.copytree(other / "Forest", other / "Glacier")
    cfg = config.from_dict({"data": {"ms": str(dataset["ms"]), "rgb_test": str(other)}})
    with pytest.raises(DataError, match="Glacier"):
        pipeline.check_inputs(cfg, "distill")
    broken = tmp_path / "broken"
    shutil.copytree(dataset["rgb_train"], broken)
    first = sorted((broken / "Forest").iterdir())[0]
    first.write_bytes(b"not an image")
    cfg = config.from_dict({"data": {"ms": str(dataset["ms"]), "rgb": str(broken)}})
    with pytest.raises(DataError, match="cannot read image"):
        pipeline.check_inputs(cfg, "pair")


# -- 3. skipped dataset entries are reported -------------------------------------------------------
class _Recorder(Events):
    def __init__(self):
        super().__init__(stream=None, progress_bars=False)
        self.seen: list[tuple[str, dict]] = []

    def emit(self, event, **fields):
        self.seen.append((event, fields))


def test_hidden_folders_are_skipped_with_a_warning(tmp_path, dataset):
    ms = tmp_path / "ms"
    shutil.copytree(dataset["ms"], ms)
    shutil.copytree(ms / "Forest", ms / ".Forest_old")
    warned: list[str] = []
    classes, items = scan_folder(ms, warned.append)
    assert classes == CLASSES and len(items) == 12
    assert len(warned) == 1 and ".Forest_old" in warned[0] and "start with '.'" in warned[0]
    events = _Recorder()
    hidden = tmp_path / "rgb"
    shutil.copytree(dataset["rgb_train"], hidden)
    (hidden / ".ipynb_checkpoints").mkdir()
    cfg = config.from_dict({"data": {"ms": str(dataset["ms"]), "rgb": str(hidden)}})
    pipeline.check_inputs(cfg, "pair", events)
    assert [f["message"] for e, f in events.seen if e == "warning" and ".ipynb_checkpoints" in f["message"]]


def test_images_beside_class_folders_are_refused(tmp_path, dataset):
    ms = tmp_path / "ms"
    shutil.copytree(dataset["ms"], ms)
    shutil.copy(ms / "Forest" / "Forest_0.tif", ms / "stray.tif")
    with pytest.raises(DataError, match="beside its class folders.*stray.tif"):
        load_folder(ms, "ms", bands="sentinel2")


# -- 4. a resume is tied to its data -------------------------------------------------------------
def _same_size_other_data(src: Path, dst: Path) -> None:
    """The files of `src` (same names, same sizes) with other pixels."""
    rng = np.random.default_rng(5)
    for f in sorted(src.rglob("*.tif")):
        write_ms(dst / f.relative_to(src), rng.integers(1, 10000, (13, 16, 16)))


def test_teacher_resume_with_other_data_of_the_same_size_is_refused(tmp_path, dataset, capsys, monkeypatch):
    other = tmp_path / "ms_other"
    _same_size_other_data(dataset["ms"], other)
    assert sorted(p.stat().st_size for p in other.rglob("*.tif")) == \
        sorted(p.stat().st_size for p in dataset["ms"].rglob("*.tif"))
    run = tmp_path / "run"
    monkeypatch.setattr(common.Checkpoint, "remove", lambda self: None)  # as a kill leaves it
    assert cli.main(["teacher", "--run", str(run), "--ms", str(dataset["ms"]), "--set", *TEACHER]) == 0
    assert (run / layout.TEACHER / layout.CHECKPOINT).is_file()
    capsys.readouterr()
    _exit_2(capsys, ["teacher", "--run", str(run), "--ms", str(other), "--resume"], "the data changed",
            "without --resume")
    assert cli.main(["teacher", "--run", str(run), "--ms", str(dataset["ms"]), "--resume"]) == 0  # its own data


def test_a_matcher_checkpoint_of_other_data_is_refused(tmp_path, dataset):
    ms = load_folder(dataset["ms"], "ms", bands="sentinel2")
    paired = load_folder(dataset["rgb_paired"], "rgb", class_names=ms.class_names)
    changed = load_folder(dataset["rgb_paired"], "rgb", class_names=ms.class_names)
    changed.images[0, 0, 0, 0] += 1
    assert ms.identity(paired) == ms.identity(load_folder(dataset["rgb_paired"], "rgb",
                                                          class_names=ms.class_names))
    assert ms.identity(paired) != ms.identity(changed) and ms.identity(None) != ms.identity(paired)
    ckpt = common.Checkpoint(tmp_path / "c.pt")
    gen = torch.Generator()
    ckpt.save(1, {}, gen, {}, json.dumps({"config": 1, "data": ms.identity(paired)}))
    with pytest.raises(ConfigError, match="the data changed"):
        ckpt.load({}, gen, json.dumps({"config": 1, "data": ms.identity(changed)}))
    with pytest.raises(ConfigError, match="other settings or data"):
        ckpt.load({}, gen, json.dumps({"config": 2, "data": ms.identity(paired)}))


# -- 5. bench arguments ----------------------------------------------------------------------------
def test_bench_accuracy_checks_its_arguments_before_any_training(tmp_path, dataset, capsys):
    data, out = dataset["ms"].parent, tmp_path / "out"
    common_flags = ["--data", str(data), "--out", str(out), "--set", *TEACHER, *MATCHER, "--device", "cpu"]
    _exit_2(capsys, ["bench", "accuracy", *common_flags, "--labels", "abc"], "--labels")
    _exit_2(capsys, ["bench", "accuracy", *common_flags, "--labels", "12,0"], "--labels")
    _exit_2(capsys, ["bench", "accuracy", *common_flags, "--seeds", "0"], "--seeds must be at least 1")
    _exit_2(capsys, ["bench", "accuracy", "--data", str(tmp_path)], "lacks ms/ (or --ms), rgb_train/, rgb_test/")
    assert not (out / "shared").exists()
    err = _argparse_exit_2(capsys, ["bench", "accuracy", "x", "y"])
    assert "asymkd bench accuracy: error:" in err and "hint:" in err, err


# -- 6. argument errors end with a hint ------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["teacher", "--run", "r", "--bogus"], "asymkd teacher: error: unrecognized arguments: --bogus"),
    (["classify", "m.onnx", "r.tif", "--uncertain-by", "zz"], "invalid choice: 'zz'"),
    (["teacher", "--run"], "expected one argument"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])
def test_argument_errors_end_with_a_hint(capsys, argv, needle):
    err = _argparse_exit_2(capsys, argv)
    assert needle in err, err
    assert err.rstrip("\n").splitlines()[-1].startswith("  hint: see `asymkd"), err


# -- 7. a malformed scheduler address ---------------------------------------------------------------
@pytest.mark.parametrize("address, needle", [
    ("nonsense://x", "unknown scheme 'nonsense'"),
    ("tcp://host", "the port must be a number"),
    ("tcp://:8786", "no valid host name"),
    ("tcp://host:99999", "the port must be a number"),
])
def test_a_malformed_scheduler_address_is_refused_up_front(tmp_path, capsys, address, needle):
    start = time.perf_counter()
    _exit_2(capsys, ["classify", str(tmp_path / "m.onnx"), str(tmp_path / "r.tif"), "--out",
                     str(tmp_path / "o.gpkg"), "--scheduler", address], needle, "tcp://")
    assert time.perf_counter() - start < 5
    assert list(tmp_path.iterdir()) == []


def test_well_formed_scheduler_addresses_pass_the_check():
    from asymkd.classify.cluster import check_address
    for address in ("tcp://10.0.0.5:8786", "10.0.0.5:8786", "tls://host:1", "tcp://[::1]:8786", "inproc://h/1/2"):
        assert check_address(f" {address} ") == address


# -- 8. an event file that fails after the outputs are in place -----------------------------------
def test_a_full_event_file_is_exit_2_without_a_traceback(tmp_path, capsys):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    _exit_2(capsys, ["choices", "--events", "/dev/full"], "cannot write the event file /dev/full", "disk is full")


def test_an_event_file_failing_after_the_commit_keeps_the_outputs(tmp_path, capsys, monkeypatch):
    real_open = open

    class FullAfterResult:
        """An event file whose disk fills up with the `result` event (after the outputs)."""

        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def write(self, text):
            if '"event": "result"' in text:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(text)

        def flush(self):
            self.file.flush()

        def close(self):
            self.file.close()

    monkeypatch.setattr(cli, "open", FullAfterResult, raising=False)
    world, events = tmp_path / "w", tmp_path / "ev.jsonl"
    _exit_2(capsys, ["synth", "--out", str(world), "--size", "16", "--ms-per-class", "2", "--rgb-per-class", "2",
                     "--test-per-class", "1", "--unlabeled-per-class", "1", "--classes", "2", "--paired", "2",
                     "--events", str(events)],
            f"cannot write the event file {events}", "outputs already in place are kept")
    assert (world / "ms").is_dir() and (world / "rgb_train").is_dir()
    assert '"event": "result"' not in events.read_text()


def test_teacher_folds_of_other_data_are_not_mixed_in(tmp_path, dataset, capsys, monkeypatch):
    from asymkd.train import teacher
    other = tmp_path / "ms_other"
    _same_size_other_data(dataset["ms"], other)
    real = teacher.fit_classifier

    def killed_after_the_folds(*args, **kwargs):
        if args[6] == "teacher":  # the final teacher (its step name), once the folds are saved
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    run = tmp_path / "run"
    flags = ["--set", *[t for t in TEACHER if not t.startswith("teacher.folds")], "teacher.folds=2"]
    monkeypatch.setattr(teacher, "fit_classifier", killed_after_the_folds)
    assert cli.main(["teacher", "--run", str(run), "--ms", str(dataset["ms"]), *flags]) == 130
    assert (run / layout.TEACHER / layout.FOLDS).is_file()
    capsys.readouterr()
    _exit_2(capsys, ["teacher", "--run", str(run), "--ms", str(other), "--resume"], "the data changed")
    monkeypatch.setattr(teacher, "fit_classifier", real)
    assert cli.main(["teacher", "--run", str(run), "--ms", str(dataset["ms"]), "--resume"]) == 0
