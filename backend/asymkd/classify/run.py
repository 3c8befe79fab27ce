"""The classify job: model, raster, grid, area, then the read -> infer -> write loop, in this
process or, with --workers/--scheduler, on the workers of a Dask cluster (distributed.py)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

import numpy as np

from ..events import Events
from ..models.metadata import ModelMeta
from ..models.onnx_file import read_onnx_metadata, resolve_model_path
from ..palette import class_colors
from . import budget, scaling
from .area import TilePlan, plan_tiles, resolve_area
from .grid import Grid, pixel_grid, xyz_grid
from .infer import CASTABLE, OnnxClassifier
from .options import ClassifyOptions, ClassifyResult
from .reader import resolve_bands
from .regions import RegionStats, write_regions
from .stats import area_csv_text, areas_csv_path
from .stream import Counts, Job, TileSink, classify_plan, open_raster
from .style import qml_text
from .vote import cell_grid
from .writer import LAYER, AtomicOutputs, ClassRaster, TileLayerWriter, check_not_inputs, check_output_names

if TYPE_CHECKING:
    from .cluster import Cluster


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


def prepare(model_path: Path, raster: Path, out: Path, opts: ClassifyOptions, events: Events) -> Job:
    """Check the outputs, read the model's metadata and the raster's header, and plan the tiles."""
    class_raster = Path(opts.class_raster) if opts.class_raster else None
    check_output_names(out, class_raster)
    check_not_inputs([out, out.with_suffix(".qml"), areas_csv_path(out), class_raster],
                     [model_path, resolve_model_path(model_path), raster, opts.mask])
    meta = read_onnx_metadata(model_path)
    with open_raster(raster) as src:
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
    with open_raster(raster) as src:
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


def _describe(grid: Grid) -> str:
    if grid.kind == "xyz":
        return f"xyz z={grid.zoom} x={grid.x0}..{grid.x0 + grid.cols - 1} y={grid.y0}..{grid.y0 + grid.rows - 1}"
    return f"pixel tile={grid.tile} stride={grid.stride} res={grid.pixel_size:g} rows={grid.rows} cols={grid.cols}"

