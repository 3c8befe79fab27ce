"""`asymkd sample TILES.gpkg --n N --out SAMPLE.gpkg`: the tiles to label for an accuracy
assessment, drawn at random by map class."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from ..assess.sampling import DESIGNS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tiles", metavar="TILES.gpkg", help="the GeoPackage written by `asymkd classify`")
    parser.add_argument("--n", type=int, required=True, metavar="N", help="tiles to sample")
    parser.add_argument("--design", choices=DESIGNS, default="stratified",
                        help="stratified: at least --min-per-class tiles of each map class, the rest in proportion "
                             "to the class's mapped area; random: simple random (default %(default)s)")
    parser.add_argument("--min-per-class", type=int, default=30, metavar="K",
                        help="with --design stratified, tiles of each class at least (all of a smaller class's; "
                             "default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed draws the same tiles "
                                                              "(default %(default)s)")
    parser.add_argument("--layer", default=None, metavar="NAME", help="tile layer (default: tiles)")
    parser.add_argument("--out", required=True, metavar="SAMPLE.gpkg",
                        help="the sample: layer `sample` with an empty `reference` field to fill, and its design")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing sample (and its labels)")


def format_allocation(result) -> str:
    d = result.design
    width = max([len("class")] + [len(c) for c in d.classes])
    unit = result.area_unit
    lines = [f"{d.design} sample of {d.n} of {result.tiles} classified tiles (seed {d.seed})", "",
             f"{'class':<{width}}  {'tiles':>8}  {'mapped ' + unit:>12}  {'weight':>7}  {'sampled':>7}"]
    for row in d.strata_rows():
        lines.append(f"{row['map_class']:<{width}}  {row['tiles']:>8d}  {row['mapped_area']:>12.1f}  "
                     f"{row['weight']:>7.4f}  {row['sample_size']:>7d}")
    lines += ["", f"written to {result.path}: label each tile's class in its field `reference`, then run "
                  f"`asymkd assess TILES.gpkg --reference {result.path} --out DIR`"]
    return "\n".join(lines)


def run(args: argparse.Namespace, events, out: TextIO | None = None) -> int:
    from ..assess.jobs import sample_job
    result = sample_job(args.tiles, args.out, args.n, design=args.design, min_per_class=args.min_per_class,
                        seed=args.seed, layer=args.layer, overwrite=args.overwrite, events=events)
    if args.events != "-":  # with `--events -` stdout carries the JSON-lines stream only
        print(format_allocation(result), file=out or sys.stdout)
    return 0
