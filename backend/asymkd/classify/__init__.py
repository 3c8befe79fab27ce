"""Classify the tiles of a raster with an exported model into a styled GeoPackage.

    from asymkd.classify import classify
    result = classify("student.onnx", "scene.tif", "tiles.gpkg", xyz_zoom=None, events=events)

One polygon per tile with class_id, class_name, confidence, second_id, second_name,
second_prob, entropy (normalised, 0..1), uncertain (0/1, by --uncertain-below and
--uncertain-by), tile_key ("row/col" or "z/x/y") and the key's integer parts,
valid_fraction, and empty review fields (writer.TILE_FIELDS); per-class tiles, hectares
and shares as the table `class_areas` and as `<stem>_areas.csv` beside it; a QML style
beside it and inside it; optionally a class raster. Reads are prefetched in a background
thread, inference is batched onnxruntime (on the CPU several batches at once, one per
thread: `streams`), memory stays bounded, and outputs appear only when the whole job has
succeeded.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ConfigError
from ..events import NULL_EVENTS, Events

if TYPE_CHECKING:
    from .stats import Uncertainty

__all__ = ["classify", "ClassifyOptions", "ClassifyResult"]

MAX_TILE = 4096
MAX_BATCH = 65_536
MAX_THREADS = 256
MAX_STREAMS = 8  # batches classified at once by default (each run's threads sync less)
MAX_BATCH_BYTES = 4 * 2**30  # one batch of tiles in memory (a few are in flight)
DEFAULT_UNCERTAIN_BY = "confidence"


@dataclasses.dataclass
class ClassifyOptions:
    bands: Sequence[int] | str | None = None      # 1-based raster bands for the model's bands
    bbox: Sequence[float] | str | None = None     # minx, miny, maxx, maxy
    bbox_crs: str | None = None                   # CRS of bbox (default: the raster's)
    mask: str | Path | None = None                # polygon vector file limiting the area
    mask_layer: str | None = None
    tile: int | None = None                       # pixels (default: the model's patch size)
    stride: int | None = None                     # pixels (default: tile)
    xyz_zoom: int | None = None                   # use the XYZ web-map grid at this zoom instead
    batch_size: int = 64
    class_raster: str | Path | None = None
    overwrite: bool = False
    device: str = "auto"
    min_valid: float = 0.5                        # skip tiles with fewer valid pixels than this
    threads: int = 0                              # CPU threads for inference in all (0 = every core)
    streams: int = 0                              # batches classified at once (0 = CPU: one per thread,
                                                  # at most MAX_STREAMS; GPU: 1)
    # idle onnxruntime threads busy-wait: with the reader and writer this light, faster
    # end to end on CPU (bench classify: 632-663 vs 610 tiles/s on 2 cores)
    spinning: bool = True
    # nice of the reader/writer threads (0 = normal priority): low enough that they do not
    # preempt inference, not so low that they starve. At 19 (a 1.5 % share beside two busy
    # inference threads) the main thread waited 3.2-3.8 s of a 38 s run for the reader in 4
    # of 6 runs on a loaded 2-core machine; at 10 and 0, 0.1 s in 4 of 4 (reader CPU 0.6 s).
    io_nice: int = 10
    prefetch: int = 4                             # batches read ahead
    max_strip_tiles: int = 256                    # tiles per window read
    chunk: int = 4096                             # features per GeoPackage write (in the background)
    workers: int | None = None                    # classify on a local Dask cluster of N worker processes
    scheduler: str | None = None                  # or on the workers of a running dask-scheduler (address)
    shard_tiles: int = 0                          # tiles per shard (whole tile rows) on a cluster
                                                  # (0 = auto: about 4 shards per worker)
    connect_timeout: float = 5.0                  # seconds to reach --scheduler before giving up
    uncertain_below: float | None = None          # mark tiles whose certainty is below this (0..1)
    uncertain_by: str | None = None               # certainty measure (choices.UNCERTAINTY_MEASURES;
                                                  # None: confidence); needs uncertain_below
    regions: bool = False                         # also dissolve tiles of a class into the `regions` layer
    min_region_ha: float = 0.0                    # drop regions smaller than this (hectares)
    vote: bool = False                            # stride-sized cells take the mean of the windows over them
    yes: bool = False                             # start a job beyond the limits of budget.py
    scale: float = 1.0                            # multiply the pixels by this before the model

    def check(self) -> None:
        """Refuse absurd options before anything is read (a tile of 0 is not the default,
        a tile of 10^6 px must not try to allocate terabytes)."""
        self.uncertainty().check()
        if self.uncertain_by is not None and self.uncertain_below is None:
            raise ConfigError(f"--uncertain-by {self.uncertain_by} does nothing without --uncertain-below",
                              f"add a threshold, e.g. --uncertain-below 0.6 --uncertain-by {self.uncertain_by}, "
                              "or drop --uncertain-by")
        for flag, value in (("--tile", self.tile), ("--stride", self.stride)):
            if value is not None and not 1 <= value <= MAX_TILE:
                raise ConfigError(f"{flag} {value} is out of range", f"use 1..{MAX_TILE} pixels, or leave {flag} "
                                  "out for the default (the model's patch size)")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ConfigError(f"batch size {self.batch_size} is out of range",
                              f"use 1..{MAX_BATCH}, e.g. --batch-size 64")
        if not 0.0 <= self.min_valid <= 1.0:
            raise ConfigError(f"--min-valid {self.min_valid} must be between 0 and 1", "e.g. --min-valid 0.5")
        if self.xyz_zoom is not None and (self.stride is not None):
            raise ConfigError("--stride does not apply to the XYZ grid", "drop --stride, or drop --xyz-zoom")
        if not 0 <= self.threads <= MAX_THREADS:
            # onnxruntime would try to start them all (10^5 threads take tens of GB)
            raise ConfigError(f"--threads {self.threads} is out of range",
                              f"use 0 (every core) up to {MAX_THREADS}")
        if not 0 <= self.streams <= MAX_THREADS:
            raise ConfigError(f"--streams {self.streams} is out of range",
                              f"use 0 (one per thread on the CPU, one on a GPU) up to {MAX_THREADS}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"--scale {self.scale} must be a positive number",
                              "e.g. --scale 255 for reflectance 0..1 fed to a model trained on 8-bit images")
        if self.prefetch < 1:
            raise ConfigError(f"prefetch {self.prefetch} must be at least 1", "e.g. prefetch=4")
        self._check_cluster()
        self._check_outputs()

    def _check_outputs(self) -> None:
        if not (math.isfinite(self.min_region_ha) and self.min_region_ha >= 0):
            raise ConfigError(f"--min-region-ha {self.min_region_ha} must be a number of hectares >= 0",
                              "e.g. --min-region-ha 0.5")
        if self.min_region_ha and not self.regions:
            raise ConfigError("--min-region-ha applies to merged regions only", "add --regions")
        if not self.vote:
            return
        if self.stride is None or (self.tile is not None and self.stride >= self.tile):
            raise ConfigError("--vote needs overlapping windows: a stride smaller than the tile",
                              "add e.g. --stride 32 for 64-px tiles (each cell then takes the mean of 4 windows)")
        if self.workers is not None or self.scheduler is not None:
            raise ConfigError("--vote runs in one process (a cell's windows may lie in two shards)",
                              "drop --workers/--scheduler, or drop --vote")

    def _check_cluster(self) -> None:
        if self.workers is not None and self.scheduler is not None:
            raise ConfigError("--workers and --scheduler were both given",
                              "give --workers N for a cluster on this machine, or --scheduler ADDRESS for the "
                              "workers of a running dask-scheduler, not both")
        if self.workers is not None and not 1 <= self.workers <= MAX_THREADS:
            raise ConfigError(f"--workers {self.workers} is out of range",
                              f"use 1..{MAX_THREADS} worker processes, or leave --workers out to classify in "
                              "this process")
        if self.scheduler is not None and not str(self.scheduler).strip():
            raise ConfigError("--scheduler is empty", "give the scheduler's address, e.g. tcp://10.0.0.5:8786")
        if self.shard_tiles < 0:
            raise ConfigError(f"--shard-tiles {self.shard_tiles} must be at least 1 (or 0: chosen per job)",
                              "e.g. --shard-tiles 4096, or leave it out")
        if self.shard_tiles and self.workers is None and self.scheduler is None:
            raise ConfigError("--shard-tiles applies to classification on a Dask cluster only",
                              "add --workers N or --scheduler ADDRESS, or drop --shard-tiles")
        if not self.connect_timeout > 0:
            raise ConfigError(f"connect timeout {self.connect_timeout} s must be positive", "e.g. 5")

    def uncertainty(self) -> Uncertainty:
        from .stats import Uncertainty
        return Uncertainty(self.uncertain_below, self.uncertain_by or DEFAULT_UNCERTAIN_BY)

    def check_memory(self, tile: int, bands: int) -> None:
        """Refuse a batch of tiles too large to hold in memory, once the tile size and the
        model's band count are known."""
        need = self.batch_size * tile * tile * bands * 4
        if need > MAX_BATCH_BYTES:
            raise ConfigError(f"one batch of {self.batch_size} tiles of {tile} x {tile} px x {bands} bands would "
                              f"take {need / 2**30:.1f} GiB of memory (at most {MAX_BATCH_BYTES / 2**30:.0f} GiB)",
                              "lower --batch-size or --tile")


@dataclasses.dataclass
class ClassifyResult:
    gpkg: Path
    qml: Path
    class_raster: Path | None
    layer: str
    provider: str
    tiles_total: int
    tiles_classified: int
    tiles_skipped: int
    seconds: float
    tiles_per_s: float
    crs: str
    grid: str
    bands: list[int]
    timings: dict[str, float]
    notes: list[str]
    class_areas: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # stats.AREA_COLUMNS per class
    areas_csv: Path | None = None
    regions: int | None = None                    # features of the regions layer (None: not asked for)

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def classify(model: str | Path, raster: str | Path, out: str | Path, *, events: Events = NULL_EVENTS,
             options: ClassifyOptions | None = None, **kwargs: Any) -> ClassifyResult:
    """Classify every tile of `raster` in the area with the ONNX `model` into `out` (.gpkg).

    Options are a `ClassifyOptions` or its fields as keyword arguments. Raises the
    engine's user errors (DataError, ConfigError, ModelFileError); on any error or cancel
    no output file is left behind.
    """
    opts = dataclasses.replace(options or ClassifyOptions(), **kwargs)
    opts.check()
    from .cluster import starting
    with starting(opts) as cluster:  # a local cluster's workers start while the engine is imported
        from .run import run_classify
        return run_classify(Path(model), Path(raster), Path(out), opts, events, cluster)
