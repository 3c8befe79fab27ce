"""Outputs written atomically: the tile GeoPackage (in chunks, through pyogrio), the
optional class raster, and the style; each goes to a hidden temporary file beside its
final path and is moved into place only when the whole job has succeeded."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyogrio.errors
import shapely

from ..errors import ConfigError, DataError, StorageError
from ..fileio import check_raster, check_vector, remove_stale, write_gpkg_layer
from ..palette import hex_to_rgb
from ..tempnames import final_path, temp_name
from .grid import Grid
from .infer import Summary
from .stats import ClassAreas, Uncertainty, write_area_table

_SIDECARS = ("-journal", "-wal", "-shm", ".aux.xml")
LAYER = "tiles"


class AtomicOutputs:
    """Temporary paths for a set of outputs; `commit()` moves them all into place, and
    leaving the `with` block without commit removes every temporary file."""

    def __init__(self, finals: Sequence[Path], overwrite: bool = False):
        self.finals = [Path(p) for p in finals]
        self.temps = {p: temp_name(p) for p in self.finals}
        for p in self.finals:
            remove_stale(p)  # what a killed run left beside the outputs
        self.overwrite = overwrite
        self.committed = False
        for p in self.finals:
            if p.exists() and not overwrite:
                raise ConfigError(f"output {p} already exists",
                                  "pass --overwrite to replace it, or choose another name")
            if p.is_dir():
                raise ConfigError(f"output {p} is a folder", "give a file name, e.g. tiles.gpkg")
        for p in self.finals:
            self._probe(p)

    @staticmethod
    def _probe(path: Path) -> None:
        """Fail now, before any inference, when the output cannot be written."""
        probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(probe, "x"):
                pass
        except OSError as exc:
            raise DataError(f"cannot write output {path}: {exc.strerror or exc}",
                            "choose a folder you can write to") from exc
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()

    def temp(self, final: Path) -> Path:
        return self.temps[Path(final)]

    def commit(self) -> None:
        """Move every output into place, as one unit: commits of runs writing into the same
        folder take turns (a lock on the folder), so two runs never mix their files; without
        overwrite, an output another run wrote meanwhile is refused (hard link, which never
        replaces a file), and what this commit had placed is taken back."""
        with _folder_lock(self.finals[0].parent):
            placed: list[Path] = []
            try:
                for final, tmp in self.temps.items():
                    if not tmp.exists():
                        continue
                    if not self.overwrite and final.exists():
                        raise self._taken(final)
                    for side in _SIDECARS:  # an old database's journal must not meet the new file
                        Path(str(final) + side).unlink(missing_ok=True)
                    self._place(tmp, final)
                    placed.append(final)
                    aux = Path(str(tmp) + ".aux.xml")
                    if aux.exists():
                        os.replace(aux, Path(str(final) + ".aux.xml"))
            except BaseException:
                for final in placed:
                    final.unlink(missing_ok=True)
                raise
        self.committed = True

    def _place(self, tmp: Path, final: Path) -> None:
        if self.overwrite:
            os.replace(tmp, final)
            return
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise self._taken(final) from None
        except OSError:  # a file system without hard links: checked above, then renamed
            os.replace(tmp, final)
            return
        tmp.unlink()

    @staticmethod
    def _taken(final: Path) -> ConfigError:
        return ConfigError(f"output {final} was written by another run while this one worked; "
                           "this run's result was not kept",
                           "pass --overwrite to replace it, or choose another name")

    def discard(self) -> list[Path]:
        removed = []
        for tmp in self.temps.values():
            for p in (tmp, *(Path(str(tmp) + s) for s in _SIDECARS)):
                if p.exists():
                    p.unlink()
                    removed.append(p)
        return removed

    def __enter__(self) -> "AtomicOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.discard()


@dataclasses.dataclass
class TileRows:
    """A batch of classified tiles, as the field table reads it."""
    grid: Grid
    names: np.ndarray        # class names, indexed by class id
    rows: np.ndarray
    cols: np.ndarray
    class_id: np.ndarray
    confidence: np.ndarray
    second_id: np.ndarray
    second_prob: np.ndarray
    entropy: np.ndarray
    valid_fraction: np.ndarray
    uncertain: np.ndarray

    def key(self, part: str) -> np.ndarray:
        return self.grid.keys(self.rows, self.cols)[part]


@dataclasses.dataclass(frozen=True)
class TileField:
    """One field of the tile layer: its name, OGR type, how its value is computed (None:
    NULL) and what the README says of it."""
    name: str
    ogr: str                                            # Integer, Real or String
    value: Callable[[TileRows], np.ndarray | None]
    about: str
    grid: str | None = None                             # only on this grid kind (pixel or xyz)


_DTYPES: dict[str, type] = {"Integer": np.int32, "Real": np.float64, "String": object}


def _null(_: TileRows) -> None:
    return None


# The one list of the tile layer's fields, in the layer's order: the writer's schema and rows
# and the README's field table are made from it (a test compares the README with it).
TILE_FIELDS: tuple[TileField, ...] = (
    TileField("class_id", "Integer", lambda t: t.class_id, "the most probable class (0-based, in the model's order)"),
    TileField("class_name", "String", lambda t: t.names[t.class_id], "its name"),
    TileField("confidence", "Real", lambda t: t.confidence, "its probability, 0..1"),
    TileField("second_id", "Integer", lambda t: t.second_id, "the second most probable class"),
    TileField("second_name", "String", lambda t: t.names[t.second_id], "its name"),
    TileField("second_prob", "Real", lambda t: t.second_prob, "its probability"),
    TileField("entropy", "Real", lambda t: t.entropy,
              "entropy of the class probabilities / log(classes): 0 certain, 1 uniform"),
    TileField("uncertain", "Integer", lambda t: t.uncertain,
              "1 when the tile's certainty is below `--uncertain-below` (by `--uncertain-by`), else 0; "
              "always 0 without a threshold"),
    TileField("tile_key", "String", lambda t: t.grid.key_strings(t.rows, t.cols),
              "`row/col` on the pixel grid, `z/x/y` on the XYZ grid"),
    TileField("row", "Integer", lambda t: t.key("row"), "tile row (pixel grid)", grid="pixel"),
    TileField("col", "Integer", lambda t: t.key("col"), "tile column (pixel grid)", grid="pixel"),
    TileField("z", "Integer", lambda t: t.key("z"), "zoom (XYZ grid)", grid="xyz"),
    TileField("x", "Integer", lambda t: t.key("x"), "tile column (XYZ grid)", grid="xyz"),
    TileField("y", "Integer", lambda t: t.key("y"), "tile row (XYZ grid)", grid="xyz"),
    TileField("valid_fraction", "Real", lambda t: t.valid_fraction, "fraction of the tile's pixels holding data"),
    # filled by the review of uncertain tiles in QGIS; written empty
    TileField("reviewed_class", "Integer", _null, "NULL; the class id set in review"),
    TileField("reviewed_by", "String", _null, "NULL; who reviewed the tile"),
    TileField("reviewed_at", "String", _null, "NULL; when, ISO 8601"),
)


def tile_fields(grid_kind: str) -> list[TileField]:
    """The fields of a tile layer on a grid of this kind."""
    return [f for f in TILE_FIELDS if f.grid in (None, grid_kind)]


def fields_markdown() -> str:
    """The README's table of tile fields."""
    lines = ["| field | type | value |", "|---|---|---|"]
    lines += [f"| `{f.name}` | {f.ogr} | {f.about} |" for f in TILE_FIELDS]
    return "\n".join(lines) + "\n"


def _columns(fields: Sequence[TileField], t: TileRows) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """The field table's values for a batch, and where they are NULL."""
    n = len(t.rows)
    data: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    for f in fields:
        value = f.value(t) if n else None
        dtype = _DTYPES[f.ogr]
        if value is None:
            data.append(np.full(n, None, object) if dtype is object else np.zeros(n, dtype))
            masks.append(np.ones(n, bool) if n else None)
        else:
            data.append(np.asarray(value).astype(dtype, copy=False))
            masks.append(None)
    return data, masks


# what a batch of tiles carries from the classifier to the writer
_PARTS = ("rows", "cols", "class_id", "confidence", "second_id", "second_prob", "entropy", "valid_fraction",
          "uncertain")
_INT_PARTS = ("rows", "cols", "class_id", "second_id", "uncertain")


class TileLayerWriter:
    """Writes tile polygons and their classes to a GeoPackage layer, `chunk` tiles per write,
    in a background thread so the writes overlap inference. The layer and its default style
    are created first, so a run that classifies nothing still gives a valid (empty) layer.
    At most one chunk waits to be written: memory stays bounded. Tiles are marked uncertain
    as they come, and each tile's area is added to its class's as it is written (`areas`);
    `close` writes the area table into the GeoPackage."""

    def __init__(self, path: Path, grid: Grid, class_names: Sequence[str], chunk: int = 4096,
                 style_qml: str | None = None, nice: int = 0, uncertainty: Uncertainty | None = None):
        self.path = Path(path)
        self.grid = grid
        self.class_names = np.array(list(class_names), dtype=object)
        self.fields = tile_fields(grid.kind)
        self.uncertainty = uncertainty or Uncertainty()
        self.areas = ClassAreas(grid.crs, class_names)
        self.chunk = max(1, int(chunk))
        self.crs = grid.crs.to_wkt()
        self.count = 0
        self.write_s = 0.0  # time spent writing, in the background thread
        self._parts: list[dict[str, np.ndarray]] = []
        self._pending = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asymkd-gpkg-writer",
                                        initializer=_lower_priority, initargs=(nice,))
        self._future: Future | None = self._pool.submit(self._create, style_qml)

    def add(self, rows: np.ndarray, cols: np.ndarray, summary: Summary, valid: np.ndarray) -> None:
        if len(rows) == 0:
            return
        self._parts.append({"rows": np.array(rows, np.int64), "cols": np.array(cols, np.int64),
                            "class_id": summary.class_id, "confidence": summary.confidence,
                            "second_id": summary.second_id, "second_prob": summary.second_prob,
                            "entropy": summary.entropy, "valid_fraction": np.array(valid, np.float64),
                            "uncertain": self.uncertainty.flags(summary)})
        self._pending += len(rows)
        if self._pending >= self.chunk:
            self._submit()

    def close(self) -> int:
        """Write what is left and the area table, wait for the writes, check the file, and
        return the number of features."""
        try:
            self._submit()
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
        write_area_table(self.path, self.areas.table())
        check_vector(self.path, LAYER, self.count)
        return self.count

    def abort(self) -> None:
        """Drop what is not written yet and wait for a write in progress to end, so the
        temporary file can be removed."""
        self._parts = []
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- background thread -------------------------------------------------------------
    def _wait(self) -> None:
        if self._future is not None:
            future, self._future = self._future, None
            try:
                future.result()  # re-raises a write error in the caller's thread
            except pyogrio.errors.DataSourceError as exc:
                # our own file, just created: GDAL cannot reopen it when a write was cut short
                raise StorageError(f"{final_path(self.path)} was not written completely ({exc})",
                                   "free some space, raise the limit (ulimit -f) or write elsewhere, "
                                   "then run it again") from exc

    def _submit(self) -> None:
        if not self._parts:
            return
        cat = {k: np.concatenate([p[k] for p in self._parts]) for k in self._parts[0]}
        self._parts, self._pending = [], 0
        self._wait()
        self._future = self._pool.submit(self._write, cat, True)

    def _create(self, style_qml: str | None) -> None:
        empty = {k: np.zeros(0, np.int64 if k in _INT_PARTS else np.float64) for k in _PARTS}
        self._write(empty, False)
        if style_qml is not None:
            from .style import embed_style
            embed_style(self.path, LAYER, style_qml)

    def _write(self, cat: dict[str, np.ndarray], append: bool) -> None:
        start = time.perf_counter()
        tiles = TileRows(grid=self.grid, names=self.class_names, **cat)
        bounds = self.grid.feature_bounds(tiles.rows, tiles.cols)
        geoms = shapely.to_wkb(shapely.box(*bounds)) if len(tiles.rows) else np.array([], dtype=object)
        self.areas.add(bounds, tiles.class_id, tiles.confidence, tiles.uncertain)
        data, masks = _columns(self.fields, tiles)
        write_gpkg_layer(self.path, geoms, data, [f.name for f in self.fields], layer=LAYER, crs=self.crs,
                         geometry_type="Polygon", append=append,
                         field_mask=masks if any(m is not None for m in masks) else None)
        self.count += len(tiles.rows)
        self.write_s += time.perf_counter() - start


def _lower_priority(nice: int) -> None:
    if nice:
        from .reader import lower_thread_priority
        lower_thread_priority(nice)


class ClassRaster:
    """One pixel per tile step (stride), centred on its tile, holding the class id; kept in
    memory (tiles / stride^2 is small) and written as a GeoTIFF with a colour table."""

    def __init__(self, grid: Grid, class_names: Sequence[str]):
        self.grid = grid
        self.class_names = list(class_names)
        self.dtype = "uint8" if len(class_names) < 255 else "uint16"
        self.nodata = 255 if self.dtype == "uint8" else 65535
        self.array = np.full((grid.rows, grid.cols), self.nodata, dtype=self.dtype)

    def add(self, rows: np.ndarray, cols: np.ndarray, class_id: np.ndarray) -> None:
        self.array[rows, cols] = class_id

    def write(self, path: Path, colors: Sequence[str]) -> None:
        import rasterio
        from affine import Affine
        g = self.grid
        shift = (g.tile - g.stride) / 2.0  # stride-sized pixels centred on their tiles
        transform = g.transform @ Affine.translation(shift, shift) @ Affine.scale(g.stride)
        with rasterio.open(path, "w", driver="GTiff", width=g.cols, height=g.rows, count=1, dtype=self.dtype,
                           crs=g.crs, transform=transform, nodata=self.nodata, compress="deflate") as dst:
            dst.write(self.array, 1)
            dst.write_colormap(1, {i: (*hex_to_rgb(c), 255) for i, c in enumerate(colors)})
            dst.set_band_description(1, "class_id")
            dst.update_tags(class_names=",".join(self.class_names))
            dst.update_tags(1, **{f"class_{i}": n for i, n in enumerate(self.class_names)})
        check_raster(path, self.array[None])


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on a folder (POSIX flock) for the moment of a commit."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; each file is still replaced in one step
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def check_not_inputs(outputs: Sequence[Path | None], inputs: Sequence[str | Path | None]) -> None:
    """Refuse an output that is one of the inputs (the raster, the model, the mask) or a file
    behind one (a VRT's source, an .aux.xml, an overview; hard and symbolic links included):
    it would be overwritten. Each output's sidecars, replaced with it, are checked too."""
    from ..resources import check_outputs_clear
    outs = [Path(o) for o in outputs if o is not None]
    check_outputs_clear(outs + [Path(str(o) + side) for o in outs for side in _SIDECARS], inputs)


def check_output_names(out: Path, class_raster: Path | None) -> None:
    if out.suffix.lower() != ".gpkg":
        raise ConfigError(f"output {out} is not a .gpkg file", "name the output e.g. tiles.gpkg")
    if class_raster is not None and class_raster.suffix.lower() not in (".tif", ".tiff"):
        raise ConfigError(f"class raster {class_raster} is not a .tif file", "name it e.g. classes.tif")
