"""Merged regions (tiles of one class dissolved into polygons) and overlap voting."""

from __future__ import annotations

import io
import json
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

import test_classify as tc  # the tiny exported student and the raster helpers
from asymkd.classify import classify, stats
from asymkd.classify.grid import MERCATOR_HALF, Grid
from asymkd.classify.regions import LAYER, dissolve, write_regions
from asymkd.errors import ConfigError

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
    """Ellipsoidal area of each tile, its edges followed at 4 points each (as the class area
    table does), written independently of the code under test."""
    tr = Transformer.from_crs(crs.to_wkt(), "EPSG:4326", always_xy=True)
    geod = Geod(ellps="WGS84")
    out = []
    for g in geoms:
        x0, y0, x1, y1 = g.bounds
        f = np.arange(4) / 4
        x = np.concatenate([x0 + f * (x1 - x0), np.full(4, x1), x1 - f * (x1 - x0), np.full(4, x0)])
        y = np.concatenate([np.full(4, y0), y0 + f * (y1 - y0), np.full(4, y1), y1 - f * (y1 - y0)])
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
    rule_ha = stats.ClassAreas(grid.crs, ["A", "B"]).tile_areas_m2(*grid.bounds(*np.nonzero(classes >= 0))) / 1e4
    for k in (0, 1):
        mine = classes.ravel()[classes.ravel() >= 0] == k
        # exactly the area table's rule; the geodesic polygons' within the rule's stated bound
        assert f["area_ha"][f["class_id"] == k].sum() == pytest.approx(rule_ha[mine].sum(), rel=1e-12)
        assert f["area_ha"][f["class_id"] == k].sum() == pytest.approx(tile_ha[mine].sum(), rel=1e-7)
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
        assert f["area_ha"][f["class_id"] == k].sum() == pytest.approx(geodesic_ha(tiles, grid.crs).sum(), rel=1e-8)


def test_dissolve_is_the_same_for_any_strip_height():
    classes = blobs(31, 17, 4, seed=7)
    whole = sorted((g.normalize().wkb, k) for g, k in dissolve(classes, NODATA, 10**6))
    for strip in (1, 17, 17 * 4 + 3):
        parts = list(dissolve(classes, NODATA, strip))
        assert len(parts) == len(whole)
        assert sorted(shapely.area([g for g, _ in parts]).tolist()) == sorted(
            shapely.area([shapely.from_wkb(w) for w, _ in whole]).tolist())


# -- through classify ------------------------------------------------------------------
model = tc.model  # module-scoped fixture: a tiny random student exported to ONNX
T = tc.T


def test_classify_regions_layer_matches_the_tile_layer(model, tmp_path):
    data = tc.texture(6 * T, 7 * T, seed=2)
    data[:, :T, :2 * T] = 0  # two tiles of nodata: in no region
    src = tc.write_raster(tmp_path / "r.tif", data, nodata=0)
    res = classify(model[0], src, tmp_path / "out.gpkg", regions=True)
    assert res.tiles_skipped == 2 and res.regions and res.timings["regions_s"] >= 0
    tiles, f, _ = tc.read_layer(tmp_path / "out.gpkg")
    geoms, g, _ = read_regions(tmp_path / "out.gpkg")
    assert res.regions == len(geoms) and g["tiles"].sum() == len(tiles)
    for k in np.unique(f["class_id"]):
        assert shapely.symmetric_difference(shapely.union_all(tiles[f["class_id"] == k]),
                                            shapely.union_all(geoms[g["class_id"] == k])).is_empty
    assert {"r.tif", "out.gpkg", "out.qml"} <= tc.only_files(tmp_path)
    assert not [n for n in tc.only_files(tmp_path) if n.startswith(".")]  # no temporary file left
    styles = pyogrio.raw.read(str(tmp_path / "out.gpkg"), layer="layer_styles", read_geometry=False)
    names = dict(zip(styles[0]["fields"], styles[3], strict=True))["f_table_name"].tolist()
    assert "regions" in names and "tiles" in names


def test_classify_regions_of_nothing_is_an_empty_layer_with_a_warning(model, tmp_path):
    src = tc.write_raster(tmp_path / "e.tif", np.zeros((3, 2 * T, 2 * T), np.uint8), nodata=0)
    stream = io.StringIO()
    res = classify(model[0], src, tmp_path / "e.gpkg", regions=True,
                   events=tc.Events(stream=stream, progress_bars=False))
    assert res.tiles_classified == 0 and res.regions == 0
    warnings = [e["message"] for e in map(json.loads, stream.getvalue().splitlines()) if e.get("event") == "warning"]
    assert any("regions layer is empty: no tile was classified" in w for w in warnings)
    assert any("regions layer is empty" in n for n in res.notes)
    assert pyogrio.read_info(str(tmp_path / "e.gpkg"), layer=LAYER)["features"] == 0


def test_classify_min_region_area(model, tmp_path):
    src = tc.write_raster(tmp_path / "r.tif", tc.texture(4 * T, 4 * T, seed=4))
    big = classify(model[0], src, tmp_path / "all.gpkg", regions=True)
    _, g, _ = read_regions(tmp_path / "all.gpkg")
    cut = float(np.median(g["area_ha"])) + 1e-6
    res = classify(model[0], src, tmp_path / "big.gpkg", regions=True, min_region_ha=cut)
    _, h, _ = read_regions(tmp_path / "big.gpkg")
    assert res.regions == (g["area_ha"] >= cut).sum() < big.regions
    assert (h["area_ha"] >= cut).all()


def test_a_failed_dissolve_leaves_no_output(model, tmp_path, monkeypatch):
    import asymkd.classify.run as run

    def broken(*args, **kwargs):
        raise RuntimeError("dissolve failed")

    monkeypatch.setattr(run, "write_regions", broken)
    src = tc.write_raster(tmp_path / "r.tif", tc.texture(2 * T, 2 * T))
    with pytest.raises(RuntimeError):
        classify(model[0], src, tmp_path / "out.gpkg", regions=True)
    assert tc.only_files(tmp_path) == {"r.tif"}


# -- overlap voting -----------------------------------------------------------------------
def window_probs(onnx_path: Path, image: np.ndarray, stride: int) -> np.ndarray:
    """Probabilities of every T-px window at `stride` steps (rows, cols, classes), by
    onnxruntime on float32 tiles: the brute force the voted cells are compared with."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    _, h, w = image.shape
    rows, cols = (h - T) // stride + 1, (w - T) // stride + 1
    tiles = np.stack([image[:, r * stride:r * stride + T, c * stride:c * stride + T]
                      for r in range(rows) for c in range(cols)]).astype(np.float32)
    return sess.run(["probabilities"], {"image": tiles})[0].reshape(rows, cols, -1)


def brute_vote(probs: np.ndarray, k: int, used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the windows that contain each stride cell (only windows marked used)."""
    rows, cols, n = probs.shape
    total = np.zeros((rows + k - 1, cols + k - 1, n))
    count = np.zeros((rows + k - 1, cols + k - 1))
    for r in range(rows):
        for c in range(cols):
            if used[r, c]:
                total[r:r + k, c:c + k] += probs[r, c]
                count[r:r + k, c:c + k] += 1
    with np.errstate(invalid="ignore"):
        return total / count[..., None], count


@pytest.mark.parametrize("stride", [16, 8])
def test_voted_cells_are_the_mean_of_their_windows(model, tmp_path, stride):
    k = T // stride
    image = tc.texture(T + 4 * stride, T + 5 * stride, seed=6)
    src = tc.write_raster(tmp_path / "r.tif", image)
    res = classify(model[0], src, tmp_path / "v.gpkg", stride=stride, vote=True, class_raster=tmp_path / "v.tif")
    probs = window_probs(model[0], image, stride)
    mean, count = brute_vote(probs, k, np.ones(probs.shape[:2], bool))
    cells, f, _ = tc.read_layer(tmp_path / "v.gpkg")
    assert res.tiles_classified == len(cells) == mean.shape[0] * mean.shape[1] == res.tiles_total
    r, c = f["row"], f["col"]
    want = mean[r, c]
    order = np.argsort(-want, axis=1, kind="stable")
    np.testing.assert_array_equal(f["class_id"], order[:, 0])
    np.testing.assert_allclose(f["confidence"], want[np.arange(len(r)), order[:, 0]], atol=1e-5)
    np.testing.assert_allclose(f["second_prob"], want[np.arange(len(r)), order[:, 1]], atol=1e-5)
    ent = -(want * np.log(np.clip(want, 1e-12, 1))).sum(1) / np.log(want.shape[1])
    np.testing.assert_allclose(f["entropy"], ent, atol=1e-5)
    # cells are the stride squares of the window grid
    origin = tc.from_origin(500000, 5200000, 10, 10)
    for g, rr, cc in zip(cells[:5], r[:5], c[:5], strict=True):
        assert g.bounds == tc.window_bounds(tc.Window(cc * stride, rr * stride, stride, stride), origin)
    with tc.rasterio.open(tmp_path / "v.tif") as ds:
        assert ds.shape == mean.shape[:2]
        np.testing.assert_array_equal(ds.read(1)[r, c], f["class_id"])
    assert count.max() == k * k  # inner cells: (tile / stride)^2 windows


def test_vote_skips_cells_whose_windows_were_all_skipped(model, tmp_path):
    stride, k = 16, 2
    image = tc.texture(T + 3 * stride, T + 5 * stride, seed=8)
    image[:, :, :3 * stride] = 0  # nodata: windows 0 and 1 empty, window 2 half valid
    src = tc.write_raster(tmp_path / "r.tif", image, nodata=0)
    res = classify(model[0], src, tmp_path / "v.gpkg", stride=stride, vote=True, min_valid=0.6)
    probs = window_probs(model[0], image, stride)
    used = np.zeros(probs.shape[:2], bool)
    used[:, 3:] = True  # windows starting at 48 px and beyond are fully valid
    mean, count = brute_vote(probs, k, used)
    cells, f, _ = tc.read_layer(tmp_path / "v.gpkg")
    assert res.tiles_classified == int((count > 0).sum()) == len(cells)
    assert res.tiles_skipped == int((count == 0).sum()) and res.tiles_total == count.size
    assert f["col"].min() == 3  # cell 3 (48..64 px) from window 3 alone
    np.testing.assert_allclose(f["confidence"], mean[f["row"], f["col"]].max(1), atol=1e-5)
    np.testing.assert_allclose(f["valid_fraction"], 1.0)


def test_without_vote_a_stride_gives_overlapping_windows_as_before(model, tmp_path):
    stride = 16
    image = tc.texture(T + 2 * stride, T + 3 * stride, seed=9)
    src = tc.write_raster(tmp_path / "r.tif", image)
    res = classify(model[0], src, tmp_path / "w.gpkg", stride=stride)
    probs = window_probs(model[0], image, stride)
    tiles, f, _ = tc.read_layer(tmp_path / "w.gpkg")
    assert res.tiles_total == len(tiles) == probs.shape[0] * probs.shape[1]
    np.testing.assert_allclose(f["confidence"], probs[f["row"], f["col"]].max(1), atol=1e-5)
    assert tiles[0].bounds[2] - tiles[0].bounds[0] == T * 10  # whole windows


def test_vote_and_regions_together(model, tmp_path):
    src = tc.write_raster(tmp_path / "r.tif", tc.texture(3 * T, 3 * T, seed=10))
    res = classify(model[0], src, tmp_path / "vr.gpkg", stride=T // 2, vote=True, regions=True)
    cells, f, _ = tc.read_layer(tmp_path / "vr.gpkg")
    geoms, g, _ = read_regions(tmp_path / "vr.gpkg")
    assert g["tiles"].sum() == len(cells) == res.tiles_classified
    assert shapely.symmetric_difference(shapely.union_all(cells), shapely.union_all(geoms)).is_empty


@pytest.mark.parametrize("opts", [dict(vote=True), dict(vote=True, stride=T), dict(vote=True, stride=12),
                                  dict(vote=True, tile=16, stride=16), dict(vote=True, xyz_zoom=14),
                                  dict(vote=True, stride=16, workers=2), dict(min_region_ha=1.0),
                                  dict(regions=True, min_region_ha=-1.0),
                                  dict(regions=True, min_region_ha=float("nan"))])
def test_bad_vote_and_region_options(model, tmp_path, opts):
    src = tc.write_raster(tmp_path / "r.tif", tc.texture(2 * T, 2 * T))
    with pytest.raises(ConfigError):
        classify(model[0], src, tmp_path / "x.gpkg", **opts)
    assert tc.only_files(tmp_path) == {"r.tif"}


def test_cli_flags(model, tmp_path, capsys):
    src = tc.write_raster(tmp_path / "r.tif", tc.texture(2 * T, 2 * T))
    out = tmp_path / "c.gpkg"
    assert tc.cli.main(["classify", str(model[0]), str(src), "--out", str(out), "--regions",
                        "--min-region-ha", "0.5", "--stride", str(T // 2), "--vote"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["regions"] == pyogrio.read_info(str(out), layer=LAYER)["features"] > 0
    assert pyogrio.read_info(str(out), layer="tiles")["features"] == 16  # 4 x 4 cells of 16 px
    assert tc.cli.main(["classify", str(model[0]), str(src), "--out", str(tmp_path / "d.gpkg"), "--vote"]) == 2
    assert "--vote needs overlapping windows" in capsys.readouterr().err


def test_vote_in_a_bbox_covers_exactly_the_planned_windows(model, tmp_path):
    src = tc.write_raster(tmp_path / "r.tif", tc.texture(6 * T, 6 * T, seed=11))
    bbox = "500400,5198700,501100,5199500"  # a box inside the raster, off the window edges
    windows = classify(model[0], src, tmp_path / "w.gpkg", stride=T // 2, bbox=bbox)
    voted = classify(model[0], src, tmp_path / "v.gpkg", stride=T // 2, bbox=bbox, vote=True)
    w, _, _ = tc.read_layer(tmp_path / "w.gpkg")
    v, f, _ = tc.read_layer(tmp_path / "v.gpkg")
    assert 0 < windows.tiles_classified < 11 * 11 and voted.tiles_skipped == 0
    assert voted.tiles_total == voted.tiles_classified == len(v) == len(set(f["tile_key"].tolist()))
    assert shapely.symmetric_difference(shapely.union_all(w), shapely.union_all(v)).is_empty
