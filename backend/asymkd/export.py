"""Export a model folder to one self-describing ONNX file, and read such files back.

The ONNX graph takes raw band values (the units the model was trained on, shape
(batch, bands, H, W), float32) and does the normalisation itself, so a caller never has to
know mean/std; it returns `probabilities` (softmax) and `logits`. The batch axis is dynamic
(and so are H and W: the backbones pool globally, but tiles should be `patch_size` pixels).

Everything needed to use the file travels inside it as ONNX metadata: key `asymkd` holds a
JSON object (see `build_metadata`), key `asymkd_format_version` its format version. Files
without it, or of a newer format than this code reads, are refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__, layout
from .errors import ConfigError, DataError, ModelFileError
from .events import NULL_EVENTS, Events
from .fileio import atomic_write_bytes, check_writable
from .palette import class_colors

FORMAT_VERSION = 1
META_KEY = "asymkd"
VERSION_KEY = "asymkd_format_version"
INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "logits")
PARITY_TOLERANCE = 1e-4
DEFAULT_OPSET = 17

@dataclasses.dataclass
class ExportResult:
    path: Path
    max_abs_diff: float
    checked_samples: int
    check_source: str
    metadata: dict[str, Any]


def build_metadata(meta: dict[str, Any], model_folder: Path | None = None,
                   parity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object stored in the ONNX file (format version FORMAT_VERSION)."""
    from .models.metadata import validate_meta
    meta = validate_meta(meta, str(model_folder / layout.META) if model_folder else layout.META)
    summary = meta.get("summary")
    return {
        "format_version": FORMAT_VERSION,
        "producer": f"asymkd {__version__}",
        "model_name": meta.get("name") or (model_folder.name if model_folder else "model"),
        "backbone": meta["backbone"],
        "class_names": list(meta["class_names"]),
        "class_colors": class_colors(meta["class_names"], meta.get("colors")),  # meta.json's, else the palette's
        "band_names": list(meta["band_names"]),
        "in_chans": len(meta["band_names"]),
        "num_classes": len(meta["class_names"]),
        "mean": [float(v) for v in meta["mean"]],
        "std": [float(v) for v in meta["std"]],
        "normalization": "in_graph",  # the graph takes raw band values
        "patch_size": int(meta["patch_size"]),
        "gsd": (float(meta["gsd"]) if meta.get("gsd") is not None else None),
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "units": "raw"},
        "outputs": list(OUTPUT_NAMES),
        "summary": summary,
        "metrics": meta.get("metrics"),
        "parity": parity,
    }


class _Deployable:
    """Builds the torch module that is exported: normalise -> model -> (softmax, logits)."""

    @staticmethod
    def wrap(model, mean: Sequence[float], std: Sequence[float]):
        import torch
        from torch import nn

        class Deployable(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model
                self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
                self.register_buffer("inv_std", 1.0 / torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

            def forward(self, x):
                logits = self.model((x - self.mean) * self.inv_std)
                return torch.softmax(logits, dim=1), logits

        return Deployable().eval()


def _synthetic_check_batch(meta: dict[str, Any], n: int, seed: int = 0) -> np.ndarray:
    """Raw-unit inputs spread like the training data (mean +- 2 std, non-negative)."""
    rng = np.random.default_rng(seed)
    size = int(meta["patch_size"])
    mean = np.asarray(meta["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta["std"], np.float32).reshape(1, -1, 1, 1)
    x = mean + std * rng.standard_normal((n, len(meta["mean"]), size, size)).astype(np.float32) * 1.0
    return np.clip(x, 0, None).astype(np.float32)


def _check_batches(meta: dict[str, Any], data: np.ndarray | None, limit: int) -> tuple[np.ndarray, str]:
    if data is None:
        return _synthetic_check_batch(meta, limit), "synthetic (training mean/std)"
    data = np.asarray(data, np.float32)
    if data.ndim != 4 or data.shape[1] != len(meta["band_names"]):
        raise DataError(f"check data has shape {data.shape}; the model needs (N, {len(meta['band_names'])}, H, W)",
                        "give patches with the model's bands")
    return data[:limit], "data"


def onnx_session_options(threads: int = 0, spinning: bool = True):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    if not spinning:
        # Idle intra-op threads otherwise busy-wait and steal the reader thread's core.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


MIN_OPSET, MAX_OPSET = 13, 20  # what the TorchScript exporter writes for these models
MAX_CHECK_SAMPLES = 4096
CHECK_BYTES = 512 * 2**20  # memory for the check patches


def check_export_options(opset: int, check_samples: int) -> None:
    """Refuse an opset or a sample count that cannot work, before any model is loaded."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"--opset {opset} is out of range", f"use {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    if not 1 <= check_samples <= MAX_CHECK_SAMPLES:
        raise ConfigError(f"--check-samples {check_samples} is out of range",
                          f"use 1..{MAX_CHECK_SAMPLES} (default 128): the export is checked on that many patches")


def export_onnx(model_folder: str | Path, out: str | Path | None = None, *,
                check_data: np.ndarray | None = None, check_samples: int = 128,
                opset: int = DEFAULT_OPSET, overwrite: bool = False,
                tolerance: float = PARITY_TOLERANCE, events: Events = NULL_EVENTS) -> ExportResult:
    """Export the model in `model_folder` to ONNX (default `<folder>/model.onnx`).

    The file is checked against torch on `check_data` (raw-unit patches; synthetic ones
    drawn from the training statistics when None) at batch sizes 1 and up to 64; the
    export fails and leaves no file when the probabilities differ by more than `tolerance`.
    """
    import torch

    from .models.files import load_model

    folder = Path(model_folder)
    out = Path(out) if out is not None else folder / "model.onnx"
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"output {out} does not end in .onnx", "name the file e.g. student.onnx")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists", "pass --overwrite to replace it, or choose another name")
    if out.is_dir():
        raise ConfigError(f"output {out} is a folder", "give a file name, e.g. student.onnx")
    check_export_options(opset, check_samples)
    check_writable(out.parent)
    model, meta = load_model(folder)
    per_patch = int(meta["in_chans"]) * int(meta["patch_size"]) ** 2 * 4
    fits = max(1, CHECK_BYTES // per_patch)  # large patches: fewer check patches, bounded memory
    if check_samples > fits:
        events.log(f"checking on {fits} patches, not {check_samples}: larger batches of "
                   f"{meta['patch_size']}-px patches would not fit in memory")
        check_samples = fits
    batch, source = _check_batches(meta, check_data, check_samples)
    size = int(meta["patch_size"])
    if batch.shape[-2:] != (size, size):
        events.warning(f"check patches are {batch.shape[-2]}x{batch.shape[-1]} pixels, "
                       f"the model's patch size is {size}")
    deploy = _Deployable.wrap(model, meta["mean"], meta["std"])
    with events.step("export", model=str(folder), out=str(out)):
        blob = _to_onnx_bytes(deploy, batch[:2], opset)
        diff = _parity(deploy, blob, batch, torch)
        events.metrics("export", {"max_abs_prob_diff": diff, "samples": len(batch), "source": source})
        if np.isnan(diff):
            raise ModelFileError(f"the model in {folder} gives non-finite probabilities (NaN) on the check "
                                 f"patches ({source})", "the model is broken (its training diverged): train "
                                 "it again; if --data was given, check those images for NaN pixels; "
                                 "the file was not written")
        if not diff <= tolerance:
            raise ModelFileError(
                f"ONNX and torch disagree: max abs probability difference {diff:.3g} > {tolerance:g}",
                "try another --opset; the file was not written")
        metadata = build_metadata(meta, folder, parity={"max_abs_prob_diff": diff, "samples": len(batch),
                                                        "source": source, "tolerance": tolerance})
        _write_with_metadata(blob, metadata, out)
    events.log(f"exported {out} (max abs probability difference vs torch {diff:.2e} on {len(batch)} {source} patches)")
    events.result("export", onnx=out)
    return ExportResult(out, diff, len(batch), source, metadata)


def _to_onnx_bytes(module, example: np.ndarray, opset: int) -> bytes:
    import torch
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter needs no extra packages and handles these CNNs exactly.
        warnings.simplefilter("ignore")
        # torch documents a file-like object for `f`; its annotation only names paths.
        torch.onnx.export(module, (torch.from_numpy(np.ascontiguousarray(example)),), buf,  # type: ignore[arg-type]
                          dynamo=False,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset_version=opset,
                          dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                                        OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}})
    return buf.getvalue()


def _parity(module, blob: bytes, batch: np.ndarray, torch) -> float:
    """Max abs difference of probabilities, ONNX (CPU, optimised graph) vs torch, at several
    batch sizes so the dynamic axis is exercised."""
    import onnxruntime as ort
    sess = ort.InferenceSession(blob, sess_options=onnx_session_options(), providers=["CPUExecutionProvider"])
    worst = 0.0
    # one single-sample batch, then batches of up to 64
    bounds = [0, 1] + list(range(65, len(batch), 64)) + [len(batch)]
    chunks = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    with torch.no_grad():
        for a, b in chunks:
            x = batch[a:b]
            ref = module(torch.from_numpy(np.ascontiguousarray(x)))[0].numpy()
            got = sess.run([OUTPUT_NAMES[0]], {INPUT_NAME: x})[0]
            if got.shape != ref.shape:
                return float("inf")
            diff = float(np.max(np.abs(got - ref))) if got.size else 0.0
            if not (np.isfinite(got).all() and np.isfinite(ref).all() and np.isfinite(diff)):
                return float("nan")  # max(0.0, nan) would be 0.0: a NaN model must fail the check
            worst = max(worst, diff)
    return worst


def _write_with_metadata(blob: bytes, metadata: dict[str, Any], out: Path) -> None:
    import onnx
    proto = onnx.load_from_string(blob)
    del proto.metadata_props[:]
    for key, value in ((META_KEY, json.dumps(metadata)), (VERSION_KEY, str(FORMAT_VERSION))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "asymkd"
    proto.producer_version = __version__
    proto.doc_string = (f"AsymKD scene classifier '{metadata['model_name']}' ({metadata['backbone']}); "
                        f"classes: {', '.join(metadata['class_names'])}")
    onnx.checker.check_model(proto)
    atomic_write_bytes(out, proto.SerializeToString())


def resolve_model_path(path: str | Path) -> Path:
    """The .onnx file a user pointed at (a folder holding model.onnx is accepted)."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return path / "model.onnx"
        raise ModelFileError(f"{path} is a folder, not an ONNX model file",
                             f"export it first: asymkd export {path} --out model.onnx")
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist", "give the .onnx file written by asymkd export")
    return path


def onnx_proto_module() -> Any:
    """onnx's protobuf classes (ModelProto, NodeProto...), without importing the onnx package:
    that import takes 0.6-0.8 s, paid by every classify run and every Dask worker. The
    generated module needs protobuf alone; the onnx package is the fallback."""
    import importlib.util
    import sys
    if "onnx" in sys.modules:
        return sys.modules["onnx"].onnx_ml_pb2
    name = "asymkd._onnx_ml_pb2"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("onnx")
    locations = list(package.submodule_search_locations or []) if package else []
    source = next((Path(d) / "onnx_ml_pb2.py" for d in locations if (Path(d) / "onnx_ml_pb2.py").is_file()), None)
    spec = importlib.util.spec_from_file_location(name, source) if source else None
    if spec is None or spec.loader is None:
        import onnx
        return onnx.onnx_ml_pb2
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def load_onnx_proto(path: str | Path):
    """The parsed ONNX model; ModelFileError when the file is not an ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    path = resolve_model_path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelFileError(f"{path} is not an ONNX model file ({type(exc).__name__})",
                             "give the .onnx file written by asymkd export") from exc
    if not proto.graph.node:
        raise ModelFileError(f"{path} is not an ONNX model file (no graph)",
                             "give the .onnx file written by asymkd export")
    return proto


def open_session(path: str | Path, options: Any, providers: list[str], model: bytes | None = None) -> Any:
    """An onnxruntime session of the exported model in `path` (or of `model`, the bytes of a
    variant of it); ModelFileError saying what is wrong with the file when onnxruntime cannot
    load it."""
    import onnxruntime as ort
    path = resolve_model_path(path)
    try:
        return ort.InferenceSession(model if model is not None else str(path), sess_options=options,
                                    providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        load_onnx_proto(path)  # says precisely what is wrong with the file, if it can
        raise ModelFileError(f"onnxruntime cannot load {path}: {exc}",
                             "export the model again with `asymkd export`") from exc


def session_metadata(session: Any, where: str, input_name: str = INPUT_NAME) -> dict[str, Any]:
    """The AsymKD metadata of a loaded model, checked against its graph's input and output."""
    from .models.metadata import check_graph_shapes
    meta = parse_metadata(session.get_modelmeta().custom_metadata_map, where)
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if input_name not in inputs:
        raise ModelFileError(f"{where} has input(s) {list(inputs)}, not '{INPUT_NAME}'",
                             "export the model again with `asymkd export`")
    wanted = model_output(meta, list(outputs))
    if wanted not in outputs:
        raise ModelFileError(f"{where} has output(s) {list(outputs)}, not '{wanted}'",
                             "export the model again with `asymkd export`")
    check_graph_shapes(meta, inputs[input_name].shape, outputs[wanted].shape, where)
    return meta


def model_output(meta: dict[str, Any], names: Sequence[str]) -> str:
    """The graph output a classifier reads: `probabilities`, or for a model whose metadata
    declares `"output": "logits"` its `logits` output where it has one (softmax is then
    applied by the reader)."""
    if meta.get("output") == "logits" and OUTPUT_NAMES[1] in names:
        return OUTPUT_NAMES[1]
    return OUTPUT_NAMES[0]


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The AsymKD metadata of an ONNX model file; ModelFileError when the file is not an
    ONNX model, lacks the metadata, or is of a newer format version. Read through
    onnxruntime, unoptimised (about 0.05 s): importing onnx alone takes 0.6-0.8 s, paid by
    every classify run and every Dask worker."""
    import onnxruntime as ort
    path = resolve_model_path(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return session_metadata(open_session(path, options, ["CPUExecutionProvider"]), str(path))


def parse_metadata(props: dict[str, str], where: str) -> dict[str, Any]:
    if META_KEY not in props:
        raise ModelFileError(f"{where} is an ONNX model without AsymKD metadata (classes, bands, normalisation)",
                             "export the model with `asymkd export MODEL_FOLDER`")
    try:
        meta = json.loads(props[META_KEY])
        version = int(meta.get("format_version", props.get(VERSION_KEY, -1)))
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise ModelFileError(f"{where} has unreadable AsymKD metadata: {exc}",
                             "export the model again with `asymkd export`") from exc
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{where} is AsymKD model format version {version}; this asymkd ({__version__}) "
                             f"reads up to version {FORMAT_VERSION}",
                             "update asymkd, or export the model again with this version")
    if version < 1:
        raise ModelFileError(f"{where} has an invalid AsymKD format version {version}",
                             "export the model again with `asymkd export`")
    from .models.metadata import validate_meta
    meta = validate_meta(meta, where, onnx=True)
    # files without colours get the project's colour of each class name, as a fresh export would
    meta.setdefault("class_colors", class_colors(meta["class_names"]))
    return meta
