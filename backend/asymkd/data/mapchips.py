"""Map datasets: a raster plus a labeled vector layer become a folder dataset of chips.

`chip_map` writes `OUT/<Class>/<stem>.tif` (georeferenced GeoTIFF chips with the raster's
bands and band names) that `load_folder` reads, plus `OUT/chips.json` (what was cut, and
what was skipped and why).

- Polygons: the chips of a grid aligned to the raster origin (chip = `size` x `size` pixels)
  whose footprint lies mostly (`min_cover`) inside a polygon; one chip per 64-px cell on the
  eurosat_map data. Points: the chip centred on the point.
- The label layer is reprojected to the raster CRS; the raster is resampled (WarpedVRT) when
  `resolution` differs from its own. Reads are windowed: a raster is never read whole.
- Chips that are mostly nodata are skipped and counted.
- With a pair raster (e.g. an RGB image over the MS scene), the co-located chip of it is
  written with the same stem into PAIR_OUT/<Class>/: same-target pairs for the matcher.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from .. import layout
from ..errors import ConfigError, DataError
from ..events import NULL_EVENTS, Events
from ..fileio import atomic_write_text, check_raster, remove_stale, staged_dir
from ..models.metadata import control_chars
from .bands import parse_band_names

_POLYGONS = {"Polygon", "MultiPolygon"}
_POINTS = {"Point", "MultiPoint"}


@dataclasses.dataclass
class ChipConfig:
    """How to cut chips. `resolution` is in raster CRS units (m for UTM); None keeps the raster's."""

    size: int = 64
    field: str = "class"
    layer: str | None = None
    resolution: float | None = None
    bands: str | list[str] | None = None  # band names written into the chips (e.g. "sentinel2")
    min_cover: float = 0.75  # share of a chip inside its polygon
    max_nodata: float = 0.5  # skip a chip with a larger share of nodata pixels

    def validate(self) -> None:
        if not 4 <= self.size <= 4096:
            raise ConfigError(f"chip size {self.size} is out of range", "use 4..4096 pixels (EuroSAT: 64)")
        if self.resolution is not None and not (self.resolution > 0 and math.isfinite(self.resolution)):
            raise ConfigError(f"--resolution must be a positive number, not {self.resolution}",
                              "give the ground resolution in raster CRS units, e.g. --resolution 10")
        if not 0 < self.min_cover <= 1:
            raise ConfigError(f"--min-cover must be in (0, 1], not {self.min_cover}", "e.g. --min-cover 0.75")
        if not 0 <= self.max_nodata < 1:
            raise ConfigError(f"--max-nodata must be in [0, 1), not {self.max_nodata}", "e.g. --max-nodata 0.5")


@dataclasses.dataclass
class Chip:
    """One chip: its window on the chipping grid, class and stem."""

    col_off: int
    row_off: int
    class_name: str
    stem: str


@dataclasses.dataclass
class ChipResult:
    out: Path
    pair_out: Path | None
    classes: list[str]
    counts: dict[str, int]  # chips written per class
    chips: int
    pairs: int
    features: int  # label features over the raster
    skipped: dict[str, int]  # reason -> count
    seconds: float

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["pair_out"] = str(self.pair_out) if self.pair_out else None
        return d


# -- rasters ---------------------------------------------------------------------------
def _open_raster(path: str | Path, what: str):
    import rasterio
    from rasterio.errors import RasterioIOError
    try:
        src = rasterio.open(path)
    except (RasterioIOError, OSError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}",
                        "give a raster file GDAL can open (GeoTIFF, VRT, JP2...)") from exc
    if src.crs is None or src.transform.is_identity:
        src.close()
        raise DataError(f"{what} {path} has no georeference (CRS and geotransform)",
                        "georeference it first (e.g. QGIS Georeferencer or gdal_translate -a_srs -a_ullr)")
    return src


class GridView:
    """A raster seen on the chipping grid: reads return (data, valid) for a grid window.

    Either the raster itself (possibly offset by whole pixels, reads outside its extent are
    invalid) or a WarpedVRT onto the grid (another CRS or resolution)."""

    def __init__(self, src, crs, transform, width: int, height: int, stack: ExitStack,
                 resampling_down: bool = False):
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT
        self.src = src
        self.crs, self.transform, self.width, self.height = crs, transform, width, height
        self.count = src.count
        self.dtype = src.dtypes[0]
        self.nodata = src.nodata
        self.descriptions = list(src.descriptions)
        self.colorinterp = list(src.colorinterp)
        self.offset: tuple[int, int] | None = _pixel_offset(src, crs, transform)
        self.vrt = None
        self.has_alpha = False
        if self.offset is None:
            resampling = Resampling.average if resampling_down else Resampling.bilinear
            options: dict[str, Any] = dict(crs=crs, transform=transform, width=width, height=height,
                                           resampling=resampling)
            if src.nodata is None:
                options["add_alpha"] = True  # marks what lies outside the source
                self.has_alpha = True
            else:
                options["nodata"] = src.nodata
            self.vrt = stack.enter_context(WarpedVRT(src, **options))

    def read(self, col_off: int, row_off: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.windows import Window
        if self.vrt is not None:
            window = Window(col_off, row_off, size, size)
            data = self.vrt.read(indexes=list(range(1, self.count + 1)), window=window)
            valid = self.vrt.read(self.count + 1, window=window) > 0 if self.has_alpha \
                else np.ones((size, size), bool)
        else:
            assert self.offset is not None  # read directly only when the raster lies on the grid
            c0, r0 = col_off + self.offset[0], row_off + self.offset[1]
            valid = np.zeros((size, size), bool)
            ys = slice(max(0, -r0), min(size, self.src.height - r0))
            xs = slice(max(0, -c0), min(size, self.src.width - c0))
            data = np.zeros((self.count, size, size), dtype=self.dtype)
            if self.nodata is not None:
                data[:] = np.asarray(self.nodata).astype(self.dtype)
            if ys.start < ys.stop and xs.start < xs.stop:
                inner = Window(c0 + xs.start, r0 + ys.start, xs.stop - xs.start, ys.stop - ys.start)
                data[:, ys, xs] = self.src.read(window=inner)
                valid[ys, xs] = True
        if self.nodata is not None:
            nodata = (np.isnan(data) if isinstance(self.nodata, float) and math.isnan(self.nodata)
                      else data == np.asarray(self.nodata).astype(self.dtype))
            valid &= ~nodata.all(0)
        if np.issubdtype(data.dtype, np.floating):
            valid &= ~np.isnan(data).any(0)
        return data, valid

    def chip_transform(self, col_off: int, row_off: int):
        return self.transform @ Affine.translation(col_off, row_off)


def _pixel_offset(src, crs, transform) -> tuple[int, int] | None:
    """Whole-pixel offset of the grid origin in `src`, when src is on the same grid."""
    t = src.transform
    if src.crs != crs or not np.allclose([t.a, t.b, t.d, t.e], [transform.a, transform.b,
                                                                    transform.d, transform.e]):
        return None
    col, row = ~t @ (transform.c, transform.f)
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return int(round(col)), int(round(row))


def chipping_grid(src, resolution: float | None) -> tuple[Any, int, int, bool]:
    """The grid chips are cut from: the raster's own, or its origin at `resolution`."""
    t = src.transform
    if resolution is None or (math.isclose(resolution, abs(t.a), rel_tol=1e-9)
                              and math.isclose(resolution, abs(t.e), rel_tol=1e-9)):
        return t, src.width, src.height, False
    if t.b != 0 or t.d != 0:
        raise DataError("cannot resample a rotated raster to --resolution",
                        "warp it to a north-up raster first (gdalwarp), or omit --resolution")
    if src.crs.is_geographic:
        raise ConfigError("--resolution is in raster CRS units, and this raster's CRS is in degrees",
                          "reproject the raster to a projected CRS (e.g. UTM), or omit --resolution")
    grid = Affine(resolution, 0.0, t.c, 0.0, math.copysign(resolution, t.e), t.f)
    width = int(math.floor(src.width * abs(t.a) / resolution))
    height = int(math.floor(src.height * abs(t.e) / resolution))
    return grid, width, height, resolution > abs(t.a)


MAX_GRID_CELLS = 100_000_000


def _check_grid_size(width: int, height: int, cfg: ChipConfig) -> None:
    """A --resolution far finer than the raster's makes a grid too large to search."""
    cells = (width // cfg.size) * (height // cfg.size)
    if cells > MAX_GRID_CELLS:
        raise ConfigError(f"at --resolution {cfg.resolution:g} the raster becomes {width} x {height} pixels, "
                          f"{cells:.3g} chip cells (at most {MAX_GRID_CELLS:.0e})",
                          "use a --resolution nearer the raster's own, or omit it")


def _grid_bounds(transform, width: int, height: int) -> tuple[float, float, float, float]:
    xs, ys = zip(*(transform @ (c, r) for c, r in ((0, 0), (width, 0), (0, height), (width, height))), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


# -- labels ----------------------------------------------------------------------------
@dataclasses.dataclass
class Labels:
    geoms: np.ndarray  # shapely geometries in the raster CRS
    classes: np.ndarray  # str per feature
    fids: np.ndarray
    source_crs: str | None
    dropped: int  # features without geometry or class


def class_text(value: Any) -> str | None:
    """A class label as text: None for NULL, NaN and blank; 3.0 -> '3'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def read_labels(path: str | Path, field: str, layer: str | None, raster_crs,
                raster_bounds: tuple[float, float, float, float], events: Events = NULL_EVENTS) -> Labels:
    """Label features over the raster (bbox filtered while reading), reprojected to its CRS."""
    import pyogrio
    import shapely
    from pyogrio.errors import DataLayerError, DataSourceError
    from pyogrio.raw import read
    from rasterio.crs import CRS
    from rasterio.warp import transform_bounds
    try:
        layers = [str(name) for name, _ in pyogrio.list_layers(str(path))]
    except (DataSourceError, DataLayerError, OSError) as exc:
        raise DataError(f"cannot read labels {path}: {exc}",
                        "give a vector file GDAL can open (GeoPackage, shapefile, GeoJSON...)") from exc
    if not layers:
        raise DataError(f"labels {path} has no layers", "give a vector file with a polygon or point layer")
    if layer is None:
        layer = "labels" if "labels" in layers else layers[0]
        if len(layers) > 1:
            events.warning(f"labels {path} has layers {layers}; using '{layer}' (choose with --layer)")
    elif layer not in layers:
        raise DataError(f"labels {path} has no layer '{layer}'; its layers are: {', '.join(layers)}",
                        "choose one of them with --layer")
    info = pyogrio.read_info(str(path), layer=layer)
    fields = [str(f) for f in info["fields"]]
    if field not in fields:
        raise DataError(f"label field '{field}' is not in {path} (layer '{layer}'); its fields are: "
                        f"{', '.join(fields) or '(none)'}", "choose the class field with --field")
    label_crs = CRS.from_user_input(info["crs"]) if info["crs"] else None
    if label_crs is None:
        events.warning(f"labels {path} have no CRS; assuming the raster's ({raster_crs})")
    same_crs = label_crs is None or label_crs == raster_crs
    bbox = raster_bounds if same_crs else transform_bounds(raster_crs, label_crs, *raster_bounds, densify_pts=21)
    try:
        _, fids, wkb, values = read(str(path), layer=layer, columns=[field], bbox=tuple(bbox),
                                    return_fids=True)
    except Exception as exc:  # GDAL errors on a broken layer
        raise DataError(f"cannot read labels {path} (layer '{layer}'): {exc}",
                        "check the file in QGIS, or save the layer again as a GeoPackage") from exc
    geoms = shapely.from_wkb(wkb) if len(wkb) else np.array([], dtype=object)
    classes = np.array([class_text(v) for v in values[0]], dtype=object)
    if label_crs is not None and not same_crs and len(geoms):
        from pyproj import Transformer
        tf = Transformer.from_crs(label_crs.to_wkt(), raster_crs.to_wkt(), always_xy=True)
        geoms = shapely.transform(geoms, lambda xy: np.column_stack(tf.transform(xy[:, 0], xy[:, 1])))
    keep = np.array([g is not None and not g.is_empty for g in geoms], bool) & (classes != None)  # noqa: E711
    if len(geoms):
        keep &= shapely.intersects(geoms, shapely.box(*raster_bounds))
    dropped = int(sum(1 for g, c in zip(geoms, classes, strict=True) if g is None or c is None))
    return Labels(geoms[keep], classes[keep], np.asarray(fids)[keep],
                  label_crs.to_string() if label_crs else None, dropped)


# -- chip selection ----------------------------------------------------------------------
# A class name's folder, and the chip files named after it ("<class>_f<fid>_<n>.tif"), must fit
# the 255 bytes of a file name on common file systems.
MAX_CLASS_BYTES = 200


def safe_name(class_name: str) -> str:
    """A class name usable as a folder and file name (load_folder takes the folder name);
    control characters are replaced too, so none reach model files, styles or messages."""
    out = "".join("_" if ch in '/\\:*?"<>|' or control_chars(ch) else ch for ch in class_name).strip()
    return out.lstrip(".") or "_"


def check_folder_names(classes: list[str]) -> None:
    """Different classes must not share a folder: 'a/b', 'a:b' and 'a*b' all become 'a_b',
    and 'Forest'/'forest' are one folder on Windows and macOS."""
    by_folder: dict[str, list[str]] = {}
    for cls in sorted(set(classes)):
        by_folder.setdefault(safe_name(cls).casefold(), []).append(cls)
    long = [cls for cls in sorted(set(classes)) if len(safe_name(cls).encode("utf-8")) > MAX_CLASS_BYTES]
    if long:  # the class folder, and each chip's file name that starts with it, must fit 255 bytes
        raise DataError(f"class name(s) too long for a folder and file name: "
                        f"{', '.join(ascii(n[:40]) + '...' for n in long[:3])} (at most {MAX_CLASS_BYTES} bytes "
                        "in UTF-8)", "shorten the classes in the label field")
    clashes = [names for names in by_folder.values() if len(names) > 1]
    if clashes:
        detail = "; ".join(f"{', '.join(ascii(n) for n in names)} -> folder '{safe_name(names[0])}'"
                           for names in clashes)
        raise DataError(f"different classes would share one class folder: {detail}",
                        "rename the classes in the label field so they differ in more than "
                        "/ \\ : * ? \" < > | , control characters or upper/lower case")


def polygon_chips(labels: Labels, transform, width: int, height: int, size: int,
                  min_cover: float) -> list[Chip]:
    """Grid chips (aligned to the grid origin) lying at least `min_cover` inside a polygon;
    a chip claimed by several polygons goes to the one covering most of it."""
    import shapely
    inverse = ~transform
    n_cols, n_rows = width // size, height // size
    best: dict[tuple[int, int], tuple[float, str]] = {}
    cell_area = abs(transform.a * transform.e - transform.b * transform.d) * size * size
    for geom, cls in zip(labels.geoms, labels.classes, strict=True):
        if geom.geom_type not in _POLYGONS:
            continue
        minx, miny, maxx, maxy = geom.bounds
        cols, rows = zip(*(inverse @ (x, y) for x in (minx, maxx) for y in (miny, maxy)), strict=True)
        c0, c1 = max(0, int(min(cols) // size)), min(n_cols - 1, int(max(cols) // size))
        r0, r1 = max(0, int(min(rows) // size)), min(n_rows - 1, int(max(rows) // size))
        if c0 > c1 or r0 > r1:
            continue
        cc, rr = (a.ravel() for a in np.meshgrid(np.arange(c0, c1 + 1), np.arange(r0, r1 + 1)))
        cells = _cell_polygons(transform, cc, rr, size)
        cover = shapely.area(shapely.intersection(cells, geom)) / cell_area
        for c, r, f in zip(cc, rr, cover, strict=True):
            if f >= min_cover - 1e-9 and f > best.get((int(r), int(c)), (0.0, ""))[0]:
                best[(int(r), int(c))] = (float(f), cls)
    return [Chip(c * size, r * size, cls, f"{safe_name(cls)}_r{r}_c{c}")
            for (r, c), (_, cls) in sorted(best.items())]


def _cell_polygons(transform, cols: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    import shapely
    corners = [(0, 0), (size, 0), (size, size), (0, size), (0, 0)]
    rings = np.empty((len(cols), 5, 2))
    for k, (dc, dr) in enumerate(corners):
        x, y = transform @ (cols * size + dc, rows * size + dr)
        rings[:, k, 0], rings[:, k, 1] = x, y
    return shapely.polygons(rings)


def point_chips(labels: Labels, transform, width: int, height: int, size: int) -> tuple[list[Chip], int]:
    """The chip centred on each point (each part of a multipoint); chips that would cross
    the raster edge are skipped and counted."""
    import shapely
    inverse = ~transform
    chips, edge = [], 0
    for geom, cls, fid in zip(labels.geoms, labels.classes, labels.fids, strict=True):
        if geom.geom_type not in _POINTS:
            continue
        parts = shapely.get_parts(geom)
        for k, p in enumerate(parts):
            col, row = inverse @ (p.x, p.y)
            # the point's pixel lands at index size // 2 of the chip
            c0, r0 = int(math.floor(col)) - size // 2, int(math.floor(row)) - size // 2
            if c0 < 0 or r0 < 0 or c0 + size > width or r0 + size > height:
                edge += 1
                continue
            suffix = f"_{k}" if len(parts) > 1 else ""
            chips.append(Chip(c0, r0, cls, f"{safe_name(cls)}_f{fid}{suffix}"))
    return chips, edge


# -- output folders ------------------------------------------------------------------------
def _check_out(out: Path) -> None:
    remove_stale(out)  # what a killed run left beside it
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / layout.CHIPS_MANIFEST).is_file())):
        raise DataError(f"{out} exists and is not a chip folder written before",
                        "choose a new or empty output folder")


def _write_chip(path: Path, data: np.ndarray, view: GridView, transform, names: list[str] | None) -> None:
    import rasterio
    from rasterio.enums import ColorInterp
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", dtype=data.dtype.name, count=data.shape[0], width=data.shape[2],
                   height=data.shape[1], crs=view.crs, transform=transform, nodata=view.nodata,
                   interleave="pixel")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if names:
            dst.descriptions = tuple(names)
        if view.colorinterp[:3] == [ColorInterp.red, ColorInterp.green, ColorInterp.blue]:
            dst.colorinterp = view.colorinterp
    check_raster(path, data)


def _band_names(view: GridView, spec: str | list[str] | None) -> list[str] | None:
    given = parse_band_names(spec, view.count)
    if given:
        return given
    return view.descriptions if all(view.descriptions) else None


# -- the job -------------------------------------------------------------------------------
def chip_map(raster: str | Path, labels: str | Path, out: str | Path, cfg: ChipConfig | None = None,
             pair_raster: str | Path | None = None, pair_out: str | Path | None = None,
             events: Events = NULL_EVENTS) -> ChipResult:
    """Cut `raster` into labeled chips under `out` (see the module docstring)."""
    start = time.time()
    cfg = cfg or ChipConfig()
    cfg.validate()
    out = Path(out)
    pair_out = _check_outputs(out, pair_raster, pair_out)
    with ExitStack() as stack, events.step("chips", raster=str(raster), labels=str(labels)):
        src = stack.enter_context(_open_raster(raster, "raster"))
        transform, width, height, down = chipping_grid(src, cfg.resolution)
        _check_grid_size(width, height, cfg)
        view = GridView(src, src.crs, transform, width, height, stack, down)
        bounds = _grid_bounds(transform, width, height)
        pair_view = None
        if pair_raster is not None:
            pair_view = _pair_view(pair_raster, src.crs, transform, width, height, bounds, stack)
        found = read_labels(labels, cfg.field, cfg.layer, src.crs, bounds, events)
        _check_labels(found, cfg.field, labels, raster, bounds)
        chips = polygon_chips(found, transform, width, height, cfg.size, cfg.min_cover)
        pchips, edge = point_chips(found, transform, width, height, cfg.size)
        chips += pchips
        skipped = {"nodata": 0, "point_at_edge": edge, "pair_nodata": 0,
                   "features_without_class_or_geometry": found.dropped}
        if not chips:
            raise DataError(f"no chip of {cfg.size} px lies {cfg.min_cover:.0%} inside a label polygon "
                            f"(or around a point) of {labels}",
                            "use a smaller --size or --min-cover, or larger label polygons")
        check_folder_names([c.class_name for c in chips])
        # Each folder is built beside its final path and swapped in when complete: a kill
        # leaves the old folder or the new one (the pair folder is swapped in first).
        with staged_dir(out) as partial, \
                (staged_dir(pair_out) if pair_out is not None else nullcontext()) as pair_partial:
            written, pairs = _cut(chips, view, pair_view, partial, pair_partial, cfg, events, skipped)
            _write_manifest(partial, raster, labels, cfg, view, written, skipped, pairs, pair_raster)
            if pair_partial is not None and pair_view is not None:
                _write_manifest(pair_partial, pair_raster, labels, cfg, pair_view, pairs, {}, pairs, raster)
    classes = sorted({c.class_name for c in written})
    res = ChipResult(out=out, pair_out=pair_out, classes=classes,
                     counts={k: sum(c.class_name == k for c in written) for k in classes},
                     chips=len(written), pairs=len(pairs), features=len(found.geoms),
                     skipped=skipped, seconds=round(time.time() - start, 3))
    _report(res, pair_raster, events)
    return res


def _check_outputs(out: Path, pair_raster: str | Path | None, pair_out: str | Path | None) -> Path | None:
    """The pair output folder (given with a pair raster, apart from `out`); both folders writable."""
    if (pair_raster is None) != (pair_out is None):
        raise ConfigError("a pair raster needs a pair output folder and the other way round",
                          "give both --pair-raster and --pair-out, or neither")
    pair_folder = Path(pair_out) if pair_out is not None else None
    if pair_folder is not None and pair_folder.resolve() == out.resolve():
        raise ConfigError("--pair-out must differ from --out", "pairs go to a second folder with the same stems")
    for folder in (out, pair_folder):
        if folder is not None:
            _check_out(folder)
    return pair_folder


def _report(res: ChipResult, pair_raster: str | Path | None, events: Events) -> None:
    """Warnings for what was skipped, then the metrics and result events."""
    for reason, n in res.skipped.items():
        if n and reason != "pair_nodata":
            events.warning(f"chips: skipped {n} ({reason.replace('_', ' ')})")
    if res.pair_out is not None and not res.pairs:
        events.warning(f"chips: the pair raster {pair_raster} has no valid data under any chip; no pairs written")
    events.metrics("chips", res.summary())
    paths = {"chips": res.out} | ({"pairs": res.pair_out} if res.pair_out else {})
    events.result("chips", **paths)


def _pair_view(path, crs, transform, width, height, bounds, stack) -> GridView:
    from rasterio.warp import transform_bounds
    psrc = stack.enter_context(_open_raster(path, "pair raster"))
    pb = transform_bounds(psrc.crs, crs, *psrc.bounds, densify_pts=21)
    if pb[0] >= bounds[2] or pb[2] <= bounds[0] or pb[1] >= bounds[3] or pb[3] <= bounds[1]:
        raise DataError(f"pair raster {path} does not overlap the raster "
                        f"(pair extent {tuple(round(v, 2) for v in pb)}, raster extent "
                        f"{tuple(round(v, 2) for v in bounds)}, in {crs})",
                        "co-located pairs need rasters covering the same ground; check the files and CRS")
    down = abs(psrc.transform.a) < abs(transform.a) if psrc.crs == crs else True
    return GridView(psrc, crs, transform, width, height, stack, down)


def _check_labels(found: Labels, field: str, labels, raster, bounds) -> None:
    if len(found.geoms) == 0:
        raise DataError(f"no label features of {labels} lie over the raster {raster} "
                        f"(raster extent {tuple(round(v, 2) for v in bounds)})",
                        "check that labels and raster cover the same area (and their CRS)")
    kinds = {g.geom_type for g in found.geoms}
    if not kinds & (_POLYGONS | _POINTS):
        raise DataError(f"labels {labels} hold {', '.join(sorted(kinds))} features",
                        "use polygons (areas of one class) or points (chip centres)")
    classes = sorted(set(found.classes))
    if len(classes) < 2:
        raise DataError(f"label field '{field}' has only one class ({classes[0]!r}) over the raster",
                        "a classifier needs at least two classes: label more classes or pick another field")


def _cut(chips: list[Chip], view: GridView, pair_view: GridView | None, out: Path,
         pair_out: Path | None, cfg: ChipConfig, events: Events,
         skipped: dict[str, int]) -> tuple[list[Chip], list[Chip]]:
    names = _band_names(view, cfg.bands)
    pair_names = _band_names(pair_view, None) if pair_view is not None else None
    written: list[Chip] = []
    pairs: list[Chip] = []
    out.mkdir(parents=True, exist_ok=True)
    # Row-major order keeps reads inside the raster's cached blocks.
    ordered = sorted(chips, key=lambda c: (c.row_off, c.col_off))
    for chip in events.track(iter(ordered), len(ordered), "chips", unit="chip"):
        data, valid = view.read(chip.col_off, chip.row_off, cfg.size)
        if 1.0 - valid.mean() > cfg.max_nodata:
            skipped["nodata"] += 1
            continue
        folder = safe_name(chip.class_name)
        _write_chip(out / folder / f"{chip.stem}.tif", data, view,
                    view.chip_transform(chip.col_off, chip.row_off), names)
        written.append(chip)
        if pair_view is None or pair_out is None:
            continue
        pdata, pvalid = pair_view.read(chip.col_off, chip.row_off, cfg.size)
        if 1.0 - pvalid.mean() > cfg.max_nodata:
            skipped["pair_nodata"] += 1
            continue
        _write_chip(pair_out / folder / f"{chip.stem}.tif", pdata, pair_view,
                    pair_view.chip_transform(chip.col_off, chip.row_off), pair_names)
        pairs.append(chip)
    if not written:
        raise DataError(f"every chip was mostly nodata ({skipped['nodata']} skipped)",
                        "check the raster's nodata value, or raise --max-nodata")
    return written, pairs


def _write_manifest(folder: Path, raster, labels, cfg: ChipConfig, view: GridView,
                    chips: list[Chip], skipped: dict[str, int], pairs: list[Chip], other) -> None:
    manifest = {
        "raster": str(raster), "labels": str(labels), "field": cfg.field, "layer": cfg.layer,
        "size": cfg.size, "resolution": abs(view.transform.a), "crs": view.crs.to_string(),
        "grid_origin": [view.transform.c, view.transform.f],
        "classes": sorted({c.class_name for c in chips}),
        "counts": {k: sum(c.class_name == k for c in chips) for k in sorted({c.class_name for c in chips})},
        "skipped": skipped, "paired_with": str(other) if other else None, "pairs": len(pairs),
        "chips": [{"stem": c.stem, "class": c.class_name, "col_off": c.col_off, "row_off": c.row_off}
                  for c in chips],
    }
    atomic_write_text(folder / layout.CHIPS_MANIFEST, json.dumps(manifest, indent=1) + "\n")

