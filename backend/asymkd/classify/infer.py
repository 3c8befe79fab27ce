"""The onnxruntime session for an exported model: provider choice and per-tile summaries."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import choices
from ..errors import ConfigError, ModelFileError
from ..export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    onnx_proto_module,
    onnx_session_options,
    open_session,
    resolve_model_path,
    session_metadata,
)
from . import MAX_STREAMS

DEVICES = choices.ONNX_DEVICES


def providers_for(device: str) -> list[str]:
    """Execution providers to try, in order: CUDA then CPU for auto."""
    import onnxruntime as ort
    if device not in DEVICES:
        raise ConfigError(f"unknown device '{device}'", f"use one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise ConfigError("--device cuda was asked for but onnxruntime has no CUDA provider "
                          f"(available: {', '.join(available)})",
                          "install onnxruntime-gpu in the engine environment, or use --device auto/cpu")
    if device == "cpu" or not has_cuda:
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a container's or a job's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def stream_threads(provider: str, threads: int, streams: int) -> tuple[int, int]:
    """(batches classified at once, onnxruntime intra-op threads for each; 0 = its default).

    On the CPU one batch per thread by default: each run on one thread needs no sync between
    threads inside its operators, and on 2 cores two runs of one thread each classified 25 %
    more tiles per second than one run of two threads (bench classify). On a GPU one batch at
    a time unless asked: the device is the limit."""
    if provider != "CPUExecutionProvider":
        return max(1, streams), threads
    budget = threads or available_cores()
    n = streams or min(budget, MAX_STREAMS)
    return n, max(1, budget // n)


RAW_INPUT = "image_raw"
# Integer rasters are fed as they are and cast inside the graph: the reader copies 4x fewer
# bytes, the cast runs in onnxruntime's threads, and onnxruntime plans the float tensors in
# its arena (fed float32, the same model's 2 streams peaked 120 MB higher). Raster dtype ->
# its ONNX TensorProto type (onnx.TensorProto.UINT8 ...; FLOAT is 1):
CASTABLE = {np.dtype(t): code for t, code in (("uint8", 2), ("int8", 3), ("uint16", 4), ("int16", 5))}
_ONNX_FLOAT = 1


def _with_input_cast(path: Path, dtype: np.dtype) -> bytes:
    """The model with a Cast from `dtype` to float32 in front of its input. A file that is no
    such model comes back as it is: opening it says what is wrong (`open_session`,
    `session_metadata`)."""
    from google.protobuf.message import DecodeError
    data = path.read_bytes()
    pb = onnx_proto_module()
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError:
        return data
    inp = next((i for i in proto.graph.input if i.name == INPUT_NAME), None)
    if inp is None:
        return data
    inp.name = RAW_INPUT
    inp.type.tensor_type.elem_type = CASTABLE[dtype]
    cast = pb.NodeProto(op_type="Cast", input=[RAW_INPUT], output=[INPUT_NAME], name="asymkd_input_cast",
                        attribute=[pb.AttributeProto(name="to", type=pb.AttributeProto.INT, i=_ONNX_FLOAT)])
    proto.graph.node.insert(0, cast)
    return proto.SerializeToString()


class OnnxClassifier:
    """An exported model ready to classify raw-unit tiles (normalisation is in the graph).

    `input_dtype` is the dtype of the tiles given to `predict`: float32, or an integer type
    in CASTABLE (cast to float32 inside the graph). `predict` may run in `streams` threads
    at once (onnxruntime sessions are thread-safe); `threads` is their threads in all
    (0: every core), see `stream_threads`."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0, spinning: bool = False,
                 input_dtype: str | np.dtype = "float32", streams: int = 0):
        self.path = resolve_model_path(path)
        self.input_dtype = np.dtype(input_dtype) if np.dtype(input_dtype) in CASTABLE else np.dtype(np.float32)
        providers = providers_for(device)
        self.streams, intra = stream_threads(providers[0], threads, streams)
        self.input_name = INPUT_NAME
        model = None
        if self.input_dtype != np.float32:
            model, self.input_name = _with_input_cast(self.path, self.input_dtype), RAW_INPUT
        self.session = open_session(self.path, onnx_session_options(intra, spinning), providers, model)
        # the metadata comes from the session: the file is parsed once
        self.meta: dict[str, Any] = session_metadata(self.session, str(self.path), self.input_name)
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise ConfigError(f"onnxruntime could not start its CUDA provider (running on {self.provider})",
                              "check the CUDA and cuDNN libraries onnxruntime-gpu needs, or use --device auto")

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (n, num_classes) for raw-unit tiles (n, C, H, W).

        Tiles reach here with invalid pixels filled, so non-finite output means a broken
        model (its training diverged): refused rather than written as class 0."""
        probs = self.session.run([OUTPUT_NAMES[0]], {self.input_name: images})[0]
        if not np.isfinite(probs).all():
            raise ModelFileError(f"the model {self.path} gives non-finite probabilities (NaN)",
                                 "the model is broken (its training diverged): train and export it again")
        return probs


@dataclasses.dataclass
class Summary:
    class_id: np.ndarray
    confidence: np.ndarray
    second_id: np.ndarray
    second_prob: np.ndarray
    entropy: np.ndarray      # Shannon entropy / log(num_classes): 0 = certain, 1 = uniform


def summarize(probs: np.ndarray) -> Summary:
    probs = np.asarray(probs, np.float64)
    n, k = probs.shape
    order = np.argsort(-probs, axis=1, kind="stable")
    first = order[:, 0]
    second = order[:, 1] if k > 1 else order[:, 0]
    idx = np.arange(n)
    p = np.clip(probs, 1e-12, 1.0)
    ent = -(probs * np.log(p)).sum(axis=1) / (np.log(k) if k > 1 else 1.0)
    return Summary(first.astype(np.int32), probs[idx, first], second.astype(np.int32),
                   probs[idx, second] if k > 1 else np.zeros(n), np.clip(ent, 0.0, 1.0))
