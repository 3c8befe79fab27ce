"""Tile grids: a pixel grid at the model's ground resolution, or the XYZ web-map grid.

Both are a regular pixel grid in some CRS (`Grid.transform`) cut into square tiles of
`tile` pixels every `stride` pixels; a tile is the window (row*stride, col*stride, tile,
tile) of that grid, and its polygon is exactly that window's bounds. When the grid is the
raster's own pixel grid, windows are read straight from the raster; otherwise (another
resolution, a geographic CRS, XYZ) they are read through a warped view onto the grid.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import transform_bounds

from ..errors import ConfigError, DataError

WEB_MERCATOR = CRS.from_epsg(3857)
WGS84 = CRS.from_epsg(4326)
MERCATOR_HALF = 20037508.342789244  # half the EPSG:3857 world width (m)
MAX_LAT = 85.0511287798066
MAX_ZOOM = 24
RES_TOLERANCE = 0.01  # a raster within 1% of the model's resolution is read as is


@dataclasses.dataclass(frozen=True)
class Grid:
    kind: str                # "pixel" or "xyz"
    crs: CRS                 # CRS of the grid, the tiles and the output layer
    transform: Affine        # the grid's pixel grid (north up)
    width: int               # pixels spanned by all tiles: (cols-1)*stride + tile
    height: int
    tile: int
    stride: int
    rows: int
    cols: int
    warp: bool               # read through a warped view rather than the raster's own grid
    resampling: Resampling = Resampling.bilinear
    zoom: int | None = None
    x0: int = 0              # XYZ column and row of tile (0, 0)
    y0: int = 0
    notes: tuple[str, ...] = ()

    @property
    def pixel_size(self) -> float:
        return float(self.transform.a)

    @property
    def total(self) -> int:
        return self.rows * self.cols

    def bounds(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, ...]:
        """(minx, miny, maxx, maxy) of tiles, computed like rasterio.windows.bounds."""
        c0 = np.asarray(cols, np.float64) * self.stride
        r0 = np.asarray(rows, np.float64) * self.stride
        x0, y0 = self.to_crs(c0, r0)
        x1, y1 = self.to_crs(c0 + self.tile, r0 + self.tile)
        return np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1)

    def feature_bounds(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, ...]:
        """`bounds` of the features written: XYZ tiles east of the antimeridian (columns past
        the world's last) are placed at their wrapped position, where their z/x/y key says."""
        minx, miny, maxx, maxy = self.bounds(rows, cols)
        if self.kind == "xyz" and self.zoom is not None:
            past = (np.asarray(cols, np.int64) + self.x0) >= 2 ** self.zoom
            if past.any():
                shift = np.where(past, 2 * MERCATOR_HALF, 0.0)
                minx, maxx = minx - shift, maxx - shift
        return minx, miny, maxx, maxy

    def to_crs(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (column, row; fractional) of the grid -> x, y in its CRS."""
        t = self.transform
        return t.a * px + t.b * py + t.c, t.d * px + t.e * py + t.f

    def keys(self, rows: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        cols = np.asarray(cols, np.int64)
        if self.kind == "xyz":
            assert self.zoom is not None
            return {"z": np.full(len(rows), self.zoom, np.int64), "x": (cols + self.x0) % 2 ** self.zoom,
                    "y": rows + self.y0}
        return {"row": rows, "col": cols}

    def key_strings(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        k = self.keys(rows, cols)
        if self.kind == "xyz":
            parts = zip(k["z"].tolist(), k["x"].tolist(), k["y"].tolist(), strict=True)
            return np.array([f"{z}/{x}/{y}" for z, x, y in parts], dtype=object)
        return np.array([f"{r}/{c}" for r, c in zip(k["row"].tolist(), k["col"].tolist(), strict=True)], dtype=object)


def tiles_along(n: int, tile: int, stride: int) -> int:
    """Tiles needed to cover n pixels (the last one may run past the edge)."""
    if n <= tile:
        return 1
    return math.ceil((n - tile) / stride) + 1


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RES_TOLERANCE * b


def utm_crs(lon: float, lat: float) -> CRS:
    lon = (lon + 180.0) % 360.0 - 180.0  # 181 degrees east is 179 west
    zone = min(max(int((lon + 180) // 6) + 1, 1), 60)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def _check_crs(src) -> CRS:
    if src.crs is None:
        raise DataError(f"raster {src.name} has no coordinate reference system",
                        "assign one (QGIS: Layer > Set CRS, then export; or gdal_edit.py -a_srs EPSG:xxxx FILE)")
    return src.crs


def pixel_size(transform) -> float:
    """A pixel's true width in CRS units, also for a rotated raster (where `a` alone is not)."""
    return math.hypot(transform.a, transform.d)


def pixel_grid(src, gsd: float | None, tile: int, stride: int) -> Grid:
    """Tiles of `tile` px every `stride` px at `gsd` metres per pixel over the raster."""
    if tile < 1 or stride < 1:
        raise ConfigError(f"tile ({tile}) and stride ({stride}) must be positive", "e.g. --tile 64 --stride 64")
    crs = _check_crs(src)
    t = src.transform
    north_up = t.b == 0 and t.d == 0 and t.a > 0 and t.e < 0
    notes: list[str] = []
    work = crs
    if crs.is_geographic:
        lon, lat = _centre_lonlat(src)
        work = utm_crs(lon, lat)
        notes.append(f"raster CRS {crs.to_string()} is geographic (degrees); tiles are cut on a metric grid "
                     f"in {work.to_string()} and the raster is warped onto it on the fly")
    if gsd is None:
        gsd = pixel_size(t) if not crs.is_geographic else _metric_resolution(src, work)
        notes.append(f"the model file has no ground resolution; using {gsd:.3g} m per pixel")
    same = work == crs and north_up and _close(abs(t.a), gsd) and _close(abs(t.e), gsd)
    if same:
        rows, cols = tiles_along(src.height, tile, stride), tiles_along(src.width, tile, stride)
        return Grid("pixel", crs, t, (cols - 1) * stride + tile, (rows - 1) * stride + tile, tile, stride,
                    rows, cols, warp=False, notes=tuple(notes))
    left, bottom, right, top = (src.bounds if work == crs and north_up else
                                transform_bounds(crs, work, *src.bounds, densify_pts=21))
    native = pixel_size(t) if work == crs else _metric_resolution(src, work)
    if work == crs and not _close(native, gsd):
        notes.append(f"raster resolution {native:.3g} m differs from the model's {gsd:.3g} m; "
                     "tiles are resampled on the fly")
    width = max(1, math.ceil((right - left) / gsd - 1e-9))
    height = max(1, math.ceil((top - bottom) / gsd - 1e-9))
    rows, cols = tiles_along(height, tile, stride), tiles_along(width, tile, stride)
    resampling = Resampling.average if gsd > 1.5 * native else Resampling.bilinear
    return Grid("pixel", work, Affine(gsd, 0, left, 0, -gsd, top), (cols - 1) * stride + tile,
                (rows - 1) * stride + tile, tile, stride, rows, cols, warp=True,
                resampling=resampling, notes=tuple(notes))


def _centre_lonlat(src) -> tuple[float, float]:
    w, s, e, n = transform_bounds(src.crs, WGS84, *src.bounds, densify_pts=21)
    return (w + e) / 2, (s + n) / 2


def _metric_resolution(src, work: CRS) -> float:
    """Approximate pixel size in metres of `src` when warped to the metric CRS `work`."""
    left, bottom, right, top = transform_bounds(src.crs, work, *src.bounds, densify_pts=21)
    return math.sqrt((right - left) * (top - bottom) / (src.width * src.height))


def lonlat_to_tile(lon: float, lat: float, zoom: int, wrap: bool = False) -> tuple[int, int]:
    """Slippy-map tile (x, y) containing a point; with `wrap`, x counts on past the
    antimeridian (n, n+1, ... for 180 degrees east and beyond) instead of stopping there."""
    n = 2 ** zoom
    lat = max(min(lat, MAX_LAT), -MAX_LAT)
    x = int(math.floor((lon + 180.0) / 360.0 * n))
    y = int((1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * n)
    return (min(max(x, 0), 2 * n - 1) if wrap else min(max(x, 0), n - 1)), min(max(y, 0), n - 1)


def lon_wrapped_crs(src) -> CRS | None:
    """For a raster in geographic coordinates reaching past 180 degrees east (or west of -180):
    its CRS with longitudes kept around the raster's centre (PROJ's lon_wrap), so a warp reads
    its pixels there instead of looking for them at -179 (or 179) degrees and finding nodata.
    None for every other raster."""
    crs = src.crs
    if crs is None or not crs.is_geographic:
        return None
    left, _, right, _ = src.bounds
    if min(left, right) >= -180.0 and max(left, right) <= 180.0:
        return None
    centre = (left + right) / 2.0
    return CRS.from_proj4(f"{crs.to_proj4()} +lon_wrap={centre:.12g}")


def xyz_grid(src, zoom: int, tile: int, gsd: float | None) -> Grid:
    """The XYZ tiles of zoom `zoom` over the raster, each warped to `tile` x `tile` px."""
    if not 0 <= zoom <= MAX_ZOOM:
        raise ConfigError(f"XYZ zoom {zoom} is out of range", f"use a zoom from 0 to {MAX_ZOOM}")
    crs = _check_crs(src)
    w, s, e, n = transform_bounds(crs, WGS84, *src.bounds, densify_pts=21)
    if e < w:  # across the antimeridian: the east edge counts on past 180 degrees
        e += 360.0
    if w < -180.0:  # west of -180 degrees: the same place past 180 degrees east
        w, e = w + 360.0, e + 360.0
    s, n = max(s, -MAX_LAT), min(n, MAX_LAT)
    if s >= n:
        raise DataError("the raster lies beyond the web-map latitude limit (85.05 degrees)",
                        "use a pixel grid (--tile/--stride) instead of --xyz-zoom")
    x0, y0 = lonlat_to_tile(w, n, zoom)
    # the maximum edge is exclusive: a raster ending exactly on a tile edge does not take the next tile
    eps = 1e-9
    x1, y1 = lonlat_to_tile(e - eps, s + eps, zoom, wrap=True)
    x1 = min(x1, x0 + 2 ** zoom - 1)  # at most the whole world once
    extent = 2 * MERCATOR_HALF / 2 ** zoom
    res = extent / tile
    notes = []
    lat = math.radians((s + n) / 2)
    ground = res * math.cos(lat)
    if gsd is not None and not (gsd / 1.5 <= ground <= gsd * 1.5):
        best = round(math.log2(2 * MERCATOR_HALF * math.cos(lat) / (tile * gsd)))
        notes.append(f"XYZ zoom {zoom} gives {ground:.3g} m per pixel here but the model was trained at "
                     f"{gsd:.3g} m; zoom {best} matches it best")
    rows, cols = y1 - y0 + 1, x1 - x0 + 1
    transform = Affine(res, 0, -MERCATOR_HALF + x0 * extent, 0, -res, MERCATOR_HALF - y0 * extent)
    native = _metric_resolution(src, WEB_MERCATOR)
    resampling = Resampling.average if res > 1.5 * native else Resampling.bilinear
    return Grid("xyz", WEB_MERCATOR, transform, cols * tile, rows * tile, tile, tile, rows, cols, warp=True,
                resampling=resampling, zoom=zoom, x0=x0, y0=y0, notes=tuple(notes))
