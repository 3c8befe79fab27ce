"""The classify job: model, raster, grid, area, then the read -> infer -> write loop, in this
process or, with --workers/--scheduler, on the workers of a Dask cluster (distributed.py)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

import numpy as np

from ..errors import DataError
from ..events import Events
from ..models.metadata import ModelMeta
from ..models.onnx_file import read_onnx_metadata, resolve_model_path
from ..palette import class_colors
from . import ClassifyOptions, ClassifyResult, budget, scaling
from .area import TilePlan, plan_tiles, resolve_area
from .grid import Grid, pixel_grid, xyz_grid
from .infer import CASTABLE, OnnxClassifier, Summary, summarize
from .reader import Batch, PrefetchReader, resolve_bands
from .regions import RegionStats, write_regions
from .stats import area_csv_text, areas_csv_path
from .style import qml_text
from .vote import Cells, Voter, cell_grid
from .writer import LAYER, AtomicOutputs, ClassRaster, TileLayerWriter, check_not_inputs, check_output_names

if TYPE_CHECKING:
    from .cluster import Cluster


def _open_raster(path: Path):
    import rasterio
    from rasterio.errors import RasterioIOError
    if not path.exists() and "://" not in str(path) and not str(path).startswith("/vsi"):
        raise DataError(f"raster {path} does not exist", "give a GeoTIFF, VRT or any raster GDAL opens")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        raise DataError(f"cannot open raster {path}: {exc}", "give a GeoTIFF, VRT or any raster GDAL opens") from exc


def _grid(src, meta: ModelMeta, opts: ClassifyOptions, events: Events) -> Grid:
    patch = meta.patch_size
    tile = int(patch if opts.tile is None else opts.tile)
    opts.check_memory(tile, meta.in_chans)
    if tile != patch:
        events.warning(f"tile size {tile} px differs from the model's patch size {patch} px; "
                       "the model sees a different ground extent than it was trained on")
    gsd = meta.gsd
    if opts.xyz_zoom is not None:
        return xyz_grid(src, int(opts.xyz_zoom), tile, gsd)
    return pixel_grid(src, gsd, tile, int(tile if opts.stride is None else opts.stride))


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


def prepare(model_path: Path, raster: Path, out: Path, opts: ClassifyOptions, events: Events) -> Job:
    """Check the outputs, read the model's metadata and the raster's header, and plan the tiles."""
    class_raster = Path(opts.class_raster) if opts.class_raster else None
    check_output_names(out, class_raster)
    check_not_inputs([out, out.with_suffix(".qml"), areas_csv_path(out), class_raster],
                     [model_path, resolve_model_path(model_path), raster, opts.mask])
    meta = read_onnx_metadata(model_path)
    with _open_raster(raster) as src:
        bands, how = resolve_bands(src, meta.band_names, opts.bands)
        grid = _grid(src, meta, opts, events)
        area = resolve_area(src, grid, opts.bbox, opts.bbox_crs, opts.mask, opts.mask_layer, warn=events.warning)
        small = src.width < grid.tile or src.height < grid.tile
        size = f"{src.width}x{src.height}"
        band_dtypes = [src.dtypes[b - 1] for b in bands]
    dtypes = {np.dtype(d) for d in band_dtypes}
    feed = (dtypes.pop() if len(dtypes) == 1 and dtypes <= CASTABLE.keys() and opts.scale == 1
            else np.dtype(np.float32))  # scaled pixels are fed as float32
    notes = list(grid.notes)
    if how != "given":
        notes.append(f"raster bands {bands} feed the model's {', '.join(meta.band_names)} (from {how})")
    if small and grid.kind == "pixel":
        notes.append(f"the raster ({size} px) is smaller than one {grid.tile}-px tile: it is classified as one "
                     f"padded tile if at least {opts.min_valid:.0%} of it is valid (--min-valid)")
    out_grid = cell_grid(grid) if opts.vote else grid  # ConfigError now unless the stride divides the tile
    plan = plan_tiles(grid, area)
    _check_budget(plan, out_grid, out, class_raster, meta.num_classes, opts, events)
    with _open_raster(raster) as src:
        values = scaling.sample(src, bands)
    scaling.check(values, meta, bands, band_dtypes, opts.scale, events.warning)
    return Job(model_path, raster, out, meta, bands, grid, plan, feed, notes, small, out_grid)


def _check_budget(plan: TilePlan, out_grid: Grid, out: Path, class_raster: Path | None, classes: int,
                  opts: ClassifyOptions, events: Events) -> None:
    """Log what the job will cost, and refuse one beyond the limits unless --yes (budget.py)."""
    cells = out_grid.total if class_raster or opts.regions else 0
    cell_bytes = 1 if classes < 255 else 2  # ClassRaster's dtype
    # with --vote the layer holds cells, about as many as the windows over them
    est = budget.estimate(plan.total, plan.total, cells, cell_bytes, opts.regions)
    events.log(f"estimate: {est.text()}")
    need = {out.parent.absolute(): est.gpkg_bytes}
    if class_raster is not None:
        folder = class_raster.parent.absolute()
        need[folder] = need.get(folder, 0) + est.raster_bytes
    budget.check(est, need, opts.yes)


def load_model(job: Job, opts: ClassifyOptions) -> OnnxClassifier:
    return OnnxClassifier(job.model_path, device=opts.device, threads=opts.threads, spinning=opts.spinning,
                          input_dtype=job.feed, streams=opts.streams)


class Engine(Protocol):
    """Who classifies the planned tiles: this process, or the workers of a Dask cluster."""

    provider: str

    def fill(self, writer: TileSink, raster_out: ClassRaster | None, events: Events) -> Counts: ...


class LocalEngine:
    """Classify in this process: prefetching reader -> onnxruntime -> writer."""

    def __init__(self, job: Job, opts: ClassifyOptions):
        self.job, self.opts = job, opts
        self.model = load_model(job, opts)
        self.provider = self.model.provider

    def fill(self, writer: TileSink, raster_out: ClassRaster | None, events: Events) -> Counts:
        return classify_plan(self.model, self.job.raster, self.job.plan, self.job.bands, self.opts, writer,
                             raster_out, events)


def run_classify(model_path: Path, raster: Path, out: Path, opts: ClassifyOptions, events: Events,
                 cluster: Cluster | None) -> ClassifyResult:
    """The job: in this process (`cluster` None), or on the cluster `cluster.starting` gave."""
    t_setup = time.perf_counter()
    class_raster = Path(opts.class_raster) if opts.class_raster else None
    job = prepare(model_path, raster, out, opts, events)
    for note in job.notes:
        events.log(note)
    with _engine(job, opts, cluster, events) as engine:
        qml = out.with_suffix(".qml")
        finals = [out, qml, areas_csv_path(out)] + ([class_raster] if class_raster else [])
        with AtomicOutputs(finals, overwrite=opts.overwrite) as outputs:
            try:
                result = _loop(job, engine, opts, outputs, out, qml, class_raster, events,
                               time.perf_counter() - t_setup)
            except BaseException:
                removed = outputs.discard()
                events.log(f"classification stopped: no output was written to {out}"
                           + (f" (removed {len(removed)} partial file(s))" if removed else ""), level="warning")
                raise
            outputs.commit()
    result.notes = job.notes + result.notes
    _report(result, job, out, qml, class_raster, events)
    return result


@contextlib.contextmanager
def _engine(job: Job, opts: ClassifyOptions, cluster: Cluster | None, events: Events) -> Iterator[Engine]:
    if cluster is None:
        local = LocalEngine(job, opts)
        for note in local.model.notes:
            events.warning(note)
        yield local
        return
    from .distributed import DaskEngine  # dask is optional: imported only when asked for
    with DaskEngine.start(job, opts, cluster, events) as engine:
        yield engine


def _report(result: ClassifyResult, job: Job, out: Path, qml: Path, class_raster: Path | None,
            events: Events) -> None:
    if result.tiles_classified == 0:
        why = ("the raster is smaller than one tile and too little of it is valid; lower --min-valid"
               if job.small else "every tile is nodata or has fewer valid pixels than --min-valid")
        events.warning(f"no tile was classified ({result.tiles_skipped} skipped): {why}; the layer is empty")
    events.log(f"classified {result.tiles_classified} tiles ({result.tiles_skipped} skipped) in "
               f"{result.seconds:.1f} s, {result.tiles_per_s:.0f} tiles/s on {result.provider}: {out}")
    events.metrics("classify", {k: v for k, v in result.as_dict().items()
                                if k in ("tiles_total", "tiles_classified", "tiles_skipped", "seconds",
                                         "tiles_per_s", "provider", "timings")})
    paths = {"gpkg": out, "qml": qml, "areas_csv": areas_csv_path(out)}
    if class_raster:
        paths["class_raster"] = class_raster
    # the area table rides on the result event, for the plugin to show
    events.emit("result", step="classify", paths={k: str(v) for k, v in paths.items()},
                class_areas=result.class_areas)


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


def _loop(job: Job, engine: Engine, opts: ClassifyOptions, outputs: AtomicOutputs, out: Path, qml: Path,
          class_raster: Path | None, events: Events, setup_s: float) -> ClassifyResult:
    meta, grid = job.meta, job.out_grid
    names, colors = list(meta.class_names), class_colors(meta.class_names, meta.class_colors)
    style = qml_text(names, colors)
    raster_out = ClassRaster(grid, names) if class_raster or opts.regions else None  # regions dissolve its grid
    writer: TileLayerWriter | None = None
    t0 = time.perf_counter()
    try:  # the writer starts its thread at once: made inside, so a cancel right after still ends it
        writer = TileLayerWriter(outputs.temp(out), grid, names, chunk=opts.chunk, style_qml=style,
                                 nice=opts.io_nice, uncertainty=opts.uncertainty())
        counts = engine.fill(writer, raster_out, events)
        loop_s = time.perf_counter() - t0
        tw = time.perf_counter()
        writer.close()
        areas = writer.areas.table()
        outputs.temp(areas_csv_path(out)).write_text(area_csv_text(areas), encoding="utf-8")
        regions = _regions(outputs.temp(out), raster_out, grid, names, style, opts, events) if opts.regions else None
        outputs.temp(qml).write_text(style, encoding="utf-8")
        if raster_out is not None and class_raster is not None:
            raster_out.write(outputs.temp(class_raster), colors)
        write_s = time.perf_counter() - tw
    except BaseException:
        if writer is not None:
            writer.abort()  # the write thread must end before the temporary file is removed
        raise
    seconds = setup_s + time.perf_counter() - t0
    timings = {"setup_s": setup_s, "loop_s": loop_s, **counts.timings(), "final_write_s": write_s,
               "gpkg_write_bg_s": writer.write_s, **({"regions_s": regions.seconds} if regions else {})}
    return ClassifyResult(gpkg=out, qml=qml, class_raster=class_raster, layer=LAYER, provider=engine.provider,
                          tiles_total=counts.classified + counts.skipped if opts.vote else job.plan.total,
                          tiles_classified=counts.classified,
                          tiles_skipped=counts.skipped, seconds=seconds,
                          tiles_per_s=(counts.classified / seconds if seconds > 0 else 0.0),
                          crs=grid.crs.to_string(), grid=_describe(grid), bands=list(job.bands),
                          timings={k: round(v, 4) for k, v in timings.items()},
                          class_areas=areas, areas_csv=areas_csv_path(out),
                          notes=regions.notes if regions else [], regions=regions.regions if regions else None)


def _regions(path: Path, classes: ClassRaster | None, grid: Grid, names: list[str], style: str,
             opts: ClassifyOptions, events: Events) -> RegionStats:
    """The regions layer, before the outputs are published (a failure leaves nothing). With no
    classified tile, or every region under --min-region-ha, the layer is empty and a warning
    says why: the tile layer is still a valid result."""
    assert classes is not None
    stats = write_regions(path, classes.array, classes.nodata, grid, names, style, opts.min_region_ha)
    if stats.regions == 0:
        why = (f"all {stats.dropped} regions are smaller than --min-region-ha {opts.min_region_ha:g}"
               if stats.dropped else "no tile was classified")
        stats.notes.append(f"the regions layer is empty: {why}")
        events.warning(stats.notes[-1])
    events.log(f"merged the tiles into {stats.regions} regions" + (
        f" ({stats.dropped} smaller than {opts.min_region_ha:g} ha dropped)" if stats.dropped else "")
        + f" in {stats.seconds:.1f} s")
    return stats


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


def _describe(grid: Grid) -> str:
    if grid.kind == "xyz":
        return f"xyz z={grid.zoom} x={grid.x0}..{grid.x0 + grid.cols - 1} y={grid.y0}..{grid.y0 + grid.rows - 1}"
    return f"pixel tile={grid.tile} stride={grid.stride} res={grid.pixel_size:g} rows={grid.rows} cols={grid.cols}"

