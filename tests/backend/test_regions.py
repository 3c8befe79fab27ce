"""Merged regions (tiles of one class dissolved into polygons) and overlap voting."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import shapely
from pyproj import Geod, Transformer
from rasterio.crs import CRS
from rasterio.transform import from_origin

from asymkd.classify.grid import MERCATOR_HALF, Grid
from asymkd.classify.regions import LAYER, dissolve, write_regions

NODATA = 255
UTM = CRS.from_epsg(32632)


def pixel_grid(rows: int, cols: int, tile: int = 32, stride: int | None = None) -> Grid:
    stride = stride or tile
    return Grid("pixel", UTM, from_origin(500123.5, 5200456.25, 10, 10), (cols - 1) * stride + tile,
                (rows - 1) * stride + tile, tile, stride, rows, cols, warp=False)


def web_grid(rows: int, cols: int, zoom: int = 14, x0: int = 8500, y0: int = 5600, tile: int = 256) -> Grid:
    from affine import Affine
    extent = 2 * MERCATOR_HALF / 2 ** zoom
    res = extent / tile
    transform = Affine(res, 0, -MERCATOR_HALF + x0 * extent, 0, -res, MERCATOR_HALF - y0 * extent)
    return Grid("xyz", CRS.from_epsg(3857), transform, cols * tile, rows * tile, tile, tile, rows, cols,
                warp=True, zoom=zoom, x0=x0, y0=y0)


def blobs(rows: int, cols: int, classes: int, seed: int, holes: float = 0.1) -> np.ndarray:
    """A class grid of small blobs (runs of a class) with some tiles without a class."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, classes, (rows // 2 + 1, cols // 2 + 1))
    grid = np.repeat(np.repeat(coarse, 2, 0), 2, 1)[:rows, :cols]
    flip = rng.random((rows, cols)) < 0.2
    grid = np.where(flip, rng.integers(0, classes, (rows, cols)), grid)
    grid[rng.random((rows, cols)) < holes] = NODATA
    return grid.astype(np.uint8)


def components(classes: np.ndarray, k: int) -> int:
    """4-connected groups of class-k cells, counted by a plain flood fill."""
    seen = np.zeros(classes.shape, bool)
    count = 0
    for r0, c0 in zip(*np.nonzero(classes == k), strict=True):
        if seen[r0, c0]:
            continue
        count += 1
        todo = deque([(r0, c0)])
        seen[r0, c0] = True
        while todo:
            r, c = todo.popleft()
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if (0 <= rr < classes.shape[0] and 0 <= cc < classes.shape[1] and not seen[rr, cc]
                        and classes[rr, cc] == k):
                    seen[rr, cc] = True
                    todo.append((rr, cc))
    return count


def tile_boxes(grid: Grid, classes: np.ndarray, k: int) -> np.ndarray:
    rows, cols = np.nonzero(classes == k)
    return shapely.box(*grid.bounds(rows, cols))


def gpkg_with_tiles(path: Path) -> Path:
    """A GeoPackage that holds the tile layer already, as classify's temporary file does."""
    pyogrio.raw.write(str(path), geometry=np.array([], dtype=object), field_data=[np.zeros(0, np.int32)],
                      fields=["class_id"], layer="tiles", driver="GPKG", geometry_type="Polygon",
                      crs=UTM.to_wkt())
    return path


def read_regions(path: Path):
    meta, _, wkb, values = pyogrio.raw.read(str(path), layer=LAYER)
    return shapely.from_wkb(wkb), dict(zip(meta["fields"], values, strict=True)), meta


def geodesic_ha(geoms: np.ndarray, crs: CRS) -> np.ndarray:
    """Ellipsoidal area of each polygon, written independently of the code under test."""
    tr = Transformer.from_crs(crs.to_wkt(), "EPSG:4326", always_xy=True)
    geod = Geod(ellps="WGS84")
    out = []
    for g in geoms:
        x, y = np.asarray(g.exterior.coords).T
        lon, lat = tr.transform(x, y)
        out.append(abs(geod.polygon_area_perimeter(lon, lat)[0]) / 1e4)
    return np.array(out)


# -- dissolve ------------------------------------------------------------------------
@pytest.mark.parametrize("strip_tiles", [1, 29 * 3, 10**6])
def test_regions_cover_exactly_the_tiles_of_their_class(tmp_path, strip_tiles):
    classes = blobs(23, 29, 3, seed=1)
    grid = pixel_grid(23, 29)
    out = gpkg_with_tiles(tmp_path / f"r{strip_tiles}.gpkg")
    stats = write_regions(out, classes, NODATA, grid, ["A", "B", "C"], strip_tiles=strip_tiles)
    geoms, f, meta = read_regions(out)
    assert CRS.from_user_input(meta["crs"]) == UTM
    assert meta["fields"].tolist() == ["class_id", "class_name", "tiles", "area_ha"]
    assert stats.regions == len(geoms) and stats.dropped == 0
    assert set(shapely.get_type_id(geoms).tolist()) == {3}  # Polygon, each one valid
    assert shapely.is_valid(geoms).all()
    for k, name in enumerate("ABC"):
        mine = geoms[f["class_id"] == k]
        assert (f["class_name"][f["class_id"] == k] == name).all()
        tiles = shapely.union_all(tile_boxes(grid, classes, k))
        regions = shapely.union_all(mine)
        assert shapely.symmetric_difference(tiles, regions).is_empty
        assert regions.area == pytest.approx(tiles.area, rel=1e-6)
        # disjoint: the areas of the regions add up to the area of their union
        assert shapely.area(mine).sum() == pytest.approx(regions.area, rel=1e-9)
        assert f["tiles"][f["class_id"] == k].sum() == (classes == k).sum()
        assert len(mine) == components(classes, k)  # 4-connected, also across strips
    all_regions = shapely.union_all(geoms)
    assert shapely.area(geoms).sum() == pytest.approx(all_regions.area, rel=1e-9)  # classes do not overlap
    assert f["tiles"].sum() == (classes != NODATA).sum() == stats.tiles


def test_region_area_is_the_sum_of_its_tiles_on_the_ellipsoid(tmp_path):
    classes = blobs(12, 15, 2, seed=3, holes=0.0)
    grid = pixel_grid(12, 15, tile=640)  # 6.4 km tiles, where geodesic and planar areas differ
    out = gpkg_with_tiles(tmp_path / "a.gpkg")
    write_regions(out, classes, NODATA, grid, ["A", "B"], strip_tiles=15)
    geoms, f, _ = read_regions(out)
    tiles = shapely.box(*grid.bounds(*np.nonzero(classes >= 0)))
    tile_ha = geodesic_ha(tiles, UTM)
    for k in (0, 1):
        want = tile_ha[classes.ravel() == k].sum()
        assert f["area_ha"][f["class_id"] == k].sum() == pytest.approx(want, rel=1e-9)
    # one tile's area: 6.4 km x 6.4 km = 4096 ha on the map, a little more on the ground
    # (UTM shrinks distances by 0.9996 on the central meridian)
    assert tile_ha[0] == pytest.approx(4096 / 0.9996**2, rel=2e-3)


def test_holes_are_kept(tmp_path):
    classes = np.zeros((7, 7), np.uint8)
    classes[2:5, 2:5] = 1        # B inside a ring of A
    classes[3, 3] = 0            # and A again inside B: an island in the hole
    grid = pixel_grid(7, 7)
    out = gpkg_with_tiles(tmp_path / "h.gpkg")
    write_regions(out, classes, NODATA, grid, ["A", "B"], strip_tiles=7)  # strips of one row
    geoms, f, _ = read_regions(out)
    assert sorted(f["tiles"].tolist()) == [1, 8, 40]
    ring = geoms[(f["class_id"] == 0) & (f["tiles"] == 40)][0]
    b = geoms[f["class_id"] == 1][0]
    assert len(ring.interiors) == 1 and len(b.interiors) == 1
    assert shapely.Polygon(ring.interiors[0]).equals(shapely.Polygon(b.exterior))
    assert ring.area == pytest.approx(40 * 320.0**2)


def test_corner_touching_tiles_are_separate_regions(tmp_path):
    classes = np.array([[0, 1], [1, 0]], np.uint8)
    out = gpkg_with_tiles(tmp_path / "c.gpkg")
    write_regions(out, classes, NODATA, pixel_grid(2, 2), ["A", "B"])
    _, f, _ = read_regions(out)
    assert len(f["tiles"]) == 4 and (f["tiles"] == 1).all()


def test_min_area_drops_small_regions(tmp_path):
    classes = np.full((6, 6), NODATA, np.uint8)
    classes[0:3, 0:3] = 0  # 9 tiles
    classes[5, 5] = 1      # 1 tile
    classes[5, 0:2] = 1    # 2 tiles
    grid = pixel_grid(6, 6)  # 320 m tiles: 10.24 ha each on the map
    out = gpkg_with_tiles(tmp_path / "m.gpkg")
    stats = write_regions(out, classes, NODATA, grid, ["A", "B"], min_ha=15.0)
    _, f, _ = read_regions(out)
    assert sorted(f["tiles"].tolist()) == [2, 9]
    assert stats.dropped == 1 and stats.regions == 2
    assert (f["area_ha"] >= 15.0).all()


def test_no_classified_tile_gives_an_empty_layer(tmp_path):
    out = gpkg_with_tiles(tmp_path / "e.gpkg")
    stats = write_regions(out, np.full((4, 5), NODATA, np.uint8), NODATA, pixel_grid(4, 5), ["A"])
    assert stats.regions == 0
    assert pyogrio.read_info(str(out), layer=LAYER)["features"] == 0
    assert set(pyogrio.list_layers(str(out))[:, 0]) >= {"tiles", LAYER}


def test_xyz_grid_regions(tmp_path):
    classes = blobs(9, 11, 2, seed=5)
    grid = web_grid(9, 11)
    out = gpkg_with_tiles(tmp_path / "x.gpkg")
    write_regions(out, classes, NODATA, grid, ["A", "B"], strip_tiles=11 * 2)
    geoms, f, meta = read_regions(out)
    assert CRS.from_user_input(meta["crs"]) == CRS.from_epsg(3857)
    for k in (0, 1):
        tiles = tile_boxes(grid, classes, k)
        assert shapely.symmetric_difference(shapely.union_all(tiles),
                                            shapely.union_all(geoms[f["class_id"] == k])).is_empty
        assert f["area_ha"][f["class_id"] == k].sum() == pytest.approx(geodesic_ha(tiles, grid.crs).sum(), rel=1e-9)


def test_dissolve_is_the_same_for_any_strip_height():
    classes = blobs(31, 17, 4, seed=7)
    whole = sorted((g.normalize().wkb, k) for g, k in dissolve(classes, NODATA, 10**6))
    for strip in (1, 17, 17 * 4 + 3):
        parts = list(dissolve(classes, NODATA, strip))
        assert len(parts) == len(whole)
        assert sorted(shapely.area([g for g, _ in parts]).tolist()) == sorted(
            shapely.area([shapely.from_wkb(w) for w, _ in whole]).tolist())
