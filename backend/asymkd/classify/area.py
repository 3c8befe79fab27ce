"""The area to classify (whole raster, a bounding box, or a polygon mask) and the tiles of
a grid that it selects."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import shapely
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.warp import transform_bounds

from ..errors import ConfigError, DataError
from .grid import Grid


@dataclasses.dataclass
class TilePlan:
    """Selected tiles, row by row: `cols[i]` are the selected columns of row `rows[i]`
    (None = every column of the grid, kept implicit so a whole raster costs no memory)."""

    grid: Grid
    rows: list[int]
    cols: list[np.ndarray | None]
    total: int

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        every = np.arange(self.grid.cols, dtype=np.int64)
        for r, c in zip(self.rows, self.cols, strict=True):
            yield r, (every if c is None else c)


def parse_bbox(text: str | Sequence[float]) -> tuple[float, float, float, float]:
    try:
        vals = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError as exc:
        raise ConfigError(f"bounding box '{text}' is not four numbers", "write --bbox minx,miny,maxx,maxy") from exc
    if len(vals) != 4:
        raise ConfigError(f"bounding box '{text}' has {len(vals)} numbers, not 4", "write --bbox minx,miny,maxx,maxy")
    if not all(math.isfinite(v) for v in vals):
        raise ConfigError(f"bounding box {vals} holds a value that is not a finite number",
                          "write --bbox minx,miny,maxx,maxy with four finite numbers")
    minx, miny, maxx, maxy = vals
    if not (minx < maxx and miny < maxy):
        raise ConfigError(f"bounding box {vals} is empty or inverted",
                          "write --bbox minx,miny,maxx,maxy with min < max")
    return minx, miny, maxx, maxy


def _crs(value: str | CRS | None, what: str) -> CRS | None:
    if value is None or isinstance(value, CRS):
        return value
    try:
        return CRS.from_user_input(value)
    except Exception as exc:  # rasterio raises CRSError for unknown strings
        raise ConfigError(f"{what} '{value}' is not a CRS", "write e.g. EPSG:4326 or EPSG:32632") from exc


def _reproject(geom, src: CRS, dst: CRS):
    if src == dst:
        return geom
    tr = Transformer.from_crs(src, dst, always_xy=True)
    return shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))


def footprint(src, grid: Grid):
    """The raster's outline in the grid CRS (densified so a warped outline stays close)."""
    poly = shapely.segmentize(shapely.box(*src.bounds), max_segment_length=max(
        (src.bounds[2] - src.bounds[0]) / 32, (src.bounds[3] - src.bounds[1]) / 32))
    return _reproject(poly, src.crs, grid.crs)


def read_mask(path: str | Path, layer: str | None = None):
    """Union of the polygons of a vector file, with its CRS (None when it has none)."""
    import pyogrio
    path = Path(path)
    if not path.exists():
        raise DataError(f"mask file {path} does not exist",
                        "give a vector file with polygons (GeoPackage, shapefile, GeoJSON)")
    try:
        info, _, wkb, _ = pyogrio.raw.read(str(path), layer=layer, columns=[], read_geometry=True)
    except Exception as exc:  # pyogrio raises DataSourceError / DataLayerError
        raise DataError(f"cannot read mask {path}: {exc}", "give a vector file with polygons") from exc
    geoms = shapely.from_wkb(wkb) if wkb is not None else np.array([])
    polys = [g for g in geoms if g is not None and not g.is_empty and g.geom_type in ("Polygon", "MultiPolygon")]
    if not polys:
        raise DataError(f"mask {path} has no polygons", "draw the area to classify as polygons")
    geom = shapely.union_all(shapely.make_valid(np.array(polys, dtype=object)))
    return geom, (CRS.from_user_input(info["crs"]) if info.get("crs") else None)


def resolve_area(src, grid: Grid, bbox=None, bbox_crs=None, mask=None, mask_layer: str | None = None,
                 warn=None):
    """The area to classify in the grid CRS, or None for the whole raster. Raises when the
    area misses the raster."""
    if bbox is not None and mask is not None:
        raise ConfigError("both a bounding box and a mask were given", "give one of --bbox or --mask")
    if bbox is None and mask is None:
        return None
    if bbox is not None:
        crs = _crs(bbox_crs, "--bbox-crs") or src.crs
        box = parse_bbox(bbox)
        if crs == grid.crs:
            area = shapely.box(*box)
        else:
            area = shapely.box(*transform_bounds(crs, grid.crs, *box, densify_pts=21))
        what = f"bounding box {list(box)} ({crs.to_string()})"
    else:
        geom, crs = read_mask(mask, mask_layer)
        if crs is None:
            crs = src.crs
            if warn:
                warn(f"mask {mask} has no CRS; assuming the raster's ({src.crs.to_string()})")
        area = _reproject(geom, crs, grid.crs)
        what = f"mask {mask}"
    outline = footprint(src, grid)
    if not shapely.intersects(area, outline) or shapely.touches(area, outline):
        fb = [round(v, 6) for v in outline.bounds]
        ab = [round(v, 6) for v in area.bounds]
        raise DataError(f"the {what} does not intersect the raster (area {ab}, raster {fb} in {grid.crs.to_string()})",
                        "check the coordinates and the CRS of the area (--bbox-crs), or classify the whole raster")
    return area


def plan_tiles(grid: Grid, area=None) -> TilePlan:
    """Tiles whose interior meets the area (all tiles when area is None)."""
    if area is None:
        return TilePlan(grid, list(range(grid.rows)), [None] * grid.rows, grid.total)
    shapely.prepare(area)
    rows, cols, total = [], [], 0
    minx, miny, maxx, maxy = area.bounds
    t, span = grid.transform, grid.stride * grid.pixel_size
    size = grid.tile * grid.pixel_size
    # candidate rows/columns from the area's bounds, then an exact test per tile
    c_lo = max(0, int(np.floor((minx - t.c - size) / span)))
    c_hi = min(grid.cols - 1, int(np.ceil((maxx - t.c) / span)))
    r_lo = max(0, int(np.floor((t.f - maxy - size) / span)))
    r_hi = min(grid.rows - 1, int(np.ceil((t.f - miny) / span)))
    cand = np.arange(c_lo, c_hi + 1, dtype=np.int64)
    for r in range(r_lo, r_hi + 1):
        bx = shapely.box(*grid.bounds(np.full(len(cand), r), cand))
        hit = shapely.intersects(bx, area) & ~shapely.touches(bx, area)
        if hit.any():
            rows.append(r)
            cols.append(cand[hit])
            total += int(hit.sum())
    return TilePlan(grid, rows, cols, total)
