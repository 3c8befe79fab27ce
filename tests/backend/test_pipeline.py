"""The engine's job steps end to end on tiny data, resume after a kill, and determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from asymkd import config as config_mod
from asymkd.events import Events
from asymkd.pipeline import resolve_config, run_all, step_distill, step_matcher, step_pair, step_teacher
from tiny_data import TINY_CONFIG, data_config, make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    torch.set_num_threads(1)
    return make_dataset(tmp_path_factory.mktemp("tiny"))


def _cfg(run, dataset, **extra):
    values = config_mod.merge(TINY_CONFIG, {"data": data_config(dataset, unlabeled=True), **extra})
    return resolve_config(run, None, values)


def test_run_all_writes_every_step_and_report(tmp_path, dataset):
    run = tmp_path / "run"
    cfg = _cfg(run, dataset)
    report = run_all(cfg, run)
    assert report.is_file()
    for step in ("teacher", "matcher", "student", "baseline"):
        assert (run / step / "metrics.json").is_file(), step
    student = json.loads((run / "student" / "metrics.json").read_text())
    assert student["test"]["n"] == 12  # 3 classes x 4 test patches
    assert student["summary"]["rgb_train"] > student["summary"]["labeled_train"]  # unlabeled used
    baseline = json.loads((run / "baseline" / "metrics.json").read_text())
    # the semi-supervised recipe (default) trains baseline and student on the same samples
    assert baseline["summary"]["rgb_train"] == student["summary"]["rgb_train"]
    assert baseline["summary"]["semi_supervised"] == student["summary"]["semi_supervised"] == "fixmatch"
    # the 18 MS samples train the distilled student as RGB rows (their paired RGB), not the baseline
    assert student["summary"]["ms_rows"] == 18 and student["summary"]["ms_rows_source"] == "pairs"
    assert baseline["summary"]["ms_rows"] == 0
    assert "train_unlabeled" in baseline["history"][0] and "train_pseudo" not in baseline["history"][0]
    meta = json.loads((run / "student" / "meta.json").read_text())
    assert meta["class_names"] == ["Forest", "River", "Urban"] and meta["in_chans"] == 3
    teacher_meta = json.loads((run / "teacher" / "meta.json").read_text())
    assert teacher_meta["band_names"][12] == "B8A" and len(teacher_meta["mean"]) == 13
    soft = np.load(run / "teacher" / "soft_labels.npy")
    assert soft.shape == (18, 3) and np.allclose(soft.sum(1), 1, atol=1e-4)
    pairs = np.load(run / "pairs" / "pairs.npz")
    ms_labels = json.loads((run / "teacher" / "ms_index.json").read_text())["labels"]
    rgb_labels = np.repeat([0, 1, 2], 8)
    # labeled RGB samples are paired within their class
    assert (np.array(ms_labels)[pairs["ms_index"][:24]] == rgb_labels).all()
    assert "baseline" in report.read_text() and "student" in report.read_text().lower()


def test_events_stream_reports_steps_progress_and_results(tmp_path, dataset):
    import io
    stream = io.StringIO()
    run = tmp_path / "run"
    cfg = _cfg(run, dataset)
    step_teacher(cfg, run, Events(stream, progress_bars=False, min_interval_s=0))
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"step", "progress", "metrics", "result"} <= kinds
    progress = [e for e in events if e["event"] == "progress" and e["step"] == "teacher"]
    assert progress[-1]["fraction"] == pytest.approx(1.0)
    assert all(0 <= e["fraction"] <= 1 for e in progress)
    assert events[0] == {**events[0], "event": "step", "step": "teacher", "status": "started"}


class _KillAfter(Events):
    """Raises like a kill once a training step reaches the given epoch."""

    def __init__(self, step: str, epoch: int):
        super().__init__(None, progress_bars=False)
        self.kill_step, self.kill_epoch = step, epoch

    def progress(self, step, done, total, started, unit="it", force=False, **extra):
        if step == self.kill_step and extra.get("epoch") == self.kill_epoch:
            raise KeyboardInterrupt


def test_resume_after_kill_reaches_the_same_weights(tmp_path, dataset):
    extra = {"distill": {**TINY_CONFIG["distill"], "epochs": 4, "baseline": False}}
    ref = tmp_path / "ref"
    cfg = _cfg(ref, dataset, **extra)
    step_teacher(cfg, ref)
    step_matcher(cfg, ref)
    step_pair(cfg, ref)
    step_distill(cfg, ref)

    killed = tmp_path / "killed"
    cfg_k = _cfg(killed, dataset, **extra)
    step_teacher(cfg_k, killed)
    step_matcher(cfg_k, killed)
    step_pair(cfg_k, killed)
    with pytest.raises(KeyboardInterrupt):
        step_distill(cfg_k, killed, _KillAfter("distill", 3))
    assert (killed / "student" / "checkpoint.pt").is_file()
    assert not (killed / "student" / "model.safetensors").exists()
    step_distill(cfg_k, killed, resume=True)
    a = load_file(str(ref / "student" / "model.safetensors"))
    b = load_file(str(killed / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not (killed / "student" / "checkpoint.pt").exists()  # cleaned up once finished


def test_the_student_resumes_after_checkpoint_spacing_device_or_test_folder_changed(tmp_path, dataset):
    """What a resumed student must share is its own section, the pairing, the split and the
    data: not how often the run checkpoints, where it runs, or the folder it is tested on."""
    import dataclasses
    import io
    import shutil

    from asymkd.errors import ConfigError
    extra = {"distill": {**TINY_CONFIG["distill"], "epochs": 4, "baseline": False}}
    ref = tmp_path / "ref"
    cfg = _cfg(ref, dataset, **extra)
    for step in (step_teacher, step_matcher, step_pair, step_distill):
        step(cfg, ref)
    killed = tmp_path / "killed"
    shutil.copytree(ref, killed, ignore=shutil.ignore_patterns("student", "report.html"))  # its teacher and pairs
    cfg_k = _cfg(killed, dataset, **extra)
    with pytest.raises(KeyboardInterrupt):
        step_distill(cfg_k, killed, _KillAfter("distill", 3))
    assert (killed / "student" / "checkpoint.pt").is_file()
    other_lr = dataclasses.replace(cfg_k, distill=dataclasses.replace(cfg_k.distill, lr=cfg_k.distill.lr / 2))
    with pytest.raises(ConfigError, match="other settings"):  # its own settings still count
        step_distill(other_lr, killed, resume=True)
    test_copy = tmp_path / "test_elsewhere"
    shutil.copytree(dataset["rgb_test"], test_copy)
    moved = dataclasses.replace(cfg_k, checkpoint_every=3, device="cpu",
                                data=dataclasses.replace(cfg_k.data, rgb_test=str(test_copy)))
    stream = io.StringIO()
    step_distill(moved, killed, Events(stream, progress_bars=False), resume=True)
    logs = [e["message"] for e in map(json.loads, stream.getvalue().splitlines()) if e["event"] == "log"]
    assert "distill: resumed at epoch 2" in logs
    a = load_file(str(ref / "student" / "model.safetensors"))
    b = load_file(str(killed / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_test = json.loads((ref / "student" / "metrics.json").read_text())["test"]
    assert json.loads((killed / "student" / "metrics.json").read_text())["test"] == ref_test


def test_teacher_training_is_deterministic_on_cpu(tmp_path, dataset):
    weights = []
    for name in ("a", "b"):
        run = tmp_path / name
        cfg = _cfg(run, dataset, teacher={**TINY_CONFIG["teacher"], "folds": 0})
        step_teacher(cfg, run)
        weights.append(load_file(str(run / "teacher" / "model.safetensors")))
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_loss_terms_are_logged_per_epoch(tmp_path, dataset):
    run = tmp_path / "run"
    cfg = _cfg(run, dataset, distill={**TINY_CONFIG["distill"], "baseline": False, "w_feat": 0.5})
    step_teacher(cfg, run)
    step_matcher(cfg, run)
    step_pair(cfg, run)
    step_distill(cfg, run)
    history = json.loads((run / "student" / "metrics.json").read_text())["history"]
    assert {"train_gt", "train_pseudo", "train_feat", "val_accuracy", "teacher_gate"} <= set(history[0])


def test_run_command_from_a_toml_config_file(tmp_path, dataset, capsys):
    import tomllib  # noqa: F401 - the file below must parse as TOML

    from asymkd.cli import main
    t, m, d = TINY_CONFIG["teacher"], TINY_CONFIG["matcher"], TINY_CONFIG["distill"]
    data = data_config(dataset)
    text = "\n".join([
        "seed = 3",
        "[data]", *[f'{k} = "{v}"' for k, v in data.items()], 'bands = "sentinel2"', "val_fraction = 0.25",
        "[teacher]", *[f'{k} = {v!r}'.replace("'", '"') for k, v in t.items()],
        "[matcher]", *[f'{k} = {v!r}'.replace("'", '"') for k, v in m.items()],
        "[distill]", *[f'{k} = {v!r}'.replace("'", '"') for k, v in d.items()], "baseline = false",
    ])
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    run = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(run)]) == 0
    assert "report:" in capsys.readouterr().out
    resolved = config_mod.read_file(run / "config.yaml")
    assert resolved["seed"] == 3 and resolved["distill"]["baseline"] is False
    assert (run / "student" / "model.safetensors").is_file() and not (run / "baseline").exists()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    finished = [e["step"] for e in events if e["event"] == "step" and e["status"] == "finished"]
    assert finished == ["teacher", "matcher", "pair", "distill"]


def test_without_semi_supervision_the_baseline_sees_labeled_samples_only(tmp_path, dataset):
    run = tmp_path / "run"
    cfg = _cfg(run, dataset, distill={"semi_supervised": "none", "w_feat": 0.0})
    run_all(cfg, run)
    student = json.loads((run / "student" / "metrics.json").read_text())
    baseline = json.loads((run / "baseline" / "metrics.json").read_text())
    assert student["summary"]["rgb_train"] > student["summary"]["labeled_train"]
    assert baseline["summary"]["rgb_train"] == baseline["summary"]["labeled_train"]
    assert "train_unlabeled" not in student["history"][0]


def test_matcher_is_reproducible_alone_and_after_kill_and_resume(tmp_path, dataset):
    extra = {"matcher": {**TINY_CONFIG["matcher"], "epochs": 3}}
    weights = []
    for name in ("a", "b"):
        run = tmp_path / name
        torch.manual_seed(len(name) * 17 + hash(name) % 5)  # whatever state torch was left in
        step_matcher(_cfg(run, dataset, **extra), run)
        weights.append(load_file(str(run / "matcher" / "model.safetensors")))
    killed = tmp_path / "killed"
    cfg = _cfg(killed, dataset, **extra)
    with pytest.raises(KeyboardInterrupt):
        step_matcher(cfg, killed, _KillAfter("matcher", 2))
    step_matcher(cfg, killed, resume=True)
    weights.append(load_file(str(killed / "matcher" / "model.safetensors")))
    for other in weights[1:]:
        for key in weights[0]:
            assert torch.equal(weights[0][key], other[key]), key


def _run_outputs(run) -> dict[str, torch.Tensor]:
    out = {}
    for step in ("teacher", "matcher", "student", "baseline"):
        for key, value in load_file(str(run / step / "model.safetensors")).items():
            out[f"{step}/{key}"] = value
    out["pairs"] = torch.as_tensor(np.load(run / "pairs" / "pairs.npz")["ms_index"])
    out["soft_labels"] = torch.as_tensor(np.load(run / "teacher" / "soft_labels.npy"))
    return out


@pytest.mark.parametrize("kill_step,kill_epoch", [("teacher fold 2/2", 1), ("baseline", 1)])
def test_every_step_of_a_run_is_reproducible_after_a_kill_and_resume(tmp_path, dataset, kill_step, kill_epoch):
    """teacher with folds, matcher, pairs, student and baseline: a run killed anywhere and
    resumed ends with the bytes of an uninterrupted run."""
    ref = tmp_path / "ref"
    run_all(_cfg(ref, dataset), ref)
    killed = tmp_path / "killed"
    cfg = _cfg(killed, dataset)
    with pytest.raises(KeyboardInterrupt):
        run_all(cfg, killed, _KillAfter(kill_step, kill_epoch))
    torch.manual_seed(1234)  # a resumed process starts from another random state
    run_all(cfg, killed, resume=True)
    a, b = _run_outputs(ref), _run_outputs(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_last_lines_give_both_scores_the_gain_and_where_it_came_from(tmp_path):
    from asymkd.commands.run import result_lines
    for name, oa, f1, rows in (("baseline", 0.79, 0.787, 0), ("student", 0.815, 0.808, 240)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"test": {"overall_accuracy": oa, "macro_f1": f1}, "summary": {"ms_rows": rows}}))
    lines = result_lines(tmp_path).splitlines()
    assert lines == [" baseline: test OA  79.0 %, macro-F1  78.7 %",
                     "distilled: test OA  81.5 %, macro-F1  80.8 %",
                     "     gain: +2.5 OA points from the MS teacher and its 240 samples as RGB rows"]
