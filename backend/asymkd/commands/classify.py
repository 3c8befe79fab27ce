"""`asymkd classify MODEL.onnx RASTER --out OUT.gpkg`: tiles of a raster to a styled GeoPackage."""

from __future__ import annotations

import argparse
import json

from .. import choices
from ..classify import DEFAULT_UNCERTAIN_BY, MAX_STREAMS, ClassifyOptions

# Defaults come from ClassifyOptions, the one place that holds them (the Python API's too).
_DEFAULT = ClassifyOptions()


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="model file written by `asymkd export`")
    parser.add_argument("raster", metavar="RASTER", help="GeoTIFF, VRT or anything GDAL opens")
    parser.add_argument("--out", required=True, metavar="OUT.gpkg",
                        help="output GeoPackage (a .qml style is written beside it)")
    parser.add_argument("--bands", metavar="1,2,3", default=None,
                        help="raster bands feeding the model's bands, in the model's order "
                             "(default: by band description, colour interpretation, or band order)")
    area = parser.add_mutually_exclusive_group()
    area.add_argument("--bbox", metavar="minx,miny,maxx,maxy", default=None,
                      help="classify only the tiles that meet this box (write --bbox=-1.5,... when minx is negative)")
    area.add_argument("--mask", metavar="VECTOR", default=None, help="classify only tiles meeting these polygons")
    parser.add_argument("--bbox-crs", metavar="EPSG:xxxx", default=None, help="CRS of --bbox (default: the raster's)")
    parser.add_argument("--mask-layer", default=None, help="layer of --mask (default: the first)")
    parser.add_argument("--tile", type=int, default=None,
                        help="tile size in pixels at the model's resolution (default: the model's patch size)")
    parser.add_argument("--stride", type=int, default=None, help="tile step in pixels (default: the tile size)")
    parser.add_argument("--xyz-zoom", type=int, default=None, metavar="Z",
                        help="use the XYZ web-map tiles of zoom Z (keys z/x/y)")
    parser.add_argument("--batch-size", type=int, default=_DEFAULT.batch_size,
                        help="tiles per inference batch (default %(default)s)")
    parser.add_argument("--class-raster", metavar="OUT.tif", default=None,
                        help="also write a class raster (one pixel per tile step)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--device", choices=choices.ONNX_DEVICES, default=_DEFAULT.device,
                        help="onnxruntime device (auto: CUDA when available)")
    parser.add_argument("--min-valid", type=float, default=_DEFAULT.min_valid,
                        help="skip tiles with a smaller fraction of valid pixels (default %(default)s)")
    parser.add_argument("--threads", type=int, default=_DEFAULT.threads,
                        help="CPU threads for inference in all (default %(default)s: every core this process may "
                             "use)")
    parser.add_argument("--streams", type=int, default=_DEFAULT.streams,
                        help="batches classified at once, sharing the threads (default %(default)s: on the CPU one "
                             f"per thread, at most {MAX_STREAMS}; on a GPU one)")
    parser.add_argument("--spinning", action=argparse.BooleanOptionalAction, default=_DEFAULT.spinning,
                        help="let idle onnxruntime threads busy-wait between operators (default: on; faster on "
                             "a machine given to the job, --no-spinning on one shared with other work)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="classify on a local Dask cluster of N worker processes (needs dask[distributed])")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="classify on the workers of a running dask-scheduler, e.g. tcp://10.0.0.5:8786; "
                             "they must see the raster and the model at the same paths")
    parser.add_argument("--shard-tiles", type=int, default=_DEFAULT.shard_tiles, metavar="N",
                        help="tiles per shard (one Dask task) with --workers/--scheduler (default 0: about "
                             "4 shards per worker, 2,048 to 65,536 tiles each)")
    parser.add_argument("--uncertain-below", type=float, default=_DEFAULT.uncertain_below, metavar="T",
                        help="mark tiles whose certainty is below T (0..1) as uncertain=1 (default: none)")
    parser.add_argument("--uncertain-by", choices=list(choices.UNCERTAINTY_MEASURES), default=_DEFAULT.uncertain_by,
                        help="certainty measure, with --uncertain-below: " + "; ".join(
                            f"{k}: {v}" for k, v in choices.UNCERTAINTY_MEASURES.items())
                        + f" (default {DEFAULT_UNCERTAIN_BY})")
    parser.add_argument("--regions", action="store_true",
                        help="also write the layer `regions`: neighbouring tiles of a class dissolved into polygons "
                             "(holes kept) with their tiles and hectares")
    parser.add_argument("--min-region-ha", type=float, default=_DEFAULT.min_region_ha, metavar="HA",
                        help="with --regions, drop regions smaller than HA hectares (default %(default)s)")
    parser.add_argument("--vote", action="store_true",
                        help="with --stride smaller than --tile (and dividing it): output stride-sized cells, each the "
                             "mean probability of the windows over it; costs (tile/stride)^2 times the inference")
    parser.add_argument("--scale", type=float, default=_DEFAULT.scale, metavar="FACTOR",
                        help="multiply the pixels by FACTOR before the model, for a raster in other units than the "
                             "training data (e.g. 255 for reflectance 0..1 given to a model trained on 8-bit images)")
    parser.add_argument("--yes", action="store_true",
                        help="start a job beyond the limits (more than 10 million tiles, outputs larger than the free "
                             "disk or a class raster larger than the free memory); the estimate is always logged")


def run(args, events) -> int:
    from ..classify import classify
    if args.scheduler is not None and str(args.scheduler).strip():
        from ..classify.cluster import check_address
        check_address(args.scheduler)  # before the model and raster are read
    result = classify(args.model, args.raster, args.out, events=events, bands=args.bands, bbox=args.bbox,
                      bbox_crs=args.bbox_crs, mask=args.mask, mask_layer=args.mask_layer, tile=args.tile,
                      stride=args.stride, xyz_zoom=args.xyz_zoom, batch_size=args.batch_size,
                      class_raster=args.class_raster, overwrite=args.overwrite, device=args.device,
                      min_valid=args.min_valid, threads=args.threads, streams=args.streams, spinning=args.spinning,
                      workers=args.workers, scheduler=args.scheduler, shard_tiles=args.shard_tiles,
                      uncertain_below=args.uncertain_below, uncertain_by=args.uncertain_by, regions=args.regions,
                      min_region_ha=args.min_region_ha, vote=args.vote, yes=args.yes,
                      scale=args.scale)
    if args.events != "-":
        print(json.dumps({"gpkg": str(result.gpkg), "qml": str(result.qml),
                          "class_raster": str(result.class_raster) if result.class_raster else None,
                          "areas_csv": str(result.areas_csv) if result.areas_csv else None,
                          "tiles_classified": result.tiles_classified, "tiles_skipped": result.tiles_skipped,
                          "tiles_per_s": round(result.tiles_per_s, 1), "provider": result.provider,
                          "regions": result.regions}, indent=2))
    return 0
