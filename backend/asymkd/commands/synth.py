"""`asymkd synth`: write the synthetic Sentinel-2-like world (the embedded default data)."""

from __future__ import annotations

import json

from ..data.landcover import RGB_SENSORS
from ..data.synth import SynthConfig, make_world


def add_arguments(parser) -> None:
    d = SynthConfig()
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder to write (a new or empty folder, or a world written before)")
    parser.add_argument("--seed", type=int, default=d.seed, help="same seed, same bytes (default %(default)s)")
    parser.add_argument("--size", type=int, default=d.size, help="patch and cell size in pixels (default %(default)s)")
    parser.add_argument("--ms-per-class", type=int, default=d.ms_per_class, metavar="N",
                        help="labeled MS patches per class (default %(default)s)")
    parser.add_argument("--rgb-per-class", type=int, default=d.rgb_per_class, metavar="N",
                        help="labeled RGB training patches per class (default %(default)s)")
    parser.add_argument("--test-per-class", type=int, default=d.test_per_class, metavar="N",
                        help="RGB test patches per class (default %(default)s)")
    parser.add_argument("--unlabeled-per-class", type=int, default=d.unlabeled_per_class, metavar="N",
                        help="unlabeled RGB patches per class, written without class folders (default %(default)s)")
    parser.add_argument("--paired", type=int, default=d.paired, metavar="N",
                        help="MS patches also written as same-target RGB in rgb_paired/ (total, default %(default)s)")
    parser.add_argument("--overlap-cols", type=int, default=d.overlap_cols, metavar="N",
                        help="columns of MS-scene cells that the RGB scene also covers (default %(default)s)")
    parser.add_argument("--classes", default="all", metavar="all|N",
                        help="all 10 EuroSAT classes or the first N (default %(default)s)")
    parser.add_argument("--rgb-sensor", default=d.rgb_sensor, choices=list(RGB_SENSORS),
                        help="the RGB layers' camera: aerial (another sensor than the MS one: other bands and "
                             "colours, 2x finer pixels) or sentinel2 (the MS sensor's own true colour, as "
                             "EuroSAT's RGB; default %(default)s)")


def run(args, events) -> int:
    cfg = SynthConfig(seed=args.seed, size=args.size, ms_per_class=args.ms_per_class,
                      rgb_per_class=args.rgb_per_class, test_per_class=args.test_per_class,
                      unlabeled_per_class=args.unlabeled_per_class, paired=args.paired,
                      classes=args.classes, overlap_cols=args.overlap_cols, rgb_sensor=args.rgb_sensor)
    paths = make_world(args.out, cfg, events)
    if args.events != "-":
        print(json.dumps(paths, indent=2))
    return 0
