#!/usr/bin/env python3
"""How often the 95 % intervals of `asymkd assess` contain the truth, on a real map.

    .venv/bin/python tools/assess_coverage.py TILES.gpkg TRUTH [--field class] [--n 60] [--seeds 20]

TRUTH is a class raster (a GeoTIFF like classify's --class-raster: class names in its tags,
else the pixel values are the class names) or a point/polygon layer with a class field. Each
tile's true class is the truth under its centre; tiles with none are left out of the
population. For seeds 0..N-1 the tool draws a sample as `asymkd sample` does, labels it from
the truth, estimates as `asymkd assess` does, and counts the intervals of the overall accuracy
(and of each class's area) that contain the true value over all tiles, each tile weighted by
its area. About 95 % should. Not part of the test suite: it needs a classified map and its truth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from asymkd.assess import Assessment, draw_sample, estimate
from asymkd.assess.layers import Tiles, class_text, read_reference, read_tiles
from asymkd.events import Events

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img")


def _centres(tiles: Tiles) -> tuple[np.ndarray, np.ndarray]:
    import shapely
    xy = shapely.get_coordinates(shapely.centroid(tiles.geoms))
    return xy[:, 0], xy[:, 1]


def _raster_names(src: Any) -> dict[int, str]:
    """Pixel value -> class name from the tags classify writes on its class raster."""
    tags = src.tags()
    if tags.get("class_names"):
        return dict(enumerate(tags["class_names"].split(",")))
    band = src.tags(1)
    return {int(k.split("_", 1)[1]): v for k, v in band.items() if k.startswith("class_") and k[6:].isdigit()}


def truth_from_raster(tiles: Tiles, path: Path) -> np.ndarray:
    import rasterio
    from pyproj import Transformer
    x, y = _centres(tiles)
    with rasterio.open(path) as src:
        if tiles.crs and src.crs and src.crs.to_wkt() != tiles.crs:
            x, y = Transformer.from_crs(tiles.crs, src.crs.to_wkt(), always_xy=True).transform(x, y)
        names = _raster_names(src)
        values = np.array([v[0] for v in src.sample(zip(x, y, strict=True), indexes=1, masked=True)], dtype=object)
        inside = [src.bounds.left <= a < src.bounds.right and src.bounds.bottom < b <= src.bounds.top
                  for a, b in zip(x, y, strict=True)]
    return np.array([None if not ok or v is np.ma.masked else names.get(int(v), class_text(v))
                     for v, ok in zip(values, inside, strict=True)], dtype=object)


def truth_from_vector(tiles: Tiles, path: Path, field: str, layer: str | None) -> np.ndarray:
    import shapely
    ref = read_reference(path, field, tiles, layer, Events(stream=None, progress_bars=False))
    out = np.full(len(tiles.geoms), None, dtype=object)
    present = np.array([g is not None for g in ref.geoms], bool) & (ref.labels != None)  # noqa: E711
    if not present.any():
        return out
    centres = shapely.centroid(tiles.geoms)
    tile, poly = shapely.STRtree(ref.geoms[present]).query(centres, predicate="within")
    order = np.lexsort((poly, tile))
    tile, poly = tile[order], poly[order]
    first = np.unique(tile, return_index=True)[1]
    out[tile[first]] = ref.labels[present][poly[first]]
    return out


def _inside(interval: Any, truth: float) -> bool | None:
    if interval.low is None:
        return None
    return bool(interval.low - 1e-12 <= truth <= interval.high + 1e-12)


def run(args: argparse.Namespace) -> int:
    tiles = read_tiles(args.tiles, args.layer)
    truth_path = Path(args.truth)
    truth = (truth_from_raster(tiles, truth_path) if truth_path.suffix.lower() in RASTER_SUFFIXES
             else truth_from_vector(tiles, truth_path, args.field, args.truth_layer))
    keep = truth != None  # noqa: E711
    print(f"{int(keep.sum())} of {len(keep)} tiles have a true class; the others are left out")
    mapped, true_class, areas = tiles.map_class[keep], truth[keep], tiles.areas[keep]
    classes = tuple(c for c in tiles.classes if np.any(mapped == c))
    true_oa = float(np.sum(areas * (mapped == true_class)) / areas.sum())
    per_tile = float(np.mean(mapped == true_class))
    mapped_areas = {c: float(areas[mapped == c].sum()) for c in classes}
    true_areas = {c: float(areas[true_class == c].sum()) for c in set(true_class.tolist())}
    print(f"true overall accuracy {100 * true_oa:.2f} % by area ({100 * per_tile:.2f} % of tiles)")
    oa_hits, undefined, area_hits, area_total = 0, 0, 0, 0
    for seed in range(args.seeds):
        picked, _ = draw_sample(mapped, areas, args.n, design=args.design, min_per_class=args.min_per_class,
                                seed=seed, classes=classes)
        result = estimate(mapped_areas, mapped[picked].tolist(), true_class[picked].tolist(), design=args.design,
                          area_unit=tiles.area_unit)
        hit = _inside(result.overall, true_oa)
        oa_hits += bool(hit)
        undefined += hit is None
        a_hits, a_total = _area_coverage(result, true_areas)
        area_hits, area_total = area_hits + a_hits, area_total + a_total
        print(_line(seed, result, hit))
    print(f"\n{oa_hits} of {args.seeds} 95 % intervals of the overall accuracy contain the true {100 * true_oa:.2f} %"
          + (f" ({undefined} without an interval: a class with 1 label)" if undefined else ""))
    print(f"{area_hits} of {area_total} 95 % intervals of class areas contain the true area")
    return 0


def _area_coverage(result: Assessment, true_areas: dict[str, float]) -> tuple[int, int]:
    hits = total = 0
    for c in result.per_class:
        inside = _inside(c.area, true_areas.get(c.name, 0.0))
        if inside is not None:
            hits, total = hits + inside, total + 1
    return hits, total


def _line(seed: int, result: Assessment, hit: bool | None) -> str:
    o = result.overall
    interval = ("no interval" if o.low is None or o.high is None
                else f"[{100 * o.low:.2f}, {100 * o.high:.2f}]")
    mark = {True: "contains", False: "misses", None: ""}[hit]
    return f"seed {seed:2d}: {100 * (o.value or 0.0):.2f} % {interval} {mark}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tiles", help="the GeoPackage written by `asymkd classify`")
    p.add_argument("truth", help="class raster, or point/polygon layer with a class field")
    p.add_argument("--field", default="class", help="class field of a vector truth (default %(default)s)")
    p.add_argument("--truth-layer", default=None, help="layer of a vector truth (default: its first)")
    p.add_argument("--layer", default=None, help="tile layer (default: tiles)")
    p.add_argument("--n", type=int, default=60, help="sample size per draw (default %(default)s)")
    p.add_argument("--design", choices=("stratified", "random"), default="stratified")
    p.add_argument("--min-per-class", type=int, default=5, help="(default %(default)s)")
    p.add_argument("--seeds", type=int, default=20, help="draws, seeds 0..N-1 (default %(default)s)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
