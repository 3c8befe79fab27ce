"""`asymkd assess TILES.gpkg --reference REF.gpkg --out DIR`: accuracy with intervals and
area estimates of a classified map from reference labels (Olofsson et al. 2014)."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tiles", metavar="TILES.gpkg", help="the GeoPackage written by `asymkd classify`")
    parser.add_argument("--reference", required=True, metavar="REF.gpkg",
                        help="a sample written by `asymkd sample` with its reference field filled, or any point or "
                             "polygon layer with a class field (joined to the tile under each point or centroid)")
    parser.add_argument("--field", default="reference", help="the reference class field (default %(default)s)")
    parser.add_argument("--layer", default=None, metavar="NAME", help="tile layer (default: tiles)")
    parser.add_argument("--reference-layer", default=None, metavar="NAME",
                        help="layer of --reference (default: sample, else its first point or polygon layer)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for accuracy.csv, assessment.json and assessment.gpkg")


def _pm(interval, scale: float = 100.0, digits: int = 1) -> str:
    """'value +- half width', or the value alone where the SE is undefined."""
    if interval.value is None:
        return "-"
    text = f"{scale * interval.value:.{digits}f}"
    return text if interval.half_width is None else f"{text} ± {scale * interval.half_width:.{digits}f}"


def format_assessment(result, paths) -> str:
    """Overall accuracy, a per-class table and the notes, as plain text."""
    a = result.assessment
    o = a.overall
    ci = "" if o.low is None else f", 95 % CI {100 * o.low:.1f}-{100 * o.high:.1f}"
    lines = [f"overall accuracy  {_pm(o)} %{ci}   ({a.labels} labels, {a.design} sample)", "",
             f"{'class':<20} {'users %':>13} {'producers %':>13} {'mapped ' + a.area_unit:>12} "
             f"{'estimated ' + a.area_unit + ' (95 % CI)':>28}"]
    for c in a.per_class:
        area = c.area
        rng = "" if area.low is None else f" ({area.low:.0f}-{area.high:.0f})"
        lines.append(f"{c.name[:20]:<20} {_pm(c.users):>13} {_pm(c.producers):>13} {c.mapped_area:>12.1f} "
                     f"{(_pm(area, 1.0, 0) + rng):>28}")
    if a.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in a.notes]
    lines += ["", f"written to {paths['csv'].parent}"]
    return "\n".join(lines)


def run(args: argparse.Namespace, events, out: TextIO | None = None) -> int:
    from ..assess.jobs import assess_job
    result = assess_job(args.tiles, args.reference, args.out, field=args.field, layer=args.layer,
                        reference_layer=args.reference_layer, events=events)
    if args.events != "-":  # with `--events -` stdout carries the JSON-lines stream only
        print(format_assessment(result, result.paths), file=out or sys.stdout)
    return 0
