"""What a classify job will cost, estimated before any tile is read: tiles, the size of its
outputs, the memory of the class raster, and the time at a conservative rate. The estimate is
always logged; a job beyond the limits is refused unless the user passes `--yes`, with the
estimate and how to make the job smaller (`--bbox`, `--mask`, a larger `--stride`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from pathlib import Path

from ..errors import ConfigError

# Tiles per second assumed for the time estimate: a conservative CPU rate. Small students
# classify about 600 tiles/s on 2 cores (bench classify); larger backbones, larger tiles and
# one core are slower, so a low rate keeps the estimate an upper bound rather than a promise.
CPU_TILES_PER_S = 50.0
MAX_TILES = 10_000_000        # beyond: about 2.3 days at CPU_TILES_PER_S, refused unless --yes
GPKG_BYTES_PER_TILE = 512     # a tile feature with its fields and spatial index entry (upper bound)
REGION_BYTES_PER_CELL = 8     # labelling the class raster into regions (int32 labels and a mask)


@dataclasses.dataclass
class Estimate:
    tiles: int                 # windows the model classifies
    features: int              # rows of the tile layer
    gpkg_bytes: int
    raster_cells: int          # cells of the class raster held in memory (0: none)
    memory_bytes: int          # memory of the class raster (and the regions' labels)
    raster_bytes: int          # the class raster on disk, uncompressed (an upper bound)
    seconds: float

    def text(self) -> str:
        parts = [f"{self.tiles:,} tiles", f"a tile layer of about {_size(self.gpkg_bytes)}"]
        if self.raster_cells:
            parts.append(f"a class raster of {self.raster_cells:,} cells ({_size(self.memory_bytes)} in memory)")
        parts.append(f"about {_duration(self.seconds)} at {CPU_TILES_PER_S:g} tiles/s (a conservative CPU rate)")
        return ", ".join(parts)


def estimate(tiles: int, features: int, raster_cells: int, cell_bytes: int, regions: bool) -> Estimate:
    memory = raster_cells * (cell_bytes + (REGION_BYTES_PER_CELL if regions else 0))
    return Estimate(tiles, features, features * GPKG_BYTES_PER_TILE, raster_cells, memory,
                    raster_cells * cell_bytes, tiles / CPU_TILES_PER_S)


def check(est: Estimate, outputs: dict[Path, int], yes: bool) -> None:
    """Refuse a job beyond the limits (unless `yes`); memory beyond this machine's is refused
    always. `outputs`: bytes each output folder needs."""
    total, available = memory_bytes()
    how = ("classify a part of the raster with --bbox or --mask, or use a larger --stride (or a lower "
           "--xyz-zoom)")
    if total is not None and est.memory_bytes > total:
        raise ConfigError(f"the class raster of this job needs {_size(est.memory_bytes)} of memory but this machine "
                          f"has {_size(total)} (estimate: {est.text()})",
                          f"{how}, or drop --class-raster/--regions")
    reasons = []
    if est.tiles > MAX_TILES:
        reasons.append(f"more than {MAX_TILES:,} tiles")
    if available is not None and est.memory_bytes > available:
        reasons.append(f"the class raster needs {_size(est.memory_bytes)} of memory, {_size(available)} is free")
    for folder, need in outputs.items():
        free = free_bytes(folder)
        if free is not None and need > free:
            reasons.append(f"its outputs in {folder} may take up to {_size(need)}, {_size(free)} is free there")
    if reasons and not yes:
        raise ConfigError(f"this job is too large to start unasked: {'; '.join(reasons)} (estimate: {est.text()})",
                          f"{how}; or pass --yes to start it anyway")


def memory_bytes() -> tuple[int | None, int | None]:
    """(physical memory, memory available now) in bytes; None where unknown."""
    total = available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.count(":") == 1}
        total, available = info.get("MemTotal"), info.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, available


def free_bytes(folder: Path) -> int | None:
    """Free space where `folder` is (or would be created)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
