"""`asymkd export MODEL_FOLDER [--out FILE.onnx]`: the model to ONNX with its metadata."""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL_FOLDER",
                        help="model folder (model.safetensors + meta.json), e.g. runs/demo/student")
    parser.add_argument("--out", metavar="FILE.onnx", default=None,
                        help="output file (default: MODEL_FOLDER/model.onnx)")
    parser.add_argument("--data", metavar="FOLDER", default=None,
                        help="patch folder whose images check ONNX against torch (default: synthetic patches "
                             "drawn from the training mean/std)")
    parser.add_argument("--check-samples", type=int, default=128, help="patches used for the check (default 128)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args, events) -> int:
    from ..export import check_export_options, export_onnx
    check_export_options(args.opset, args.check_samples)
    check = None
    if args.data:
        import numpy as np

        from ..data.patches import load_folder
        from ..models.files import check_bands, read_meta
        meta = read_meta(Path(args.model))
        data = load_folder(args.data, "rgb")
        check_bands(meta, data.num_bands, f"--data {args.data}")
        rng = np.random.default_rng(0)
        pick = rng.permutation(len(data))[: args.check_samples]
        check = data.images[np.sort(pick)]
    result = export_onnx(args.model, args.out, check_data=check, check_samples=args.check_samples,
                         opset=args.opset, overwrite=args.overwrite, events=events)
    if args.events != "-":
        print(result.path)
    return 0
