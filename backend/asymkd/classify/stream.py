"""The one read -> infer -> write loop of classification, and what it is given: a job as
decided before any tile is read (`Job`), the tiles of a plan read, classified and handed
to a sink (`classify_plan`), with counts and timings. One process (run.py) and each
worker of a cluster (distributed.py) run it alike.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from ..errors import DataError
from ..events import Events
from ..models.metadata import ModelMeta
from .area import TilePlan
from .grid import Grid
from .infer import OnnxClassifier, Summary, summarize
from .options import ClassifyOptions
from .reader import Batch, PrefetchReader
from .vote import Cells, Voter
from .writer import ClassRaster


def open_raster(path: Path):
    import rasterio
    from rasterio.errors import RasterioIOError
    if not path.exists() and "://" not in str(path) and not str(path).startswith("/vsi"):
        raise DataError(f"raster {path} does not exist", "give a GeoTIFF, VRT or any raster GDAL opens")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        raise DataError(f"cannot open raster {path}: {exc}", "give a GeoTIFF, VRT or any raster GDAL opens") from exc


@dataclasses.dataclass
class Job:
    """A classify job as decided before any tile is read; the same for one process and for a
    cluster of workers (each worker classifies a shard of `plan`)."""

    model_path: Path
    raster: Path
    out: Path
    meta: ModelMeta
    bands: list[int]
    grid: Grid           # the windows the model sees
    plan: TilePlan
    feed: np.dtype       # the dtype tiles are fed to the model in
    notes: list[str]
    small: bool          # the raster is smaller than one tile
    out_grid: Grid       # the features written: the windows, or with --vote the cells under them


@dataclasses.dataclass
class Counts:
    done: int = 0
    classified: int = 0
    skipped: int = 0
    wait_s: float = 0.0    # main thread waiting for the reader (the reader is the bottleneck)
    infer_s: float = 0.0
    post_s: float = 0.0
    read_s: float = 0.0    # the reader thread's time in rasterio, cutting tiles, and blocked
    cut_s: float = 0.0
    blocked_s: float = 0.0
    extra: dict[str, float] = dataclasses.field(default_factory=dict)  # an engine's own timings

    def timings(self) -> dict[str, float]:
        return {name: getattr(self, field) for name, field in TIMING_FIELDS.items()} | self.extra

    def add_timings(self, timings: dict[str, float]) -> None:
        """Add another run's `timings()` (a cluster sums its workers': seconds of work)."""
        for name, field in TIMING_FIELDS.items():
            setattr(self, field, getattr(self, field) + timings.get(name, 0.0))


# The names `Counts.timings()` reports, and the fields they come from.
TIMING_FIELDS = {"infer_s": "infer_s", "wait_for_reader_s": "wait_s", "postprocess_s": "post_s",
                 "reader_read_s": "read_s", "reader_cut_s": "cut_s", "reader_blocked_s": "blocked_s"}


class TileSink(Protocol):
    """Where classified tiles go: the GeoPackage writer, or a worker's shard file."""

    def add(self, rows: np.ndarray, cols: np.ndarray, summary: Summary, valid: np.ndarray) -> None: ...


# Batches waiting in the inference pool beyond the `streams` running: a stream that finishes
# takes the next batch at once instead of idling while the main thread hands its result on.
QUEUED = 1


def classify_plan(model: OnnxClassifier, raster: Path, plan: TilePlan, bands: list[int], opts: ClassifyOptions,
                  sink: TileSink, raster_out: ClassRaster | None, events: Events) -> Counts:
    """Classify the tiles of `plan` (the whole job's, or a worker's shard of it) into `sink`:
    the one read -> infer -> write loop of the engine."""
    reader = PrefetchReader(raster, plan, bands, fill=model.meta.mean, batch_size=opts.batch_size,
                            min_valid=opts.min_valid, prefetch=opts.prefetch, max_strip_tiles=opts.max_strip_tiles,
                            nice=opts.io_nice, dtype=model.input_dtype, in_flight=model.streams + QUEUED,
                            scale=opts.scale)
    voter = Voter(plan, len(model.class_names)) if opts.vote else None
    counts = _stream(model, reader, sink, raster_out, plan.total, events, voter)
    if voter is not None:  # the last rows of cells; the counts are of cells, not windows
        _deliver_probs(sink, raster_out, voter.finish())
        counts.classified, counts.skipped = voter.classified, voter.skipped
    st = reader.stats
    counts.read_s, counts.cut_s, counts.blocked_s = st.read_s, st.cut_s, st.put_wait_s
    return counts


def _stream(model: OnnxClassifier, reader: PrefetchReader, writer: TileSink, raster_out: ClassRaster | None,
            total: int, events: Events, voter: Voter | None = None) -> Counts:
    """Read -> infer -> summarise -> hand to the writer, batch by batch, with progress (of
    windows, when voting). `model.streams` batches are classified at once, each in its own
    thread; their results are handed on in reading order, so the layer does not depend on it."""
    c = Counts()
    started = time.time()  # the event layer draws the one terminal progress bar
    pending: collections.deque[tuple[Batch, Future[np.ndarray]]] = collections.deque()

    def progress(force: bool = False) -> None:
        events.progress("classify", c.done, total, started, unit="tile", force=force, skipped=c.skipped,
                        classified=c.classified, provider=model.provider)

    def hand_on() -> None:
        batch, future = pending.popleft()
        ti = time.perf_counter()
        probs = future.result()
        tp = time.perf_counter()
        c.infer_s += tp - ti
        parts = [(batch.rows, batch.cols, probs, batch.valid)]
        _deliver_probs(writer, raster_out, voter.add(*parts[0]) if voter is not None else parts)
        c.post_s += time.perf_counter() - tp
        c.classified += len(batch.rows)
        c.done += len(batch.rows)
        progress()

    # the pool ends (its runs finished) before the reader closes and reuses their batches
    try:
        with ThreadPoolExecutor(model.streams, thread_name_prefix="asymkd-infer") as pool:
            for batch in _timed(reader, c):
                c.skipped += batch.skipped
                c.done += batch.skipped
                if not len(batch.rows):  # tiles skipped in an empty area
                    progress()
                    continue
                pending.append((batch, pool.submit(model.predict, batch.images)))
                if len(pending) == reader.in_flight:  # the batches the reader lets us hold
                    hand_on()
            while pending:
                hand_on()
    finally:
        reader.close()
    progress(force=True)
    return c


def _timed(reader: PrefetchReader, c: Counts) -> Iterator[Batch]:
    """The reader's batches, with the time spent waiting for them in `c.wait_s`."""
    batches = iter(reader)
    while True:
        tw = time.perf_counter()
        batch = next(batches, None)
        c.wait_s += time.perf_counter() - tw
        if batch is None:
            return
        yield batch


def deliver(writer: TileSink, raster_out: ClassRaster | None, rows: np.ndarray, cols: np.ndarray, summary: Summary,
            valid: np.ndarray) -> None:
    """Hand classified tiles to the writer and the class raster: the one place tiles go, from
    this process's loop or from a cluster's shards."""
    writer.add(rows, cols, summary, valid)
    if raster_out is not None:
        raster_out.add(rows, cols, summary.class_id)


def _deliver_probs(writer: TileSink, raster_out: ClassRaster | None, parts: list[Cells]) -> None:
    for rows, cols, probs, valid in parts:
        deliver(writer, raster_out, rows, cols, summarize(probs), valid)
