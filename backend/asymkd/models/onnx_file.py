"""Reading an exported ONNX model file: its path, its onnxruntime session, its AsymKD metadata.

Key `asymkd` of the file's ONNX metadata holds a JSON object (a `ModelMeta` with the export's
own keys), key `asymkd_format_version` its format version. Files without it, or of a newer
format than this code reads, are refused. The exporter (export.py) writes what this reads;
classify reads through here alone, so a classify run never imports torch or the exporter.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from .. import __version__
from ..errors import ModelFileError
from ..palette import class_colors
from .metadata import ModelMeta, check_graph_shapes

FORMAT_VERSION = 1
META_KEY = "asymkd"
VERSION_KEY = "asymkd_format_version"
INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "logits")

_EXPORT_AGAIN = "export the model again with `asymkd export`"


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
        raise ModelFileError(f"onnxruntime cannot load {path}: {exc}", _EXPORT_AGAIN) from exc


def session_metadata(session: Any, where: str, input_name: str = INPUT_NAME) -> ModelMeta:
    """The AsymKD metadata of a loaded model, checked against its graph's input and output."""
    meta = parse_metadata(session.get_modelmeta().custom_metadata_map, where)
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if input_name not in inputs:
        raise ModelFileError(f"{where} has input(s) {list(inputs)}, not '{INPUT_NAME}'", _EXPORT_AGAIN)
    wanted = model_output(meta, list(outputs))
    if wanted not in outputs:
        raise ModelFileError(f"{where} has output(s) {list(outputs)}, not '{wanted}'", _EXPORT_AGAIN)
    check_graph_shapes(meta, inputs[input_name].shape, outputs[wanted].shape, where)
    return meta


def model_output(meta: ModelMeta, names: Sequence[str]) -> str:
    """The graph output a classifier reads: `probabilities`, or for a model whose metadata
    declares `"output": "logits"` its `logits` output where it has one (softmax is then
    applied by the reader)."""
    if meta.output == "logits" and OUTPUT_NAMES[1] in names:
        return OUTPUT_NAMES[1]
    return OUTPUT_NAMES[0]


def read_onnx_metadata(path: str | Path) -> ModelMeta:
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


def parse_metadata(props: dict[str, str], where: str) -> ModelMeta:
    """The metadata in an ONNX file's metadata properties (key -> text)."""
    if META_KEY not in props:
        raise ModelFileError(f"{where} is an ONNX model without AsymKD metadata (classes, bands, normalisation)",
                             "export the model with `asymkd export MODEL_FOLDER`")
    try:
        doc = json.loads(props[META_KEY])
        version = int(doc.get("format_version", props.get(VERSION_KEY, -1)))
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise ModelFileError(f"{where} has unreadable AsymKD metadata: {exc}", _EXPORT_AGAIN) from exc
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{where} is AsymKD model format version {version}; this asymkd ({__version__}) "
                             f"reads up to version {FORMAT_VERSION}",
                             "update asymkd, or export the model again with this version")
    if version < 1:
        raise ModelFileError(f"{where} has an invalid AsymKD format version {version}", _EXPORT_AGAIN)
    meta = ModelMeta.from_json(doc, where, onnx=True)
    if meta.class_colors is None:  # the project's colour of each class name, as a fresh export would give
        meta = dataclasses.replace(meta, class_colors=class_colors(meta.class_names))
    return meta
