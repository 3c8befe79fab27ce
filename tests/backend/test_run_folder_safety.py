"""The run folder's promises: one writer at a time, files read back only from inside it,
damaged files refused with the step that remakes them, config.yaml untouched by a refused
command, integer settings within their ranges."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from asymkd import cli, config, fileio, layout, runlock
from asymkd.errors import ConfigError, DataError, StorageError
from asymkd.models.backbones import SceneClassifier
from asymkd.models.files import save_model
from asymkd.models.metadata import ModelMeta
from asymkd.pipeline import load_ms, load_pairs
from asymkd.report import build_report_html
from tiny_data import TINY_CONFIG, data_config, make_dataset

torch.set_num_threads(1)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("safety_data"))


def _run_folder(root: Path, dataset: dict[str, Path]) -> Path:
    """A run folder holding only the resolved config of the tiny data."""
    run = root / "run"
    run.mkdir()
    values = config.merge(TINY_CONFIG, {"data": data_config(dataset)})
    config.write_config(run / layout.CONFIG, config.from_dict(values))
    return run


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# -- 1. one writer per run folder ----------------------------------------------------------------
HOLDER = """
import sys, time
from asymkd import pipeline
def step(cfg, run, events, resume):
    print("holding", flush=True)
    time.sleep(300)
pipeline.step_teacher = step
from asymkd import cli
sys.exit(cli.main(["teacher", "--run", sys.argv[1]]))
"""


def _start_holder(run: Path) -> subprocess.Popen:
    """`asymkd teacher --run RUN` whose step only waits, holding the run folder."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the step has started: the lock is held
    assert line.strip() == "holding", proc.stderr.read() if proc.stderr else line
    return proc


SECOND_WRITERS = [["distill", "--run"], ["pair", "--run"], ["matcher", "--run"], ["teacher", "--run"],
                  ["run", "--demo", "--out"]]


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_holder_frees_the_folder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _start_holder(run)
    try:
        for args in SECOND_WRITERS:
            assert cli.main([*args, str(run)]) == 2, args
            err = capsys.readouterr().err
            assert f"the run folder {run} is in use" in err and "`asymkd teacher`" in err, err
            assert f"pid {holder.pid}" in err and "started 20" in err and "hint:" in err, err
        assert not (run / "world").exists() and not (run / layout.CONFIG).exists()  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    # the OS freed the lock with the killed process: the next command goes on to its own checks
    assert cli.main(["pair", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "in use" not in err and "no MS dataset given" in err, err
    with runlock.hold(run, "test") as me:
        assert me.pid == os.getpid()


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "--", "asymkd", *args], capture_output=True, text=True, env=_env(), timeout=300)


def test_the_ranks_of_one_torchrun_job_share_the_lock_and_fail_alike_on_a_held_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    alone = _torchrun(["teacher", "--run", str(run)])
    assert alone.returncode != 0
    assert "in use" not in alone.stderr and alone.stderr.count("no MS dataset given") == 2, alone.stderr[-3000:]
    holder = _start_holder(run)
    try:
        held = _torchrun(["teacher", "--run", str(run)])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert held.returncode != 0
    assert held.stderr.count(f"the run folder {run} is in use") == 2, held.stderr[-3000:]  # every rank, no hang


# -- 2. run files are read only as regular files inside their folder --------------------------------
def test_the_report_embeds_no_file_a_link_in_the_run_points_to(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG + b"TOP-SECRET-PNG")
    secret_text = tmp_path / "secret.yaml"
    secret_text.write_text("password: TOP-SECRET-TEXT\n")
    run = tmp_path / "run"
    for step in (layout.STUDENT, layout.BASELINE):
        (run / step).mkdir(parents=True)
        # scores without a usable confusion matrix: the report falls back to the step's PNG
        (run / step / layout.METRICS).write_text(json.dumps({"test": {"overall_accuracy": 0.5, "macro_f1": 0.5}}))
    (run / layout.STUDENT / layout.CONFUSION).symlink_to(secret)
    (run / layout.BASELINE / layout.CONFUSION).write_bytes(PNG + b"BASELINE-OWN-PNG")
    (run / layout.CONFIG).symlink_to(secret_text)
    (run / layout.TEACHER).mkdir()
    (run / layout.TEACHER / layout.METRICS).symlink_to(secret_text)
    page = build_report_html(run)
    import base64
    assert base64.b64encode(PNG + b"TOP-SECRET-PNG").decode() not in page
    assert "TOP-SECRET-TEXT" not in page
    assert base64.b64encode(PNG + b"BASELINE-OWN-PNG").decode() in page  # the run's own file is shown
    assert "symbolic link" in page  # and the page says why the others are not


@pytest.mark.parametrize("kind", ["link", "fifo", "folder", "missing"])
def test_run_file_readers_take_only_regular_files(tmp_path, kind):
    folder = tmp_path / layout.PAIRS
    folder.mkdir()
    target = tmp_path / "elsewhere.npz"
    fileio.atomic_save_npz(target, ms_index=np.zeros(2, np.int64))
    path = folder / layout.PAIRS_FILE
    if kind == "link":
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    for read in (fileio.read_regular, fileio.read_json, fileio.read_npy, fileio.read_npz):
        with pytest.raises(DataError) as info:
            read(folder, layout.PAIRS_FILE)
        assert str(path) in info.value.message and "asymkd pair --run" in info.value.hint
    with pytest.raises(ValueError):
        fileio.read_regular(tmp_path, "pairs/pairs.npz")  # one file name, never a path


# -- 3. damaged run files: exit 2 naming the file and the step that writes it ------------------------
DAMAGES = {"garbage": b"\x00garbage\xff" * 10, "empty": b"", "text": b"{\"not\": \"an archive\"}"}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_pairs_file_is_exit_2_naming_it_and_asymkd_pair(tmp_path, dataset, capsys, damage):
    run = _run_folder(tmp_path, dataset)
    (run / layout.PAIRS).mkdir()
    (run / layout.PAIRS / layout.PAIRS_FILE).write_bytes(DAMAGES[damage])
    assert cli.main(["distill", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / layout.PAIRS / layout.PAIRS_FILE} is damaged" in err and "asymkd pair --run" in err, err


def test_pairs_file_without_its_arrays_is_refused(tmp_path, dataset):
    run = _run_folder(tmp_path, dataset)
    fileio.atomic_save_npz(layout.RunFolder(run).pairs_file, ms_index=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="lacks rgb_stems, confidence"):
        load_pairs(run, None)  # type: ignore[arg-type]  # refused before the RGB set is looked at


@pytest.mark.parametrize("name", ["meta not json", "meta lacks keys", "weights garbage", "meta a link"])
def test_damaged_matcher_is_exit_2_naming_it_and_asymkd_matcher(tmp_path, dataset, capsys, name):
    run = _run_folder(tmp_path, dataset)
    matcher = run / layout.MATCHER
    matcher.mkdir()
    meta = {"kind": "matcher", "ms_backbone": "resnet18_w16", "rgb_backbone": "resnet18_w16", "ms_chans": 13,
            "embed_dim": 16, "ms_mean": [0.0] * 13, "ms_std": [1.0] * 13}
    (matcher / layout.META).write_text(json.dumps(meta))
    (matcher / layout.WEIGHTS).write_bytes(b"not safetensors")
    if name == "meta not json":
        (matcher / layout.META).write_text("{")
    elif name == "meta lacks keys":
        (matcher / layout.META).write_text(json.dumps({"kind": "matcher"}))
    elif name == "meta a link":
        (tmp_path / "other.json").write_text(json.dumps(meta))
        (matcher / layout.META).unlink()
        (matcher / layout.META).symlink_to(tmp_path / "other.json")
    assert cli.main(["pair", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(matcher) in err and "asymkd matcher --run" in err and "Traceback" not in err, err
    assert not (run / layout.PAIRS).exists()


@pytest.fixture
def teacher_run(tmp_path, dataset):
    """A run with a (untrained) teacher folder of the tiny MS set: model, soft labels, index."""
    run = _run_folder(tmp_path, dataset)
    cfg = config.from_dict(config.read_file(run / layout.CONFIG))
    ms = load_ms(cfg)
    teacher = run / layout.TEACHER
    save_model(teacher, SceneClassifier("resnet18_w16", ms.num_bands, len(ms.class_names)),
               ModelMeta(backbone="resnet18_w16", class_names=ms.class_names, band_names=ms.band_names,
                         mean=[1000.0] * ms.num_bands, std=[500.0] * ms.num_bands, patch_size=ms.size, gsd=10.0,
                         kind="teacher"))
    soft = np.full((len(ms), len(ms.class_names)), 1 / len(ms.class_names), np.float32)
    fileio.atomic_save_npy(teacher / layout.SOFT_LABELS, soft)
    fileio.atomic_write_text(teacher / layout.MS_INDEX, json.dumps({"stems": ms.stems}))
    return teacher, ms


TEACHER_DAMAGES = {
    "index not json": (layout.MS_INDEX, b"{\"stems\": ["),
    "index without stems": (layout.MS_INDEX, b"{}"),
    "soft labels garbage": (layout.SOFT_LABELS, b"\x93NUMPY garbage"),
    "soft labels of another shape": (layout.SOFT_LABELS, None),
}


@pytest.mark.parametrize("name", list(TEACHER_DAMAGES))
def test_damaged_teacher_files_name_the_file_and_asymkd_teacher(teacher_run, name):
    from asymkd.train.distill import teacher_cache
    teacher, ms = teacher_run
    file, content = TEACHER_DAMAGES[name]
    if content is None:
        fileio.atomic_save_npy(teacher / file, np.ones((2, 2), np.float32))
    else:
        (teacher / file).write_bytes(content)
    with pytest.raises(DataError) as info:  # exit 2 at the command line
        teacher_cache(teacher, ms, torch.device("cpu"), False)
    assert f"{teacher / file} is damaged" in info.value.message
    assert "asymkd teacher --run" in info.value.hint


def test_teacher_soft_labels_through_a_link_are_refused(teacher_run, tmp_path):
    from asymkd.train.distill import teacher_cache
    teacher, ms = teacher_run
    os.replace(teacher / layout.SOFT_LABELS, tmp_path / "soft.npy")
    (teacher / layout.SOFT_LABELS).symlink_to(tmp_path / "soft.npy")
    with pytest.raises(DataError, match="symbolic link"):
        teacher_cache(teacher, ms, torch.device("cpu"), False)


@pytest.mark.parametrize("content", [b"{", b"[1, 2]", b"\xff\xfe"])
def test_damaged_metrics_on_run_resume_is_exit_2_before_any_work(tmp_path, dataset, capsys, content):
    run = _run_folder(tmp_path, dataset)
    (run / layout.TEACHER).mkdir()
    (run / layout.TEACHER / layout.METRICS).write_bytes(content)
    assert cli.main(["run", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / layout.TEACHER / layout.METRICS} is damaged" in err and "asymkd teacher --run" in err, err
    assert not (run / layout.MATCHER).exists()


# -- 4. a refused command leaves config.yaml as it was ------------------------------------------------
REFUSED = {
    "an unknown pseudo-label mode": ["distill", "--set", "distill.pseudo=bogus"],
    "a missing test folder": ["distill", "--rgb-test", "/nonexistent/rgb_test"],
    "a missing MS folder": ["teacher", "--ms", "/nonexistent/ms", "--set", "teacher.epochs=3"],
    "a matcher not trained yet": ["pair", "--method", "nearest"],
    "checkpoints never": ["matcher", "--set", "checkpoint_every=0"],
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_command_leaves_the_config_byte_identical(tmp_path, dataset, capsys, case):
    run = _run_folder(tmp_path, dataset)
    before = (run / layout.CONFIG).read_bytes()
    command, *rest = REFUSED[case]
    assert cli.main([command, "--run", str(run), *rest]) == 2
    assert "hint:" in capsys.readouterr().err
    assert (run / layout.CONFIG).read_bytes() == before


def test_a_refused_command_on_a_new_run_folder_writes_no_config(tmp_path, capsys):
    run = tmp_path / "new"
    for command in (["teacher", "--run"], ["run", "--demo", "--out"]):  # refused config: not even the folder
        assert cli.main([*command, str(run), "--set", "checkpoint_every=0"]) == 2
        assert not run.exists()
    assert cli.main(["teacher", "--run", str(run), "--ms", str(tmp_path / "missing")]) == 2
    assert not (run / layout.CONFIG).exists()


def test_the_config_is_written_right_before_the_first_output(tmp_path):
    run, seen = tmp_path / "run", []
    run.mkdir()
    with fileio.written_first(run, lambda: seen.append(sorted(p.name for p in run.rglob("*")))):
        fileio.atomic_write_text(tmp_path / "elsewhere.txt", "x")  # outside the run: not yet
        assert seen == []
        fileio.atomic_write_text(run / "teacher" / "a.json", "{}")
        fileio.atomic_write_text(run / "teacher" / "b.json", "{}")
    assert seen == [[]]  # once, before a.json was written
    with pytest.raises(DataError), fileio.written_first(run, lambda: seen.append("refused")):
        raise DataError("refused before any output")
    with fileio.written_first(run, lambda: seen.append("no output")):
        pass
    assert seen[1:] == ["no output"]


# -- 5. integer settings within their ranges ----------------------------------------------------------
BAD_SETTINGS = [{"checkpoint_every": 0}, {"teacher": {"epochs": True}}, {"distill": {"epochs": 10**12}},
                {"seed": 99999999999999999999}, {"seed": -1}, {"workers": -1}, {"workers": 10**6},
                {"matcher": {"batch_size": True}}, {"distill": {"lr": True}}, {"pairing": {"sinkhorn_iters": 0}}]


def _key(values: dict) -> str:
    (name, value), = values.items()
    return f"{name}.{_key(value)}" if isinstance(value, dict) else name


@pytest.mark.parametrize("values", BAD_SETTINGS, ids=json.dumps)
def test_out_of_range_integers_and_bools_for_numbers_are_refused(values):
    with pytest.raises(ConfigError) as info:
        config.from_dict(values)
    assert info.value.message.startswith(f"{_key(values)} must be"), info.value.message


def test_every_integer_setting_has_a_range_and_the_defaults_are_in_it():
    import dataclasses
    from typing import get_type_hints
    sections = [config.RunConfig, config.DataConfig, config.TeacherConfig, config.MatcherConfig,
                config.PairingConfig, config.DistillConfig]
    ints = {f.name for cls in sections for f in dataclasses.fields(cls) if get_type_hints(cls)[f.name] is int}
    assert ints <= set(config.INT_RANGES), ints - set(config.INT_RANGES)
    config.validate(config.RunConfig())


def test_out_of_range_setting_from_a_config_file_is_exit_2_with_a_hint(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("seed: 99999999999999999999\n")
    assert cli.main(["teacher", "--run", str(tmp_path / "run"), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "must be a whole number from" in err and "hint:" in err, err


def test_workers_sets_the_torch_threads():
    from asymkd.commands._options import use_threads
    threads = torch.get_num_threads()
    try:
        use_threads(config.from_dict({"workers": 2}))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_lock_file_holds_the_holder_while_held_and_nothing_after(tmp_path):
    with runlock.hold(tmp_path, "distill") as me:
        assert json.loads((tmp_path / layout.LOCK).read_text())["pid"] == me.pid
        with pytest.raises(StorageError), runlock.hold(tmp_path, "teacher"):  # even in this process
            pass
    assert (tmp_path / layout.LOCK).read_text() == ""
