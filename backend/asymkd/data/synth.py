"""A synthetic Sentinel-2-like world for the 10 EuroSAT classes (the embedded default data).

The land cover and how the sensors see it live in `landcover`; this module lays its patches
out as the folders and georeferenced scenes a user brings.

Outputs mirror ../shared/data/eurosat and ../shared/data/eurosat_map (see `make_world`).
Every random draw comes from a generator seeded by (seed, set, class, index), so a world is
byte-identical on rerun and a patch does not change when other counts change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Iterator

import numpy as np
from affine import Affine

from ..errors import ConfigError, DataError
from ..events import NULL_EVENTS, Events
from ..fileio import (
    atomic_write_text,
    check_raster,
    check_vector,
    remove_stale,
    replace_dir,
    staged_dir,
    write_gpkg_layer,
)
from .landcover import (
    BAND_NAMES,
    CLASSES,
    MS_PLACE,
    RGB_MAX_DN,
    RGB_PLACE,
    RGB_SENSORS,
    Place,
    RgbSensor,
    render_patch,
    sensor_rgb,
)

CRS = "EPSG:32632"
GSD = 10.0
SCENE_ORIGIN = (500000.0, 5200000.0)
MARKER = "world.json"
MAX_PER_CLASS = 100_000
MAX_WORLD_BYTES = 8 * 2**30
# what a world folder holds (a re-run replaces exactly these)
INCOMPLETE = ".world.incomplete"  # in a folder a killed re-run was filling entry by entry
WORLD_ENTRIES = ("ms", "rgb_train", "rgb_test", "rgb_unlabeled", "rgb_paired", "map", MARKER)

@dataclasses.dataclass
class SynthConfig:
    """What `make_world` writes. Counts are per class unless said otherwise."""

    seed: int = 0
    size: int = 32
    ms_per_class: int = 24
    # Fewer RGB labels than MS samples, the case the tool is for (an MS archive, a few RGB
    # labels): at 40 the distilled student gained -3.0 to +1.5 points over 3 worlds, at 20
    # +7 to +13 (seeds 1-3, `run --demo` settings).
    rgb_per_class: int = 20
    test_per_class: int = 20
    unlabeled_per_class: int = 10
    paired: int = 30  # total number of MS patches also rendered as same-target RGB
    classes: int | str = "all"  # "all" or the first N EuroSAT classes
    overlap_cols: int = 1  # columns of MS-scene cells the RGB scene also covers
    # the RGB layers' camera (landcover.RGB_SENSORS): "aerial" is another sensor than the MS
    # one (other bands and colours, 5 m pixels), the setting the method is for; "sentinel2"
    # renders the MS sensor's own true colour, as EuroSAT's RGB is
    rgb_sensor: str = "aerial"

    @property
    def sensor(self) -> RgbSensor | None:
        return RGB_SENSORS[self.rgb_sensor]

    @property
    def rgb_scale(self) -> int:
        return self.sensor.scale if self.sensor else 1

    def class_names(self) -> list[str]:
        if self.classes in ("all", None):
            return list(CLASSES)
        try:
            n = int(self.classes)
        except (TypeError, ValueError):
            raise ConfigError(f"--classes must be 'all' or a number, not {self.classes!r}",
                              f"e.g. --classes 3 (2..{len(CLASSES)})") from None
        if not 2 <= n <= len(CLASSES):
            raise ConfigError(f"--classes {n} is out of range", f"use 2..{len(CLASSES)} or 'all'")
        return CLASSES[:n]

    def validate(self) -> None:
        self.class_names()
        if self.rgb_sensor not in RGB_SENSORS:
            raise ConfigError(f"--rgb-sensor {self.rgb_sensor!r} is not one of {', '.join(RGB_SENSORS)}",
                              "e.g. --rgb-sensor aerial")
        if not 8 <= self.size <= 512:
            raise ConfigError(f"--size {self.size} is out of range", "use 8..512 pixels (EuroSAT: 64)")
        counts = {"--ms-per-class": self.ms_per_class, "--rgb-per-class": self.rgb_per_class,
                  "--test-per-class": self.test_per_class}
        for flag, n in counts.items():
            if not 1 <= n <= MAX_PER_CLASS:
                raise ConfigError(f"{flag} must be in 1..{MAX_PER_CLASS}, not {n}", "e.g. 24")
        for flag, n in {"--unlabeled-per-class": self.unlabeled_per_class, "--paired": self.paired,
                        "--overlap-cols": self.overlap_cols}.items():
            if not 0 <= n <= MAX_PER_CLASS * len(CLASSES):
                raise ConfigError(f"{flag} must be in 0..{MAX_PER_CLASS * len(CLASSES)}, not {n}", "e.g. 10")
        # every patch is held in memory until the world is written
        patches = len(self.class_names()) * (self.ms_per_class + self.rgb_per_class + self.test_per_class
                                             + self.unlabeled_per_class)
        need = patches * self.size * self.size * len(BAND_NAMES) * 2
        if need > MAX_WORLD_BYTES:
            raise ConfigError(f"this world would hold {patches} patches of {self.size} px, about "
                              f"{need / 2**30:.1f} GiB in memory (at most {MAX_WORLD_BYTES / 2**30:.0f} GiB)",
                              "lower the per-class counts or --size")


# -- writing ---------------------------------------------------------------------------
_SET_CODES = {"ms": 1, "rgb_train": 2, "rgb_test": 3, "rgb_unlabeled": 4, "same_target": 5, "shuffle": 10}


def _rng(seed: int, set_name: str, class_index: int = 0, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, _SET_CODES[set_name], class_index, index])


def _same_target_rng(seed: int, stem: str) -> np.random.Generator:
    """The RGB camera's noise on an MS patch's own target (rgb_paired, the scenes' overlap):
    the same for both, so the overlap cells are the paired images."""
    class_name, index = stem.rsplit("_", 1)
    return _rng(seed, "same_target", CLASSES.index(class_name), int(index))


@dataclasses.dataclass
class _Patch:
    class_name: str
    stem: str
    data: np.ndarray  # (13, H, W) uint16 for MS, (3, H, W) uint8 for RGB


def _patches(cfg: SynthConfig, set_name: str, per_class: int, first_index: int,
             place: Place) -> Iterator[_Patch]:
    for name in cfg.class_names():
        ci = CLASSES.index(name)
        for i in range(per_class):
            rng = _rng(cfg.seed, set_name, ci, i)
            ms = render_patch(name, rng, cfg.size, place)
            data = ms if set_name == "ms" else sensor_rgb(ms, cfg.sensor, rng)
            yield _Patch(name, f"{name}_{first_index + i}", data)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0))).save(path, format="PNG", optimize=False)


def _write_ms_tif(path: Path, ms: np.ndarray, transform) -> None:
    import rasterio
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", dtype="uint16", count=ms.shape[0], width=ms.shape[2],
                   height=ms.shape[1], crs=CRS, transform=transform, interleave="pixel")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(ms)
        dst.descriptions = tuple(BAND_NAMES)
    check_raster(path, ms)


@dataclasses.dataclass
class _SceneGrid:
    origin: tuple[float, float]
    rows: int
    cols: int
    size: int
    gsd: float = GSD  # metres per pixel

    @property
    def cell_m(self) -> float:
        return self.size * self.gsd

    def transform(self) -> Affine:
        return Affine(self.gsd, 0.0, self.origin[0], 0.0, -self.gsd, self.origin[1])

    def cell_transform(self, row: int, col: int) -> Affine:
        return Affine(self.gsd, 0.0, self.origin[0] + col * self.cell_m, 0.0, -self.gsd,
                      self.origin[1] - row * self.cell_m)

    def cell_polygon_wkb(self, row: int, col: int) -> bytes:
        import shapely
        x0 = self.origin[0] + col * self.cell_m
        y1 = self.origin[1] - row * self.cell_m
        return shapely.to_wkb(shapely.box(x0, y1 - self.cell_m, x0 + self.cell_m, y1))

    def bounds(self) -> tuple[float, float, float, float]:
        return (self.origin[0], self.origin[1] - self.rows * self.cell_m,
                self.origin[0] + self.cols * self.cell_m, self.origin[1])


def _square_grid(n: int) -> tuple[int, int]:
    cols = max(1, int(np.ceil(np.sqrt(n))))
    return int(np.ceil(n / cols)), cols


def _write_scene(path: Path, grid: _SceneGrid, cells: dict[tuple[int, int], _Patch]) -> None:
    """A tiled GeoTIFF scene written cell by cell (nodata 0 where no cell)."""
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.windows import Window
    sample = next(iter(cells.values())).data
    profile = dict(driver="GTiff", dtype=sample.dtype.name, count=sample.shape[0],
                   width=grid.cols * grid.size, height=grid.rows * grid.size, crs=CRS,
                   transform=grid.transform(), nodata=0, tiled=True, blockxsize=256,
                   blockysize=256, compress="deflate", interleave="pixel")
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        for (row, col), patch in sorted(cells.items()):
            dst.write(patch.data, window=Window(col * grid.size, row * grid.size, grid.size, grid.size))
        if sample.shape[0] == 3:
            dst.colorinterp = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        else:
            dst.descriptions = tuple(BAND_NAMES)
    check_raster(path)


def _write_labels(path: Path, grid: _SceneGrid, cells: dict[tuple[int, int], _Patch]) -> None:
    """One polygon per cell, fields class, source, row, col (layer `labels`), like eurosat_map."""
    keys = sorted(cells)
    geometry = np.array([grid.cell_polygon_wkb(r, c) for r, c in keys], dtype=object)
    fields = [np.array([cells[k].class_name for k in keys], dtype=object),
              np.array([cells[k].stem for k in keys], dtype=object),
              np.array([k[0] for k in keys], dtype=np.int32),
              np.array([k[1] for k in keys], dtype=np.int32)]
    if path.exists():
        path.unlink()
    write_gpkg_layer(path, geometry, fields, ["class", "source", "row", "col"], layer="labels",
                     geometry_type="Polygon", crs=CRS)
    check_vector(path, "labels", len(keys))


def _layout(patches: list[_Patch], rng: np.random.Generator, rows: int, cols: int,
            skip: AbstractSet[tuple[int, int]] = frozenset()) -> dict[tuple[int, int], _Patch]:
    """Patches placed in shuffled order over the free cells of a rows x cols grid."""
    free = [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in skip]
    order = rng.permutation(len(patches))
    return {free[k]: patches[int(i)] for k, i in enumerate(order)}


def _check_out(out: Path) -> bool:
    """True when `out` holds a world written before (or one a killed run left unfinished);
    refuse to touch a folder that holds anything else."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a folder", "choose a new or empty folder for --out")
    remove_stale(out.absolute())  # what a killed run left beside it
    entries = [p.name for p in out.iterdir()] if out.is_dir() else []
    if not entries:
        return False
    foreign = sorted(set(entries) - set(WORLD_ENTRIES) - {INCOMPLETE})
    if MARKER not in entries and INCOMPLETE not in entries:
        raise DataError(f"{out} is not empty and is not a synthetic world",
                        "choose a new or empty folder for --out")
    if foreign:
        raise DataError(f"the world folder {out} also holds {', '.join(foreign[:5])}, which a re-run "
                        "would delete", "move them out of the folder, or choose another --out")
    return True


def _commit(stage: Path, out: Path, replacing: bool) -> None:
    """Put the world built in `stage` at `out`.

    A new folder, or an old world, is swapped in one step (a kill leaves the old world or
    the new one). An existing empty folder (maybe a mount point), or one holding the working
    directory, is filled entry by entry with world.json last; a kill in between leaves a
    folder marked incomplete (no world.json), which a re-run recognises and replaces."""
    cwd = Path.cwd().resolve()
    inside = out.exists() and (cwd == out.resolve() or out.resolve() in cwd.parents)
    if not out.exists() or (replacing and not inside):
        replace_dir(stage, out)
        return
    (out / INCOMPLETE).touch()
    (out / MARKER).unlink(missing_ok=True)
    for name in WORLD_ENTRIES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        if (stage / name).exists():
            os.replace(stage / name, target)
    (out / INCOMPLETE).unlink()


@contextlib.contextmanager
def _fixed_gpkg_timestamp() -> Iterator[None]:
    """GeoPackages carry a write timestamp; pin it (for our writes only) so a rerun writes
    the same bytes."""
    import pyogrio
    key = "OGR_CURRENT_DATE"
    previous = pyogrio.get_gdal_config_option(key)
    pyogrio.set_gdal_config_options({key: "2000-01-01T00:00:00Z"})
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options({key: previous})


def make_world(out_dir: str | Path, cfg: SynthConfig | None = None,
               events: Events = NULL_EVENTS) -> dict[str, str]:
    """Write the synthetic world under `out_dir`; return its paths (also in world.json).

    Layout (as ../shared/data/eurosat and ../shared/data/eurosat_map):
      ms/<Class>/<Class>_<i>.tif            13-band uint16 GeoTIFF, B01..B12,B8A, EPSG:32632, 10 m
      rgb_paired/<Class>/<same stem>.png    the same target as an MS patch, as the RGB camera sees it
      rgb_train|rgb_test/<Class>/*.png      RGB of other places; rgb_unlabeled/*.png unlabeled
                                            (camera: `rgb_sensor`; "aerial": 2x the pixels, 5 m)
      map/ms_scene.tif + ms_labels.gpkg     the MS patches as cells of a scene (nodata 0)
      map/rgb_scene.tif + rgb_labels.gpkg   rgb_train cells, plus `overlap_cols` columns over
                                            the MS scene showing the same targets (co-registered)
      map/rgb_test_scene.tif + rgb_test_labels.gpkg   rgb_test cells, elsewhere
    """
    cfg = cfg or SynthConfig()
    cfg.validate()
    out = Path(out_dir)
    replacing = _check_out(out)
    names = cfg.class_names()
    sets: dict[str, list[_Patch]] = {}
    with events.step("synth", out=str(out)):
        plan = [("ms", cfg.ms_per_class, 0, MS_PLACE),
                ("rgb_train", cfg.rgb_per_class, cfg.ms_per_class, RGB_PLACE),
                ("rgb_test", cfg.test_per_class, cfg.ms_per_class + cfg.rgb_per_class, RGB_PLACE)]
        total = len(names) * (cfg.ms_per_class + cfg.rgb_per_class + cfg.test_per_class
                              + cfg.unlabeled_per_class)
        progress = events.track(iter(range(total)), total, "synth", unit="patch")
        for set_name, per_class, first, place in plan:
            sets[set_name] = []
            for patch in _patches(cfg, set_name, per_class, first, place):
                sets[set_name].append(patch)
                next(progress, None)
        unlabeled = []
        for i in range(len(names) * cfg.unlabeled_per_class):
            name = names[i % len(names)]
            rng = _rng(cfg.seed, "rgb_unlabeled", CLASSES.index(name), i)
            ms = render_patch(name, rng, cfg.size, RGB_PLACE)
            unlabeled.append(_Patch(name, f"unlabeled_{i}", sensor_rgb(ms, cfg.sensor, rng)))
            next(progress, None)
        for _ in progress:  # finish the progress stream
            pass
        # built beside `out` and moved in when complete: a cancel or kill never leaves a
        # half-written world (see _commit)
        with staged_dir(out.absolute(), commit=lambda stage, _: _commit(stage, out, replacing)) as stage, \
                _fixed_gpkg_timestamp():
            written = _write_all(stage, cfg, names, sets, unlabeled)
            paths = {k: str(out / Path(v).relative_to(stage)) for k, v in written.items()}
    events.result("synth", **paths)
    return paths


def _write_all(out: Path, cfg: SynthConfig, names: list[str], sets: dict[str, list[_Patch]],
               unlabeled: list[_Patch]) -> dict[str, str]:
    ms_patches = sets["ms"]
    rows, cols = _square_grid(len(ms_patches))
    ms_grid = _SceneGrid(SCENE_ORIGIN, rows, cols, cfg.size)
    ms_cells = _layout(ms_patches, _rng(cfg.seed, "shuffle", 0), rows, cols)
    paired = _paired_stems(ms_patches, names, cfg.paired)
    _write_patches(out, cfg, sets, unlabeled, ms_grid, ms_cells, paired)
    rgb_grid, rgb_cells, overlap = _rgb_scene(cfg, sets["rgb_train"], ms_grid, ms_cells)
    t_rows, t_cols = _square_grid(len(sets["rgb_test"]))
    test_origin = (SCENE_ORIGIN[0], ms_grid.bounds()[1] - 10 * ms_grid.cell_m)
    test_grid = _SceneGrid(test_origin, t_rows, t_cols, cfg.size * cfg.rgb_scale, GSD / cfg.rgb_scale)
    test_cells = _layout(sets["rgb_test"], _rng(cfg.seed, "shuffle", 2), t_rows, t_cols)

    m = out / "map"
    for stem, grid, cells in (("ms", ms_grid, ms_cells), ("rgb", rgb_grid, rgb_cells),
                              ("rgb_test", test_grid, test_cells)):
        _write_scene(m / f"{stem}_scene.tif", grid, cells)
        _write_labels(m / f"{stem}_labels.gpkg", grid, cells)
    paths = _world_paths(out, bool(unlabeled), bool(paired))

    def per_class(patches: list[_Patch]) -> dict[str, int]:
        return {n: sum(p.class_name == n for p in patches) for n in names}

    world = {
        "generator": "asymkd synth", "config": dataclasses.asdict(cfg), "classes": names,
        "band_names": BAND_NAMES, "crs": CRS, "gsd_m": GSD, "patch_size": cfg.size,
        "rgb_sensor": cfg.rgb_sensor, "rgb_gsd_m": GSD / cfg.rgb_scale, "rgb_patch_size": cfg.size * cfg.rgb_scale,
        "rgb_scale": (f"8-bit = DN * 255 / {RGB_MAX_DN:g} of B04, B03, B02" if cfg.sensor is None else
                      f"another camera: {cfg.rgb_sensor} (landcover.RgbSensor), {cfg.rgb_scale}x finer pixels"),
        "counts": {"ms": per_class(ms_patches), "rgb_train": per_class(sets["rgb_train"]),
                   "rgb_test": per_class(sets["rgb_test"]), "rgb_unlabeled": len(unlabeled),
                   "rgb_paired": len(paired)},
        "map": {
            "ms_scene": {"origin": ms_grid.origin, "rows": rows, "cols": cols, "cells": len(ms_cells)},
            "rgb_scene": {"origin": rgb_grid.origin, "rows": rows, "cols": rgb_grid.cols,
                          "cells": len(rgb_cells), "overlap_cells": len(overlap),
                          "overlap_bounds": _overlap_bounds(ms_grid, rgb_grid)},
            "rgb_test_scene": {"origin": test_grid.origin, "rows": t_rows, "cols": t_cols,
                               "cells": len(test_cells)},
        },
        "paths": {k: os.path.relpath(v, out) for k, v in paths.items()},
    }
    atomic_write_text(out / MARKER, json.dumps(world, indent=2) + "\n")
    return paths


def _write_patches(out: Path, cfg: SynthConfig, sets: dict[str, list[_Patch]], unlabeled: list[_Patch],
                   ms_grid: _SceneGrid, ms_cells: dict[tuple[int, int], _Patch], paired: set[str]) -> None:
    """The patch folders: ms/ (GeoTIFF), rgb_train/, rgb_test/, rgb_unlabeled/, rgb_paired/ (PNG)."""
    # MS patches carry the georeference of their scene cell (the scene is made of them).
    cell_of = {p.stem: rc for rc, p in ms_cells.items()}
    for p in sets["ms"]:
        _write_ms_tif(out / "ms" / p.class_name / f"{p.stem}.tif", p.data,
                      ms_grid.cell_transform(*cell_of[p.stem]))
    for set_name in ("rgb_train", "rgb_test"):
        for p in sets[set_name]:
            _write_png(out / set_name / p.class_name / f"{p.stem}.png", p.data)
    for p in unlabeled:
        _write_png(out / "rgb_unlabeled" / f"{p.stem}.png", p.data)
    for p in sets["ms"]:
        if p.stem in paired:
            rgb = sensor_rgb(p.data, cfg.sensor, _same_target_rng(cfg.seed, p.stem))
            _write_png(out / "rgb_paired" / p.class_name / f"{p.stem}.png", rgb)


def _rgb_scene(cfg: SynthConfig, rgb_train: list[_Patch], ms_grid: _SceneGrid,
               ms_cells: dict[tuple[int, int], _Patch]
               ) -> tuple[_SceneGrid, dict[tuple[int, int], _Patch], dict[tuple[int, int], _Patch]]:
    """The RGB scene's grid and cells, and the cells it shares with the MS scene: it starts
    `overlap_cols` cell columns before the MS scene's right edge, on the same rows."""
    rows, cols = ms_grid.rows, ms_grid.cols
    k = min(cfg.overlap_cols, cols)
    rgb_cols = k + max(1, int(np.ceil(len(rgb_train) / rows)))
    rgb_grid = _SceneGrid((SCENE_ORIGIN[0] + (cols - k) * ms_grid.cell_m, SCENE_ORIGIN[1]),
                          rows, rgb_cols, cfg.size * cfg.rgb_scale, GSD / cfg.rgb_scale)
    overlap = {(r, c - (cols - k)): _Patch(p.class_name, p.stem,
                                           sensor_rgb(p.data, cfg.sensor, _same_target_rng(cfg.seed, p.stem)))
               for (r, c), p in ms_cells.items() if c >= cols - k}
    rgb_cells = _layout(rgb_train, _rng(cfg.seed, "shuffle", 1), rows, rgb_cols,
                        skip={(r, c) for r in range(rows) for c in range(k)})
    rgb_cells.update(overlap)
    return rgb_grid, rgb_cells, overlap


def _world_paths(out: Path, unlabeled: bool, paired: bool) -> dict[str, str]:
    m = out / "map"
    paths = {"root": str(out), "ms": str(out / "ms"), "rgb_train": str(out / "rgb_train"),
             "rgb_test": str(out / "rgb_test"), "rgb_unlabeled": str(out / "rgb_unlabeled"),
             "rgb_paired": str(out / "rgb_paired"),
             "ms_scene": str(m / "ms_scene.tif"), "ms_labels": str(m / "ms_labels.gpkg"),
             "rgb_scene": str(m / "rgb_scene.tif"), "rgb_labels": str(m / "rgb_labels.gpkg"),
             "rgb_test_scene": str(m / "rgb_test_scene.tif"),
             "rgb_test_labels": str(m / "rgb_test_labels.gpkg"), "world": str(out / MARKER)}
    if not unlabeled:
        del paths["rgb_unlabeled"]
    if not paired:
        del paths["rgb_paired"]
    return paths


def _paired_stems(ms_patches: list[_Patch], names: list[str], total: int) -> set[str]:
    """`total` MS stems spread round-robin over the classes (first patches of each class)."""
    by_class = {n: [p.stem for p in ms_patches if p.class_name == n] for n in names}
    chosen: list[str] = []
    depth = 0
    while len(chosen) < total and depth < max(len(v) for v in by_class.values()):
        for n in names:
            if len(chosen) < total and depth < len(by_class[n]):
                chosen.append(by_class[n][depth])
        depth += 1
    return set(chosen)


def _overlap_bounds(a: _SceneGrid, b: _SceneGrid) -> list[float] | None:
    ab, bb = a.bounds(), b.bounds()
    box = [max(ab[0], bb[0]), max(ab[1], bb[1]), min(ab[2], bb[2]), min(ab[3], bb[3])]
    return box if box[0] < box[2] and box[1] < box[3] else None
