"""`asymkd chips`: cut a raster and its labeled polygons/points into a patch folder dataset."""

from __future__ import annotations

import json

from ..data.mapchips import ChipConfig, chip_map


def add_arguments(parser) -> None:
    d = ChipConfig()
    parser.add_argument("--raster", required=True, help="raster to cut (GeoTIFF, VRT, any GDAL raster)")
    parser.add_argument("--labels", required=True, help="vector layer of labeled polygons or points")
    parser.add_argument("--field", default=d.field, help="class field of the labels (default %(default)s)")
    parser.add_argument("--layer", default=None, help="layer of the vector file (default: 'labels' or the first)")
    parser.add_argument("--size", type=int, default=d.size, help="chip size in pixels (default %(default)s)")
    parser.add_argument("--resolution", type=float, default=None, metavar="M",
                        help="ground resolution in raster CRS units; resampled when it differs (default: the raster's)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/<Class>/<stem>.tif")
    parser.add_argument("--pair-raster", default=None, metavar="R2",
                        help="a second raster over the same ground (e.g. RGB over the MS scene): "
                             "co-located chips are same-target pairs")
    parser.add_argument("--pair-out", default=None, metavar="DIR2", help="folder for the pair chips (same stems)")
    parser.add_argument("--bands", default=None,
                        help="band names written into the chips when the raster has none: "
                             "a preset (sentinel2) or B01,B02,...")
    parser.add_argument("--min-cover", type=float, default=d.min_cover,
                        help="share of a chip that must lie inside its polygon (default %(default)s)")
    parser.add_argument("--max-nodata", type=float, default=d.max_nodata,
                        help="skip chips with a larger share of nodata pixels (default %(default)s)")


def run(args, events) -> int:
    cfg = ChipConfig(size=args.size, field=args.field, layer=args.layer, resolution=args.resolution,
                     bands=args.bands, min_cover=args.min_cover, max_nodata=args.max_nodata)
    result = chip_map(args.raster, args.labels, args.out, cfg, pair_raster=args.pair_raster,
                      pair_out=args.pair_out, events=events)
    if args.events != "-":
        print(json.dumps(result.summary(), indent=2))
    return 0
