"""Classification on a Dask cluster: the merged layer equals one process's, a killed worker
still gives the complete layer, and bad cluster input fails clearly."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from asymkd import cli
from asymkd.classify import classify, run
from asymkd.classify.area import plan_tiles
from asymkd.classify.cluster import DASK_REQUIREMENT, import_distributed
from asymkd.classify.distributed import make_shards, shard_size
from asymkd.classify.grid import pixel_grid
from asymkd.errors import ConfigError, DataError
from asymkd.events import Events

distributed = pytest.importorskip("distributed")
import test_classify  # noqa: E402
from test_classify import T, read_layer, texture, write_raster  # noqa: E402

model = test_classify.model  # the tiny exported student, as the single-process tests build it

REPO = Path(__file__).resolve().parents[2]
ROWS, COLS = 12, 9  # tiles of the test raster
SHARD = 20          # tiles per shard: 4 shards of 3 tile rows (27 tiles each)


@pytest.fixture(scope="module")
def raster(tmp_path_factory) -> Path:
    return write_raster(tmp_path_factory.mktemp("raster") / "r.tif", texture(ROWS * T, COLS * T, seed=3))


@pytest.fixture(scope="module")
def reference(model, raster, tmp_path_factory) -> Path:
    """The single-process result the cluster's must equal."""
    out = tmp_path_factory.mktemp("single") / "one.gpkg"
    classify(model[0], raster, out, class_raster=out.with_suffix(".tif"))
    return out


@pytest.fixture(scope="module")
def cluster():
    """A running 2-worker cluster (workers with nannies, restarted when they die), as a
    `dask-scheduler` with `dask-worker`s would be."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as c, distributed.Client(c) as client:
        yield c, client


def assert_same_layer(a: Path, b: Path) -> None:
    ga, fa, ma = read_layer(a)
    gb, fb, mb = read_layer(b)
    assert list(fa) == list(fb) and ma["crs"] == mb["crs"]
    assert len(set(fb["tile_key"])) == len(fb["tile_key"]), "a tile was written twice"
    assert list(fa["tile_key"]) == list(fb["tile_key"])  # same keys in the same order
    for name, values in fa.items():
        if values.dtype.kind == "f":
            np.testing.assert_allclose(fb[name], values, atol=1e-6, rtol=0, err_msg=name)
        else:
            assert list(fb[name]) == list(values), name
    assert all(x.equals_exact(y, 0) for x, y in zip(ga, gb, strict=True))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- shards ------------------------------------------------------------------------------
def test_shards_are_whole_rows_covering_the_plan_once(raster):
    with rasterio.open(raster) as src:
        grid = pixel_grid(src, 10.0, T, T)
    plan = plan_tiles(grid)
    shards = make_shards(plan, SHARD)
    assert [s.rows for s in shards] == [tuple(range(i, min(i + 3, ROWS))) for i in range(0, ROWS, 3)]
    assert sum(s.total for s in shards) == plan.total == ROWS * COLS
    assert make_shards(plan, SHARD) == shards  # deterministic
    assert len(make_shards(plan, 10**6)) == 1 and len(make_shards(plan, 1)) == ROWS


@pytest.mark.parametrize("total, workers, given, size", [
    (16384, 1, 0, 4096),          # about 4 shards per worker
    (16384, 2, 0, 2048),
    (16384, 8, 0, 2048),          # never below 2,048 tiles: each shard starts its own pipeline
    (81_000_000, 50, 0, 65536),   # never above 65,536: the work a dead worker's shard loses
    (1000, 1, 0, 2048),
    (16384, 1, 300, 300),         # --shard-tiles as given
])
def test_shard_size_by_default_about_four_shards_per_worker(total, workers, given, size):
    assert shard_size(total, workers, given) == size


# -- the same layer ----------------------------------------------------------------------
def test_two_local_workers_give_the_single_process_layer(model, raster, reference, tmp_path, monkeypatch):
    seen: list[dict] = []

    class Record(Events):
        def emit(self, event, **fields):
            seen.append({"event": event, **fields})

    real_prepare, starting = run.prepare, []

    def prepare(*args, **kwargs):  # is the cluster starting while the job is planned?
        starting.append(any(t.name == "asymkd-cluster-start" for t in threading.enumerate()))
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(run, "prepare", prepare)
    children = set(multiprocessing.active_children())  # e.g. the workers of another test's cluster
    out = tmp_path / "two.gpkg"
    res = classify(model[0], raster, out, workers=2, shard_tiles=SHARD, class_raster=tmp_path / "two.tif",
                   events=Record(progress_bars=False))
    assert res.tiles_classified == ROWS * COLS and res.timings["shards"] == 4 and res.timings["workers"] == 2
    assert_same_layer(reference, out)
    with rasterio.open(reference.with_suffix(".tif")) as a, rasterio.open(tmp_path / "two.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    assert (tmp_path / "two.qml").read_text() == reference.with_suffix(".qml").read_text()
    progress = [e["done"] for e in seen if e["event"] == "progress"]
    assert progress[-1] == ROWS * COLS and progress == sorted(progress)
    assert leftovers(tmp_path) == []  # the shard folder is gone
    assert starting == [True]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("asymkd-cluster")]
    assert set(multiprocessing.active_children()) <= children  # this job's worker processes have ended


class KillOnce(distributed.WorkerPlugin):
    """Kills its worker process (SIGKILL) while it runs the first shard task any worker
    starts; the marker file makes it happen once."""

    def __init__(self, marker: str):
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing" or not str(key).startswith("asymkd-shard"):
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGKILL)).start()


def test_a_killed_worker_still_gives_the_complete_layer(model, raster, reference, cluster, tmp_path):
    import cloudpickle
    c, client = cluster
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test file
    marker = tmp_path / "killed"
    client.register_plugin(KillOnce(str(marker)), name="kill-once")
    try:
        before = set(client.scheduler_info()["workers"])
        out = tmp_path / "k.gpkg"
        res = classify(model[0], raster, out, scheduler=c.scheduler_address, shard_tiles=SHARD)
    finally:
        client.unregister_worker_plugin("kill-once")
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert marker.exists(), "no worker was killed"
    assert set(client.scheduler_info()["workers"]) != before  # the nanny started a new worker
    assert res.tiles_classified == ROWS * COLS
    assert_same_layer(reference, out)
    assert leftovers(tmp_path) == []


def test_cancel_leaves_no_output_and_no_shard_folder(model, raster, cluster, tmp_path):
    class CancelOnProgress(Events):
        def progress(self, *args, **kwargs):
            raise KeyboardInterrupt

    out = tmp_path / "c.gpkg"
    with pytest.raises(KeyboardInterrupt):
        classify(model[0], raster, out, scheduler=cluster[0].scheduler_address, shard_tiles=SHARD,
                 events=CancelOnProgress(progress_bars=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- bad input ---------------------------------------------------------------------------
def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_fails_fast_with_exit_2(model, raster, tmp_path, capsys):
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"cannot reach the Dask scheduler at {re.escape(address)}"):
        classify(model[0], raster, tmp_path / "o.gpkg", scheduler=address, connect_timeout=2)
    assert time.perf_counter() - start < 15
    rc = cli.main(["classify", str(model[0]), str(raster), "--out", str(tmp_path / "o.gpkg"),
                   "--scheduler", "tcp://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot reach the Dask scheduler" in err and "dask-scheduler" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_raster_the_workers_cannot_open_names_worker_and_path(model, raster, cluster, tmp_path, monkeypatch):
    """The client reads the raster's header, the workers cannot reach the same path."""
    local = tmp_path / "client_only.tif"
    local.write_bytes(raster.read_bytes())
    real = run.prepare

    def prepare_then_hide(*args, **kwargs):
        job = real(*args, **kwargs)
        local.rename(tmp_path / "elsewhere.tif")
        return job

    monkeypatch.setattr(run, "prepare", prepare_then_hide)
    with pytest.raises(DataError) as err:
        classify(model[0], local, tmp_path / "o.gpkg", scheduler=cluster[0].scheduler_address, shard_tiles=SHARD)
    assert re.search(r"worker tcp://127\.0\.0\.1:\d+ \(.+\) cannot open the raster", str(err.value))
    assert str(local) in str(err.value) and "/vsicurl/" in (err.value.hint or "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.tif"]


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "--workers 0 is out of range"),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"], "--workers and --scheduler were both given"),
    (["--workers", "2", "--shard-tiles", "-1"], "--shard-tiles -1 must be at least 1"),
    (["--shard-tiles", "4096"], "--shard-tiles applies to classification on a Dask cluster only"),
])
def test_bad_cluster_flags_exit_2(model, raster, tmp_path, capsys, flags, message):
    rc = cli.main(["classify", str(model[0]), str(raster), "--out", str(tmp_path / "o.gpkg"), *flags])
    assert rc == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_input_found_while_the_cluster_starts_ends_the_cluster(model, tmp_path):
    children = set(multiprocessing.active_children())  # e.g. the workers of another test's cluster
    with pytest.raises(DataError, match="missing.tif"):
        classify(model[0], tmp_path / "missing.tif", tmp_path / "o.gpkg", workers=1)
    assert set(multiprocessing.active_children()) <= children  # the worker started meanwhile has ended
    assert not [t.name for t in threading.enumerate() if t.name.startswith("asymkd-cluster")]
    assert list(tmp_path.iterdir()) == []


def test_without_dask_the_cluster_flags_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now fails
    with pytest.raises(ConfigError) as err:
        import_distributed()
    assert f"install {DASK_REQUIREMENT} to use --workers/--scheduler" in str(err.value)


def test_the_dask_pin_is_the_requirements_file_s():
    pins = (REPO / "backend" / "requirements-dask.txt").read_text()
    assert re.search(rf"^{re.escape(DASK_REQUIREMENT)}$", pins, re.M)
    version = DASK_REQUIREMENT.split("==")[1]
    assert re.search(rf"^distributed=={re.escape(version)}$", pins, re.M)


def test_single_process_classify_imports_neither_dask_nor_onnx(model, raster, tmp_path):
    # onnx alone takes 0.6-0.8 s to import, paid by every classify run and every Dask worker
    code = ("import sys; from asymkd import cli; "
            f"rc = cli.main(['classify', {str(model[0])!r}, {str(raster)!r}, '--out', {str(tmp_path / 'o.gpkg')!r}]); "
            "assert rc == 0, rc; bad = [m for m in ('dask', 'distributed', 'onnx') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_scheduler_without_workers_is_refused(model, raster, tmp_path):
    with (distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0",
                                   silence_logs=logging.ERROR) as empty,
          pytest.raises(ConfigError, match="has no workers")):
        classify(model[0], raster, tmp_path / "o.gpkg", scheduler=empty.scheduler_address, connect_timeout=1)
    assert list(tmp_path.iterdir()) == []
