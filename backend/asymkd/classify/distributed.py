"""Classification on a Dask cluster: `classify --workers N` (a local cluster of N worker
processes) or `classify --scheduler ADDRESS` (the workers of a running dask-scheduler).

The planned tiles are split into shards of whole tile rows (`make_shards`: consecutive
rows of the plan, about `shard_tiles` tiles each, by default about SHARDS_PER_WORKER per
worker; tile keys are the grid's, unchanged).
Each shard is one Dask task: the worker opens the raster itself (a local path it sees, or
a GDAL path such as /vsicurl/ or /vsis3/), runs the one read -> infer loop of the engine
(`stream.classify_plan`) and writes the shard's per-tile summaries to a shard file in a
hidden scratch folder beside the output (a shared file system when the workers are on
other hosts). The client merges the shards in shard order into the same writer a single
process uses, so the GeoPackage, its fields, style and class raster are the same.

Shard tasks are pure: the same task gives the same file, written atomically under its
final name, so when a worker dies and Dask runs its shards again elsewhere, each shard
still has exactly one file and no tile is merged twice. A failed or cancelled job removes
the scratch folder, and the outputs are never placed (run.py's AtomicOutputs).

Dask is optional: this module is imported only for --workers/--scheduler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import errors
from ..errors import AsymKDError, DataError
from ..events import Events
from ..fileio import staged_dir
from ..tempnames import temp_name
from .area import TilePlan
from .cluster import Cluster
from .grid import Grid
from .infer import OnnxClassifier, Summary, available_cores, summarize
from .options import ClassifyOptions
from .stream import Counts, Job, TileSink, classify_plan, deliver, open_raster
from .writer import ClassRaster

_SEEN_BY_WORKERS = ("every worker must see it at the same path: a shared file system, or a GDAL network path "
                    "such as /vsicurl/https://host/scene.tif or /vsis3/bucket/scene.tif")


# -- shards ----------------------------------------------------------------------------
# Each shard starts and drains its own read -> infer pipeline (about 0.1 s of a worker), so
# few large shards are faster; a few per worker still balance uneven workers, and a shard
# bounds the work redone when a worker dies.
SHARDS_PER_WORKER = 4
MIN_SHARD_TILES, MAX_SHARD_TILES = 2048, 65536


def shard_size(total: int, workers: int, shard_tiles: int = 0) -> int:
    """Tiles per shard: `shard_tiles` when given, else about SHARDS_PER_WORKER shards per
    worker, within MIN_SHARD_TILES..MAX_SHARD_TILES."""
    if shard_tiles:
        return shard_tiles
    wanted = -(-total // (SHARDS_PER_WORKER * max(workers, 1)))
    return min(max(wanted, MIN_SHARD_TILES), MAX_SHARD_TILES)


@dataclasses.dataclass(frozen=True)
class Shard:
    """Consecutive rows of the tile plan: `cols[i]` are the selected columns of `rows[i]`."""

    index: int
    rows: tuple[int, ...]
    cols: tuple[np.ndarray | None, ...]
    total: int

    def plan(self, grid: Grid) -> TilePlan:
        return TilePlan(grid, list(self.rows), list(self.cols), self.total)

    def describe(self) -> str:
        return f"shard {self.index} (tile rows {self.rows[0]}..{self.rows[-1]})"


def make_shards(plan: TilePlan, shard_tiles: int) -> list[Shard]:
    """Split the plan into shards of whole tile rows, about `shard_tiles` tiles each: the
    same plan and size always give the same shards."""
    shards: list[Shard] = []
    rows: list[int] = []
    cols: list[np.ndarray | None] = []
    n = 0
    for r, c in zip(plan.rows, plan.cols, strict=True):
        rows.append(r)
        cols.append(c)
        n += plan.grid.cols if c is None else len(c)
        if n >= shard_tiles:
            shards.append(Shard(len(shards), tuple(rows), tuple(cols), n))
            rows, cols, n = [], [], 0
    if rows:
        shards.append(Shard(len(shards), tuple(rows), tuple(cols), n))
    return shards


# -- the worker's side -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs for one shard (small: no tile data, no model)."""

    model: str
    raster: str
    grid: Grid
    bands: tuple[int, ...]
    feed: str            # dtype the tiles are fed to the model in
    threads: int         # inference threads on the worker (0: its cores)
    opts: ClassifyOptions
    shard: Shard
    path: str            # the shard file


@dataclasses.dataclass
class ShardDone:
    index: int
    worker: str
    classified: int = 0
    skipped: int = 0
    provider: str = ""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    error: tuple[str, str, str | None] | None = None  # (error class, message, hint): raised by the client


class _Collect(Events):
    """The worker's events: warnings are kept and reported by the client, the rest dropped."""

    def __init__(self) -> None:
        super().__init__(stream=None, progress_bars=False)
        self.warnings: list[str] = []

    def warning(self, message: str) -> None:
        self.warnings.append(message)

    def log(self, message: str, level: str = "info") -> None:
        if level == "warning":
            self.warnings.append(message)


class ShardSink:
    """Collects a shard's classified tiles (a few numbers per tile) and saves them atomically."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, rows: np.ndarray, cols: np.ndarray, summary: Summary, valid: np.ndarray) -> None:
        self.parts.append({"rows": np.asarray(rows, np.int64), "cols": np.asarray(cols, np.int64),
                           "valid": np.asarray(valid),
                           **{f.name: getattr(summary, f.name) for f in dataclasses.fields(Summary)}})

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.parts:  # every tile skipped: empty arrays of the right types
            self.add(np.zeros(0, np.int64), np.zeros(0, np.int64), summarize(np.zeros((0, self.num_classes))),
                     np.zeros(0, np.float32))
        return {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}

    def save(self, path: Path, counts: Counts) -> bool:
        """Write the shard file atomically (a hidden temporary name, then a rename), unless
        its folder is gone: the client has given the job up (failed or cancelled) and the
        folder must not appear again, so unlike fileio's writers this never creates it."""
        buf = io.BytesIO()
        arrays = {**self.arrays(), "classified": np.asarray(counts.classified, np.int64),
                  "skipped": np.asarray(counts.skipped, np.int64)}
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub checks **arrays against allow_pickle
        tmp = temp_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        return True


_MODELS: dict[tuple, OnnxClassifier] = {}  # one loaded model per worker process, reused by its shards
_RASTERS_OK: set[str] = set()  # rasters this worker process has opened (checked once, not per shard)


def _model(task: ShardTask) -> OnnxClassifier:
    st = os.stat(task.model) if "://" not in task.model and not task.model.startswith("/vsi") else None
    key = (task.model, st and st.st_mtime_ns, st and st.st_size, task.opts.device, task.threads,
           task.opts.streams, task.opts.spinning, task.feed)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = OnnxClassifier(task.model, device=task.opts.device, threads=task.threads,
                                      spinning=task.opts.spinning, input_dtype=task.feed, streams=task.opts.streams)
    return _MODELS[key]


def _worker_name() -> str:
    try:
        from distributed import get_worker
        return f"{get_worker().address} ({socket.gethostname()})"
    except (ImportError, ValueError):  # called outside a worker (tests)
        return f"process {os.getpid()} ({socket.gethostname()})"


def _open_on_worker(task: ShardTask, worker: str) -> OnnxClassifier:
    """The model, and a check that the raster opens here: errors name this worker and the path."""
    try:
        model = _model(task)
    except (errors.ModelFileError, OSError) as exc:
        raise errors.ModelFileError(f"worker {worker} cannot load the model {task.model}: {exc}",
                                    f"{_SEEN_BY_WORKERS}, with the same engine installed") from exc
    except AsymKDError as exc:  # e.g. --device cuda on a worker without the CUDA provider
        raise type(exc)(f"worker {worker}: {exc.message}", exc.hint) from exc
    if task.raster in _RASTERS_OK:
        return model
    try:
        with open_raster(Path(task.raster)):
            _RASTERS_OK.add(task.raster)
    except AsymKDError as exc:
        raise DataError(f"worker {worker} cannot open the raster {task.raster}: {getattr(exc, 'message', exc)}",
                        _SEEN_BY_WORKERS) from exc
    return model


def classify_shard(task: ShardTask) -> ShardDone:
    """The Dask task: classify one shard into its shard file. Pure: the same task always
    writes the same file, so running it twice (after a worker died) changes nothing."""
    from rasterio.errors import RasterioError
    worker = _worker_name()
    done = ShardDone(task.shard.index, worker)
    events = _Collect()
    try:
        model = _open_on_worker(task, worker)
        for note in model.notes:
            events.warning(note)
        sink = ShardSink(len(model.class_names))
        counts = classify_plan(model, Path(task.raster), task.shard.plan(task.grid), list(task.bands), task.opts,
                               sink, None, events)
    except AsymKDError as exc:  # user errors are reported, not retried: they would fail again
        done.error = (type(exc).__name__, exc.message, exc.hint)
        return done
    except (RasterioError, OSError) as exc:
        done.error = ("DataError", f"worker {worker} failed reading {task.shard.describe()} of {task.raster}: "
                      f"{exc}", _SEEN_BY_WORKERS)
        return done
    try:
        sink.save(Path(task.path), counts)
    except OSError as exc:
        done.error = ("StorageError", f"worker {worker} cannot write the shard file {task.path}: {exc}",
                      "the output's folder must be on a file system that every worker can write to")
        return done
    done.classified, done.skipped, done.provider = counts.classified, counts.skipped, model.provider
    done.timings, done.warnings = counts.timings(), events.warnings
    return done


# -- the client's side -----------------------------------------------------------------
def load_shard(path: Path) -> tuple[np.ndarray, np.ndarray, Summary, np.ndarray]:
    with np.load(path) as z:
        summary = Summary(**{f.name: z[f.name] for f in dataclasses.fields(Summary)})
        return z["rows"], z["cols"], summary, z["valid"]


def _raise(error: tuple[str, str, str | None]) -> None:
    kind, message, hint = error
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, AsymKDError)):
        cls = DataError
    raise cls(message, hint)


def local_threads(opts: ClassifyOptions) -> int:
    """Inference threads per local worker: the machine's cores shared between the workers
    (each worker's own default would be every core, N times over)."""
    if opts.threads or opts.workers is None:
        return opts.threads
    return max(1, available_cores() // opts.workers)


class DaskEngine:
    """Classify the job's tiles on a Dask cluster and merge the shards into the writer."""

    def __init__(self, job: Job, opts: ClassifyOptions, cluster: Cluster, folder: Path):
        self.job, self.opts, self.cluster, self.folder = job, opts, cluster, folder
        t0 = time.perf_counter()
        self.client = cluster.client()
        self.wait_s = time.perf_counter() - t0  # of the job for the cluster's start (the rest overlapped its planning)
        self.provider = "?"
        self.workers = len(self.client.scheduler_info().get("workers", {}))

    @classmethod
    @contextlib.contextmanager
    def start(cls, job: Job, opts: ClassifyOptions, cluster: Cluster, events: Events) -> Iterator[DaskEngine]:
        """A hidden shard folder beside the output and the cluster's client; on leaving, the
        cluster is closed first (a local one's workers end) and then the folder is removed."""
        scratch = job.out.with_name(job.out.name + ".shards")
        folders: list[Path] = []
        try:
            with staged_dir(scratch, commit=_keep_nothing) as folder:
                folders.append(folder)
                try:
                    engine = cls(job, opts, cluster, folder)
                    where = opts.scheduler or f"a local cluster of {opts.workers} worker process(es)"
                    events.log(f"classifying on {engine.workers} Dask worker(s) of {where}; shards in {folder}")
                    yield engine
                finally:
                    cluster.close()
        finally:
            for folder in folders:
                _remove_until_gone(folder)

    def tasks(self) -> list[ShardTask]:
        job = self.job
        threads = local_threads(self.opts)  # opts.threads as given with --scheduler
        size = shard_size(job.plan.total, self.workers, self.opts.shard_tiles)
        return [ShardTask(str(job.model_path), str(job.raster), job.grid, tuple(job.bands), job.feed.str, threads,
                          self.opts, shard, str(self.folder / f"shard-{shard.index:05d}.npz"))
                for shard in make_shards(job.plan, size)]

    def fill(self, writer: TileSink, raster_out: ClassRaster | None, events: Events) -> Counts:
        """Run the shard tasks; as each completes report progress, and merge every shard whose
        predecessors are merged (shard order, one file per shard)."""
        from distributed import as_completed
        tasks = self.tasks()
        run_id = uuid.uuid4().hex[:12]
        futures = self.client.map(classify_shard, tasks, key=[f"asymkd-shard-{run_id}-{t.shard.index:05d}"
                                                                for t in tasks])
        merger = _Merger(tasks, writer, raster_out, events, self.job.plan.total)
        try:
            for future in as_completed(futures, loop=self.client.loop):  # not the default client: none is set
                merger.completed(self._result(future, tasks))
                while merger.next < len(tasks) and merger.next in merger.done:
                    futures[merger.next].release()  # merged: Dask need not keep or redo it
                    merger.merge_next()
        finally:
            self.client.cancel([f for f in futures if not f.done()])
        self.cluster.close_soon()  # every shard is merged: the workers end while the outputs are finished
        self.provider = merger.provider()
        counts = merger.counts
        counts.extra.update(cluster_start_s=self.cluster.start_s, cluster_wait_s=self.wait_s, merge_s=merger.merge_s,
                            shards=float(len(tasks)), workers=float(self.workers))
        return counts

    @staticmethod
    def _result(future: Any, tasks: list[ShardTask]) -> ShardDone:
        from distributed import KilledWorker
        try:
            done = future.result()
        except KilledWorker as exc:
            index = int(str(future.key).rsplit("-", 1)[-1])
            raise DataError(f"{tasks[index].shard.describe()} ended every worker that ran it ({exc})",
                            "the workers probably ran out of memory: lower --batch-size, or give them "
                            "more memory") from exc
        if done.error is not None:
            _raise(done.error)
        return done


def _keep_nothing(stage: Path, final: Path) -> None:
    """The shard folder is scratch: staged_dir removes it after the job whatever happens."""


def _remove_until_gone(folder: Path, tries: int = 50) -> None:
    """A cancelled shard still running on a remote worker can put a file into the folder
    while it is being removed (the removal then fails); once it is gone, no worker can
    create it again (ShardSink.save)."""
    for _ in range(tries):
        if not folder.exists():
            return
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.05)


class _Merger:
    """Merges shard files in shard order into the writer, and reports progress."""

    def __init__(self, tasks: list[ShardTask], writer: TileSink, raster_out: ClassRaster | None, events: Events,
                 total: int):
        self.tasks, self.writer, self.raster_out, self.events, self.total = tasks, writer, raster_out, events, total
        self.done: dict[int, ShardDone] = {}
        self.next = 0
        self.counts = Counts()
        self.merge_s = 0.0
        self.started = time.time()
        self.warned: set[str] = set()

    def completed(self, done: ShardDone) -> None:
        self.done[done.index] = done
        c = self.counts
        c.classified += done.classified
        c.skipped += done.skipped
        c.done += done.classified + done.skipped
        c.add_timings(done.timings)  # summed over the workers: seconds of work, not of the clock
        for message in done.warnings:
            if message not in self.warned:
                self.warned.add(message)
                self.events.warning(f"{message} (worker {done.worker})")
        self.events.progress("classify", c.done, self.total, self.started, unit="tile", skipped=c.skipped,
                             classified=c.classified, provider=done.provider,
                             force=len(self.done) == len(self.tasks))

    def merge_next(self) -> None:
        t0 = time.perf_counter()
        path = Path(self.tasks[self.next].path)
        rows, cols, summary, valid = load_shard(path)
        deliver(self.writer, self.raster_out, rows, cols, summary, valid)
        path.unlink()  # merged: the disk holds only shards not merged yet
        self.next += 1
        self.merge_s += time.perf_counter() - t0

    def provider(self) -> str:
        names = sorted({d.provider for d in self.done.values() if d.provider})
        return "+".join(names) if names else "?"

