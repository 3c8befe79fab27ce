"""What `classify` takes (ClassifyOptions, every setting declared once) and returns
(ClassifyResult), with the bounds its checks use: the pieces every classify module shares.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .. import choices
from ..errors import ConfigError
from ..settings import BOTH, declaration, setting

if TYPE_CHECKING:
    from .stats import Uncertainty

__all__ = ["ClassifyOptions", "ClassifyResult"]

MAX_TILE = 4096
MAX_BATCH = 65_536
MAX_THREADS = 256
MAX_STREAMS = 8  # batches classified at once by default (each run's threads sync less)
MAX_BATCH_BYTES = 4 * 2**30  # one batch of tiles in memory (a few are in flight)
DEFAULT_UNCERTAIN_BY = "confidence"


@dataclasses.dataclass
class ClassifyOptions:
    bands: Sequence[int] | str | None = setting(
        None, metavar="1,2,3", help="raster bands feeding the model's bands, in the model's order "
        "(default: by band description, colour interpretation, or band order)")
    bbox: Sequence[float] | str | None = setting(
        None, metavar="minx,miny,maxx,maxy", group="area",
        help="classify only the tiles that meet this box (write --bbox=-1.5,... when minx is negative)")
    bbox_crs: str | None = setting(None, metavar="EPSG:xxxx", help="CRS of --bbox (default: the raster's)")
    mask: str | Path | None = setting(None, metavar="VECTOR", group="area",
                                      help="classify only tiles meeting these polygons")
    mask_layer: str | None = setting(None, help="layer of --mask (default: the first)")
    tile: int | None = setting(None, range=(1, MAX_TILE, "pixels; default the model's patch size"),
                               help="tile size in pixels at the model's resolution (default: the model's patch size)")
    stride: int | None = setting(None, range=(1, MAX_TILE, "pixels; default the tile size"),
                                 help="tile step in pixels (default: the tile size)")
    xyz_zoom: int | None = setting(None, metavar="Z", help="use the XYZ web-map tiles of zoom Z (keys z/x/y)")
    batch_size: int = setting(64, range=(1, MAX_BATCH, ""), help="tiles per inference batch (default {default})")
    class_raster: str | Path | None = setting(None, metavar="OUT.tif",
                                              help="also write a class raster (one pixel per tile step)")
    overwrite: bool = setting(False, help="replace existing outputs")
    device: str = setting("auto", choices=choices.ONNX_DEVICES, help="onnxruntime device")
    min_valid: float = setting(0.5, range=(0.0, 1.0, "a fraction"),
                               help="skip tiles with a smaller fraction of valid pixels (default {default})")
    # bounded: onnxruntime would try to start them all (10^5 threads take tens of GB)
    threads: int = setting(0, range=(0, MAX_THREADS, "0 = every core"),
                           help="CPU threads for inference in all (default {default}: every core this process "
                                "may use)")
    streams: int = setting(0, range=(0, MAX_THREADS, "0 = one per thread on the CPU, one on a GPU"),
                           help="batches classified at once, sharing the threads (default {default}: on the CPU "
                                f"one per thread, at most {MAX_STREAMS}; on a GPU one)")
    # Idle onnxruntime threads busy-wait: with the reader and writer this light, faster end to
    # end on CPU (bench classify: 632-663 vs 610 tiles/s on 2 cores).
    spinning: bool = setting(True, flag=BOTH, help="let idle onnxruntime threads busy-wait between operators "
                             "(default: on; faster on a machine given to the job, --no-spinning on one shared "
                             "with other work)")
    # Low enough that they do not preempt inference, not so low that they starve. At 19 (a
    # 1.5 % share beside two busy inference threads) the main thread waited 3.2-3.8 s of a 38 s
    # run for the reader in 4 of 6 runs on a loaded 2-core machine; at 10 and 0, 0.1 s in 4 of
    # 4 (reader CPU 0.6 s).
    io_nice: int = setting(10, flag=False, help="nice of the reader/writer threads (0 = normal priority)")
    prefetch: int = setting(4, flag=False, help="batches read ahead")
    max_strip_tiles: int = setting(256, flag=False, help="tiles per window read")
    chunk: int = setting(4096, flag=False, help="features per GeoPackage write (in the background)")
    workers: int | None = setting(None, metavar="N", range=(1, MAX_THREADS, "worker processes"),
                                  help="classify on a local Dask cluster of N worker processes "
                                       "(needs dask[distributed])")
    scheduler: str | None = setting(None, metavar="ADDRESS",
                                    help="classify on the workers of a running dask-scheduler, e.g. "
                                         "tcp://10.0.0.5:8786; they must see the raster and the model at the "
                                         "same paths")
    shard_tiles: int = setting(0, metavar="N", help="tiles per shard (one Dask task) with --workers/--scheduler "
                               "(default 0: about 4 shards per worker, 2,048 to 65,536 tiles each)")
    connect_timeout: float = setting(5.0, flag=False, help="seconds to reach --scheduler before giving up")
    uncertain_below: float | None = setting(None, metavar="T", help="mark tiles whose certainty is below T (0..1) "
                                            "as uncertain=1 (default: none)")
    # None: DEFAULT_UNCERTAIN_BY, which needs uncertain_below (check)
    uncertain_by: str | None = setting(None, choices=choices.UNCERTAINTY_MEASURES,
                                       help="certainty measure, with --uncertain-below "
                                            f"(default {DEFAULT_UNCERTAIN_BY})")
    regions: bool = setting(False, help="also write the layer `regions`: neighbouring tiles of a class dissolved "
                            "into polygons (holes kept) with their tiles and hectares")
    min_region_ha: float = setting(0.0, metavar="HA", help="with --regions, drop regions smaller than HA hectares "
                                   "(default {default})")
    vote: bool = setting(False, help="with --stride smaller than --tile (and dividing it): output stride-sized "
                         "cells, each the mean probability of the windows over it; costs (tile/stride)^2 times "
                         "the inference")
    yes: bool = setting(False, help="start a job beyond the limits (more than 10 million tiles, outputs larger "
                        "than the free disk or a class raster larger than the free memory); the estimate is "
                        "always logged")
    scale: float = setting(1.0, metavar="FACTOR", help="multiply the pixels by FACTOR before the model, for a "
                           "raster in other units than the training data (e.g. 255 for reflectance 0..1 given to "
                           "a model trained on 8-bit images)")

    def check(self) -> None:
        """Refuse absurd options before anything is read (a tile of 0 is not the default,
        a tile of 10^6 px must not try to allocate terabytes)."""
        self.uncertainty().check()
        if self.uncertain_by is not None and self.uncertain_below is None:
            raise ConfigError(f"--uncertain-by {self.uncertain_by} does nothing without --uncertain-below",
                              f"add a threshold, e.g. --uncertain-below 0.6 --uncertain-by {self.uncertain_by}, "
                              "or drop --uncertain-by")
        self._check_ranges()
        if self.xyz_zoom is not None and (self.stride is not None):
            raise ConfigError("--stride does not apply to the XYZ grid", "drop --stride, or drop --xyz-zoom")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"--scale {self.scale} must be a positive number",
                              "e.g. --scale 255 for reflectance 0..1 fed to a model trained on 8-bit images")
        if self.prefetch < 1:
            raise ConfigError(f"prefetch {self.prefetch} must be at least 1", "e.g. prefetch=4")
        self._check_cluster()
        self._check_outputs()

    def _check_ranges(self) -> None:
        """Each option within the range it declares (None: left out, the default)."""
        for f in dataclasses.fields(self):
            bounds, value = declaration(ClassifyOptions, f.name).range, getattr(self, f.name)
            if bounds is None or value is None:
                continue
            low, high, note = bounds
            if not low <= value <= high:
                flag = "--" + f.name.replace("_", "-")
                leave = f", or leave {flag} out" if f.default is None else ""
                raise ConfigError(f"{flag} {value} is out of range",
                                  f"use {low}..{high}{f' ({note})' if note else ''}{leave}")

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
