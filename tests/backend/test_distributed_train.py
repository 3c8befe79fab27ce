"""Training under torchrun (gloo, 2 CPU processes) against one process with the same
global batch.

The ranks are started with torch.multiprocessing and the same environment torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the engine's own
`distributed.session()` starts the process group. The reference runs in a process of its
own, alike in threads and in the test backbone.

Tolerances: the step tests swap BatchNorm for GroupNorm in the test backbone (CPU gloo has
no SyncBatchNorm; with BatchNorm each rank normalises over its own half-batch, and on tiny
data the weights then differ by far more than rounding). With a norm that has no batch
statistics the two-rank run is the one-process run up to the order of float sums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import operator
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import multiprocessing as mp

from asymkd import config as config_mod
from asymkd.errors import ConfigError
from asymkd.events import NULL_EVENTS, Events
from asymkd.launch import Launch, launched
from asymkd.pipeline import resolve_config, step_distill, step_matcher, step_pair, step_teacher
from asymkd.train import common, distributed, loop
from tiny_data import TINY_CONFIG, data_config, make_dataset

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


# -- what runs inside each process ---------------------------------------------------------
class _GroupNorm4(torch.nn.GroupNorm):
    def __init__(self, channels: int, **kwargs: Any):
        super().__init__(4, channels, **kwargs)


def _no_batch_statistics(setitem: Callable[..., None]) -> None:
    """The test backbone with GroupNorm in place of BatchNorm (see the module's docstring)."""
    from asymkd.models import backbones
    spec = backbones.BACKBONES["resnet18_w16"]
    setitem(backbones.BACKBONES, "resnet18_w16", backbones.BackboneSpec(
        spec.timm_name, {**spec.kwargs, "norm_layer": _GroupNorm4}, about="test"))


def _record_pairs(setattr_: Callable[..., None]) -> list[list[int]]:
    """The pairs after every re-pairing of the distillation, from now on."""
    from asymkd.train.distill import DistillTask
    pairs: list[list[int]] = []
    after_step = DistillTask.after_step

    def recording(self: DistillTask, global_step: int) -> None:
        after_step(self, global_step)
        if global_step % self.repair_every == 0:
            pairs.append(self.objective.partners.tolist())

    setattr_(DistillTask, "after_step", recording)
    return pairs


def _record_validation(setattr_: Callable[..., None]) -> list[list[float]]:
    """[accuracy, patches this rank predicted] of the student's validation after every epoch."""
    from asymkd.train.classifier import ClassifierTask
    seen: list[list[float]] = []
    validate, predict = ClassifierTask.validate, common.predict_normalised
    predicted: list[int] = []

    def counting(model: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        predicted.append(len(x))
        return predict(model, x, *args, **kwargs)

    def recording(self: ClassifierTask) -> float | None:
        predicted.clear()
        acc = validate(self)
        if acc is not None:  # the teacher's folds hold nothing back
            seen.append([acc, sum(predicted)])
        return acc

    setattr_(ClassifierTask, "validate", recording)
    setattr_(common, "predict_normalised", counting)
    return seen


def _watch_writes(root: Path, seen: list[str]) -> None:
    """Record every file opened for writing, renamed, made or removed under `root`."""
    prefix = str(root.resolve())

    def written(event: str, args: tuple) -> bool:
        if event == "open":
            mode, flags = args[1] or "", args[2] or 0
            return any(c in str(mode) for c in "wax+") or (not mode and bool(flags & WRITE_FLAGS))
        return event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree")

    def hook(event: str, args: tuple) -> None:
        try:
            if written(event, args) and isinstance(args[0], (str, os.PathLike)) \
                    and os.path.abspath(args[0]).startswith(prefix):
                seen.append(f"{event} {args[0]}")
        except Exception:  # an audit hook must never break the call it watches
            pass

    sys.addaudithook(hook)


def _process(rank: int, world: int, port: int, job: Callable[..., Any], args: tuple, out: Path) -> None:
    """One rank: the torchrun environment (when world > 1), one thread, the job; its result
    and what it wrote in the run folder go to out/rank{rank}.json."""
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ[distributed.TIMEOUT_ENV] = "1"
    torch.set_num_threads(1)
    writes: list[str] = []
    if rank > 0:
        _watch_writes(Path(args[0]), writes)
    try:
        with distributed.session():
            result = job(*args)
    except Exception as exc:  # reported to the test, which decides
        result = {"error": type(exc).__name__, "message": str(exc)}
    (out / f"rank{rank}.json").write_text(json.dumps({"result": result, "writes": writes, "time": time.time()}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # reported: no interpreter teardown (a process group whose peer died may stall it)


def _launch(job: Callable[..., Any], args: tuple, world: int, out: Path, timeout: float = 400) -> list[dict]:
    """Run `job(*args)` on `world` ranks (1: a plain process); each rank's report."""
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_process, args=(world, port, job, args, out), nprocs=world, join=False)
    for p in ctx.processes:
        p.join(timeout)
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    reports = [out / f"rank{r}.json" for r in range(world)]
    return [json.loads(r.read_text()) if r.is_file() else {"result": None, "writes": []} for r in reports]


# -- jobs ------------------------------------------------------------------------------------
class _Toy(loop.Task):
    """A small net on a fixed set whose batch draws an augmentation from the generator."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.modules = {"net": self.net}
        self.x = torch.randn(40, 4)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def batch_terms(self, index: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        noise = 0.1 * torch.randn(len(index), 4, generator=gen)  # drawn for the global batch
        index, noise = self.shard.take(index), self.shard.take(noise)
        err = self.net(self.x[index] + noise).squeeze(1) - self.y[index]
        return {"loss": (err ** 2).mean()}


class _Killed(Exception):
    pass


class _KillAt(Events):
    """Events that stop the run when `epoch` starts reporting (its predecessor is saved)."""

    def __init__(self, epoch: int):
        super().__init__(stream=None, progress_bars=False)
        self.epoch = epoch

    def progress(self, step: str, done: int, total: int, started: float, unit: str = "it", force: bool = False,
                 **extra: Any) -> None:
        if extra.get("epoch") == self.epoch:
            raise _Killed()


def _toy_fit(folder: str, epochs: int, resume: bool = False, n: int = 40, batch_size: int = 9,
             events: Events = NULL_EVENTS) -> dict:
    task = _Toy()
    settings = loop.LoopSettings("toy", epochs, batch_size, 0.05, 0.0, common.Checkpoint(Path(folder) / "ckpt.pt"),
                                 resume=resume)
    history = loop.fit(task, n, settings, common.generator(3), events)
    return {"weights": [p.detach().flatten().tolist() for p in task.net.parameters()],
            "loss": [h["train_loss"] for h in history]}


def _toy_job(folder: str) -> dict:
    """Uninterrupted, interrupted-and-resumed, and refused runs of the toy."""
    whole = _toy_fit(folder, 4)
    with contextlib.suppress(_Killed):
        _toy_fit(folder, 4, events=_KillAt(3))  # killed in epoch 3: epoch 2's checkpoint is there
    resumed = _toy_fit(folder, 4, resume=True)
    refused = []
    for n, batch_size in ((1, 9), (40, 1)):
        try:
            _toy_fit(folder, 1, n=n, batch_size=batch_size)
        except ConfigError as exc:
            refused.append(str(exc))
    return {"whole": whole, "resumed": resumed, "refused": refused}


def _steps(run: str, setattr_: Callable[..., None], setitem: Callable[..., None], device: str | None = None,
           batch_norm: bool = False) -> dict:
    """The teacher and the distillation of a run folder that holds the matcher and pairs (on
    `device` when given; with the backbone's BatchNorm kept when `batch_norm`: on CUDA
    SyncBatchNorm)."""
    if not batch_norm:
        _no_batch_statistics(setitem)
    pairs = _record_pairs(setattr_)
    validation = _record_validation(setattr_)
    cfg = resolve_config(Path(run), write=False)
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    teacher = step_teacher(cfg, Path(run))
    group = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    student = step_distill(cfg, Path(run))
    return {"teacher": teacher.get("summary"), "student": student.get("student", {}).get("test"), "pairs": pairs,
            "validation": validation, "backend": group}


def _steps_job(run: str) -> dict:
    return _steps(run, setattr, operator.setitem)


def _device_steps_job(run: str, device: str) -> dict:
    return _steps(run, setattr, operator.setitem, device=device, batch_norm=True)


# -- tests -------------------------------------------------------------------------------------
def test_two_ranks_train_as_one_process_with_the_global_batch_and_resume(tmp_path):
    (tmp_path / "one").mkdir()
    single = _toy_fit(str(tmp_path / "one"), 4)
    reports = _launch(_toy_job, (str(tmp_path / "run"),), 2, tmp_path / "out")
    for r in reports:
        assert "error" not in r["result"], r["result"]
    a, b = (r["result"] for r in reports)
    # uneven slices (a global batch of 9 gives 5 + 4): the weighted mean is the batch mean
    np.testing.assert_allclose(np.concatenate(a["whole"]["weights"]), np.concatenate(single["weights"]),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["whole"]["loss"], single["loss"], rtol=1e-6)
    assert a["whole"] == b["whole"]  # the ranks hold one model
    assert a["resumed"] == a["whole"]  # resumed from rank 0's checkpoint: bit for bit
    assert len(a["refused"]) == len(b["refused"]) == 2  # on every rank
    assert "2 processes (torchrun world size) for 1 training samples" in a["refused"][0]
    assert "global batch of 1 samples cannot be split over 2 processes" in a["refused"][1]
    assert reports[1]["writes"] == []
    assert (tmp_path / "run" / "ckpt.pt").is_file()


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory) -> Path:
    """A run folder with its config, matcher and pairs (one process)."""
    torch.set_num_threads(1)  # as in the ranks
    root = tmp_path_factory.mktemp("dist")
    data = make_dataset(root / "data")
    run = root / "run"
    values = config_mod.merge(TINY_CONFIG, {"data": data_config(data), "device": "cpu",
                                            "distill": {"baseline": False, "repair_every": 1}})
    cfg = resolve_config(run, None, values)
    step_matcher(cfg, run)
    step_pair(cfg, run)
    return run


def test_teacher_and_distillation_on_two_ranks_match_one_process(tmp_path, paired_run, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(paired_run, one)
    shutil.copytree(paired_run, two)
    ref = _steps(str(one), monkeypatch.setattr, monkeypatch.setitem)  # one process: this one
    reports = _launch(_steps_job, (str(two),), 2, tmp_path / "out2")
    got = reports[0]["result"]
    assert "error" not in ref and "error" not in got, (ref, got)
    # out-of-fold teachers one per rank, each trained as one process would: the same soft labels
    np.testing.assert_array_equal(np.load(one / "teacher" / "soft_labels.npy"),
                                  np.load(two / "teacher" / "soft_labels.npy"))
    assert got["teacher"] == ref["teacher"]
    # the student's domain-shift term (CORAL over a batch's tokens) is computed per rank over
    # its half-batch: not a per-sample mean, so the student differs by more than rounding
    # measured: teacher 9e-7; student 4e-3 to 1.04e-2 over six seeds of its stream
    for step, atol in (("teacher", 1e-5), ("student", 2e-2)):
        w1, w2 = load_file(str(one / step / "model.safetensors")), load_file(str(two / step / "model.safetensors"))
        assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < atol, step
    assert got["student"]["overall_accuracy"] == pytest.approx(ref["student"]["overall_accuracy"], abs=1 / 12)
    # every re-pairing gave the same pairs on both ranks
    rank1 = reports[1]["result"]
    assert len(got["pairs"]) == len(ref["pairs"]) > 2 and rank1["pairs"] == got["pairs"]
    # validation: each rank predicts half the held-out patches and every rank gets one accuracy
    # (that of the whole set), so the epoch kept is the same on all ranks
    (acc, n0), (acc1, n1), (ref_acc, n) = (np.array(r["validation"]).T for r in (got, rank1, ref))
    assert len(acc) == len(ref_acc) > 1 and list(acc1) == list(acc)
    assert list(n0 + n1) == list(n) and max(n0) < max(n)  # no patch predicted twice
    np.testing.assert_allclose(acc, ref_acc, atol=1 / min(n) + 1e-9)  # one patch may differ at most
    # rank 1 wrote nothing in the run folder; the files are those of one process
    assert reports[1]["writes"] == []
    assert sorted(p.relative_to(two).as_posix() for p in two.rglob("*")) == \
        sorted(p.relative_to(one).as_posix() for p in one.rglob("*"))


class _Dying(_Toy):
    def __init__(self, folder: str):
        super().__init__()
        self.folder = Path(folder)

    def after_step(self, global_step: int) -> None:
        if distributed.rank() == 1 and global_step == 3:
            (self.folder / "died").write_text(str(time.time()))
            os._exit(3)  # a rank that dies mid-epoch


def _dying_job(folder: str) -> dict:
    loop.fit(_Dying(folder), 40, loop.LoopSettings("toy", 50, 8, 0.05, 0.0), common.generator(0), NULL_EVENTS)
    return {}


def test_ranks_that_share_a_gpu_send_cuda_tensors_through_gloo(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launched() == Launch(rank=1, world=4, local_rank=1, local_world=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.backend(1) == "cpu:gloo,cuda:nccl"
    assert distributed.backend(2) == "gloo"  # NCCL refuses two ranks on one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.backend(2) == "cpu:gloo,cuda:nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.backend(1) == "gloo"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_two_ranks_train_data_parallel_on_the_gpu(tmp_path, paired_run):
    """DDP on CUDA (run by tools/gpu_check.sh): NCCL where each rank has a GPU, gloo where the
    two share the only one; BatchNorm becomes SyncBatchNorm, over the global batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(paired_run, one)
    shutil.copytree(paired_run, two)
    ref = _launch(_device_steps_job, (str(one), "cuda"), 1, tmp_path / "out1")[0]["result"]
    reports = _launch(_device_steps_job, (str(two), "cuda"), 2, tmp_path / "out2")
    got, rank1 = (r["result"] for r in reports)
    for r in (ref, got, rank1):
        assert r is not None and "error" not in r, r
    assert got["backend"] is not None and ("nccl" in got["backend"]) == (torch.cuda.device_count() >= 2)
    assert len(got["pairs"]) > 2 and rank1["pairs"] == got["pairs"]
    assert reports[1]["writes"] == []
    for step in ("teacher", "student"):
        weights = load_file(str(two / step / "model.safetensors"))
        assert all(bool(torch.isfinite(w.float()).all()) for w in weights.values()), step
    # bf16 autocast and cuDNN's kernels: close to one process, not bit for bit
    assert got["teacher"]["out_of_fold_accuracy"] == pytest.approx(ref["teacher"]["out_of_fold_accuracy"], abs=0.2)
    assert got["student"]["overall_accuracy"] == pytest.approx(ref["student"]["overall_accuracy"], abs=0.25)


def test_a_rank_that_dies_ends_the_others_with_a_clear_error(tmp_path):
    reports = _launch(_dying_job, (str(tmp_path),), 2, tmp_path / "out")
    assert reports[1]["result"] is None  # it died
    assert reports[0]["result"]["error"] == "RankFailure", reports[0]
    assert "rank 0: a collective operation failed" in reports[0]["result"]["message"]
    waited = reports[0]["time"] - float((tmp_path / "died").read_text())
    assert waited < 50  # at once (the peer's connection closes), within the 1-minute timeout at most


def test_torchrun_teacher_command_speaks_and_writes_once(tmp_path, paired_run):
    """The command line under torchrun itself: one event stream, one summary line, exit 0."""
    run = tmp_path / "run"
    shutil.copytree(paired_run, run)
    env = {**os.environ, distributed.TIMEOUT_ENV: "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "--", "asymkd", "teacher", "--run", str(run), "--device", "cpu", "--events", "-"],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [e for e in events if e["event"] == "step" and e["status"] == "started"]
    assert len(started) == 1 and started[0]["step"] == "teacher"
    assert sum(e["event"] == "metrics" for e in events) == 1
    assert (run / "teacher" / "soft_labels.npy").is_file()
    assert not list(run.rglob("checkpoint.pt")) and not list(run.rglob("folds.npz"))


def test_under_torchrun_only_rank_0_opens_the_event_file(tmp_path, monkeypatch):
    from asymkd import cli
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        assert cli.main(["choices", "--events", str(tmp_path / f"rank{rank}.jsonl")]) == 0
    assert not (tmp_path / "rank1.jsonl").exists()  # not even created (on another node it would be a stray file)
    assert json.loads((tmp_path / "rank0.jsonl").read_text().splitlines()[-1])["event"] == "choices"
