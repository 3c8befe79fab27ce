"""`asymkd classify MODEL.onnx RASTER --out OUT.gpkg`: tiles of a raster to a styled GeoPackage."""

from __future__ import annotations

import json

from .. import settings
from ..classify import ClassifyOptions


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="model file written by `asymkd export`")
    parser.add_argument("raster", metavar="RASTER", help="GeoTIFF, VRT or anything GDAL opens")
    parser.add_argument("--out", required=True, metavar="OUT.gpkg",
                        help="output GeoPackage (a .qml style is written beside it)")
    # defaults as ClassifyOptions declares them, the Python API's too
    settings.add_flags(parser, settings.entries(ClassifyOptions), given_only=False)


def run(args, events) -> int:
    from ..classify import classify
    if args.scheduler is not None and str(args.scheduler).strip():
        from ..classify.cluster import check_address
        check_address(args.scheduler)  # before the model and raster are read
    options = {key: getattr(args, dest) for dest, key in getattr(args, settings.DESTS).items()}
    result = classify(args.model, args.raster, args.out, events=events, **options)
    if args.events != "-":
        print(json.dumps({"gpkg": str(result.gpkg), "qml": str(result.qml),
                          "class_raster": str(result.class_raster) if result.class_raster else None,
                          "areas_csv": str(result.areas_csv) if result.areas_csv else None,
                          "tiles_classified": result.tiles_classified, "tiles_skipped": result.tiles_skipped,
                          "tiles_per_s": round(result.tiles_per_s, 1), "provider": result.provider,
                          "regions": result.regions}, indent=2))
    return 0
