"""Merged regions: neighbouring tiles of one class dissolved into polygons.

The class of every tile is already held as a small grid (one byte per tile, the class
raster's array). It is polygonised strip by strip of tile rows (rasterio.features.shapes,
4-connectivity: tiles that share an edge join, tiles that touch only at a corner do not,
so every region is one valid polygon, holes kept). A region that reaches the bottom of its
strip stays open and is joined with the regions of the next strip that continue it; every
other region is final and written at once. Memory stays flat: one strip's polygons and the
regions crossing the current strip boundary.

Polygonising runs on tile indices (x = column, y = row: exact integers), and every corner
of a tile along a region's outline is kept as a vertex, mapped to the grid CRS with the
tile layer's own arithmetic (Grid.bounds): a region's outline is bit-identical to the
outline of its tiles. Each region's area is computed on the ellipsoid of the grid CRS's datum from those
vertices (EDGE_POINTS per tile edge, as the class area table measures each tile), so it
equals the sum of its tiles' ellipsoidal areas.

Tiles without a class (nodata, outside the area, too few valid pixels) belong to no region.
With overlapping tiles (stride < tile, no voting) each tile stands for the stride-sized
cell at its centre, as in the class raster, so regions never overlap.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from shapely import Polygon

from ..fileio import check_vector, write_gpkg_layer
from .grid import Grid
from .stats import EDGE_POINTS, Ellipsoid

LAYER = "regions"
STRIP_TILES = 65_536        # tiles polygonised at a time (bounds the memory of one strip)
CHUNK = 16_384               # regions per GeoPackage write
M2_PER_HA = 10_000.0


@dataclasses.dataclass
class RegionStats:
    regions: int = 0          # written
    dropped: int = 0          # smaller than the minimum area
    tiles: int = 0            # tiles in written regions
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)


def dissolve(classes: np.ndarray, nodata: int, strip_tiles: int = STRIP_TILES) -> Iterator[tuple[Polygon, int]]:
    """(polygon in tile-index coordinates, class id) of every 4-connected region of equal
    class in `classes` (rows x cols), cells equal to `nodata` left out."""
    rows, cols = classes.shape
    step = max(1, int(strip_tiles) // max(cols, 1))
    carried: list[tuple[Polygon, int]] = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        found = _polygonize(classes[r0:r1], nodata, r0)
        if carried:
            found = _join(carried, found, classes[r0 - 1], classes[r0], nodata, r0)
        carried = []
        for geom, cid in found:
            if r1 < rows and geom.bounds[3] == r1:
                carried.append((geom, cid))  # may continue in the next strip
            else:
                yield geom, cid


def _polygonize(strip: np.ndarray, nodata: int, r0: int) -> list[tuple[Polygon, int]]:
    from rasterio.features import shapes
    valid = strip != nodata
    if not valid.any():
        return []
    coords: list[np.ndarray] = []
    ring_of: list[int] = []       # vertices per ring
    poly_of: list[int] = []       # region of each ring
    values: list[int] = []        # class of each region
    for geojson, value in shapes(strip, mask=valid, connectivity=4, transform=Affine.translation(0, r0)):
        for ring in geojson["coordinates"]:  # a Polygon: the outline, then its holes
            coords.append(np.asarray(ring, np.float64))
            ring_of.append(len(ring))
            poly_of.append(len(values))
        values.append(int(value))
    if not values:
        return []
    # built in one call each (one Polygon(...) per region is several times slower)
    rings = shapely.linearrings(np.concatenate(coords), indices=np.repeat(np.arange(len(ring_of)), ring_of))
    polys = shapely.polygons(rings, indices=np.asarray(poly_of))
    return list(zip(polys.tolist(), values, strict=True))


def _owners(geoms: Sequence[Polygon], x: np.ndarray, y: float) -> np.ndarray:
    """Index of the polygon holding each cell centre (x, y)."""
    tree = shapely.STRtree(list(geoms))
    pts, idx = tree.query(shapely.points(x, np.full(len(x), y)), predicate="within")
    owner = np.full(len(x), -1, np.int64)
    owner[pts] = idx
    return owner


def _join(carried: list[tuple[Polygon, int]], found: list[tuple[Polygon, int]], above: np.ndarray,
          below: np.ndarray, nodata: int, r0: int) -> list[tuple[Polygon, int]]:
    """Regions of a new strip, with the carried regions they continue merged in (the
    carried ones they do not continue are final and come back unchanged)."""
    cs = np.nonzero((above == below) & (above != nodata))[0]
    parent = list(range(len(carried) + len(found)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if len(cs) and found:
        x = cs + 0.5
        up = _owners([g for g, _ in carried], x, r0 - 0.5)
        down = _owners([g for g, _ in found], x, r0 + 0.5) + len(carried)
        for a, b in set(zip(up.tolist(), down.tolist(), strict=True)):
            parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for i in range(len(parent)):
        groups.setdefault(root(i), []).append(i)
    both = carried + found
    out = []
    for members in groups.values():
        if len(members) == 1:
            out.append(both[members[0]])
            continue
        merged = shapely.union_all([both[i][0] for i in members])
        out.extend((part, both[members[0]][1]) for part in shapely.get_parts(merged))
    return out


def cell_mapper(grid: Grid):
    """Tile-index coordinates (column, row) -> grid CRS, with Grid.bounds' arithmetic. A
    tile is its stride-sized cell at the tile's centre when tiles overlap (stride < tile),
    as in the class raster; with stride == tile, exactly the tile."""
    s = float(grid.stride)
    shift = (grid.tile - grid.stride) / 2.0

    def to_crs(xy: np.ndarray) -> np.ndarray:
        c0 = xy[:, 0] * s + shift if shift else xy[:, 0] * s
        r0 = xy[:, 1] * s + shift if shift else xy[:, 1] * s
        return np.column_stack(grid.to_crs(c0, r0))

    return to_crs


def ellipsoid_area_ha(geoms: np.ndarray, crs: CRS) -> np.ndarray:
    """Area (ha) of polygons given in `crs` (projected), on the ellipsoid of the CRS's datum,
    holes subtracted, by the class area table's rule (stats.Ellipsoid), so the outlines come
    densified (EDGE_POINTS per tile edge) as the tiles' do."""
    ellipsoid = Ellipsoid(crs)
    lonlat = shapely.transform(geoms, lambda xy: np.column_stack(ellipsoid.lonlat(xy[:, 0], xy[:, 1])))
    rings, owner = shapely.get_rings(lonlat, return_index=True)  # outline first, then the holes
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    ends = np.searchsorted(ring_of, np.arange(len(rings) + 1))
    signed = ellipsoid.rings_m2(coords[:, 0], coords[:, 1], ends)
    first = np.r_[True, owner[1:] != owner[:-1]]  # each polygon's outline
    area = np.where(first, np.abs(signed), -np.abs(signed))  # a hole's area is taken away
    return np.bincount(owner, weights=area, minlength=len(geoms)) / M2_PER_HA


class RegionLayerWriter:
    """Writes regions to the `regions` layer of a GeoPackage, CHUNK at a time, with the
    minimum-area filter applied."""

    def __init__(self, path: Path, grid: Grid, class_names: Sequence[str], min_ha: float = 0.0):
        self.path = Path(path)
        self.grid = grid
        self.names = np.array(list(class_names), dtype=object)
        self.min_ha = float(min_ha)
        self.to_crs = cell_mapper(grid)
        self.stats = RegionStats()
        self._parts: list[tuple[Polygon, int]] = []
        self._write(np.array([], dtype=object), np.zeros(0, np.int32), np.zeros(0), np.zeros(0, np.int64),
                    append=False)  # the layer, even if empty

    def add(self, geom: Polygon, class_id: int) -> None:
        self._parts.append((geom, class_id))
        if len(self._parts) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self._parts:
            return
        index_geoms = np.array([g for g, _ in self._parts], dtype=object)
        cid = np.array([c for _, c in self._parts], np.int32)
        self._parts = []
        area = ellipsoid_area_ha(shapely.transform(shapely.segmentize(index_geoms, 1.0 / EDGE_POINTS), self.to_crs),
                                 self.grid.crs)
        self._write(shapely.transform(shapely.segmentize(index_geoms, 1.0), self.to_crs), cid, area,
                    np.rint(shapely.area(index_geoms)).astype(np.int64))

    def close(self) -> RegionStats:
        self.flush()
        check_vector(self.path, LAYER, self.stats.regions)
        return self.stats

    def _write(self, geoms: np.ndarray, cid: np.ndarray, area: np.ndarray, tiles: np.ndarray,
               append: bool = True) -> None:
        keep = area >= self.min_ha
        self.stats.dropped += int((~keep).sum())
        geoms, cid, area, tiles = geoms[keep], cid[keep], area[keep], tiles[keep]
        fields = {"class_id": cid, "class_name": self.names[cid] if len(cid) else np.array([], dtype=object),
                  "tiles": tiles, "area_ha": area}
        if append and not len(geoms):
            return
        write_gpkg_layer(self.path, shapely.to_wkb(geoms) if len(geoms) else np.array([], dtype=object),
                         list(fields.values()), list(fields), layer=LAYER, crs=self.grid.crs.to_wkt(),
                         geometry_type="Polygon", append=append)
        self.stats.regions += len(geoms)
        self.stats.tiles += int(tiles.sum())


def write_regions(path: Path, classes: np.ndarray, nodata: int, grid: Grid, class_names: Sequence[str],
                  style_qml: str | None = None, min_ha: float = 0.0,
                  strip_tiles: int = STRIP_TILES) -> RegionStats:
    """Dissolve the class grid (rows x cols of `grid`, `nodata` where no tile was
    classified) into the `regions` layer of the GeoPackage at `path` (which exists: the
    tile layer's file). An empty class grid gives an empty layer."""
    start = time.perf_counter()
    writer = RegionLayerWriter(path, grid, class_names, min_ha)
    if style_qml is not None:
        from .style import embed_style
        embed_style(path, LAYER, style_qml, name="asymkd regions")
    for geom, cid in dissolve(classes, nodata, strip_tiles):
        writer.add(geom, cid)
    stats = writer.close()
    stats.seconds = time.perf_counter() - start
    return stats
