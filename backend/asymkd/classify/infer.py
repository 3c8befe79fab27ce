"""The onnxruntime session for an exported model: provider choice and per-tile summaries."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import choices
from ..errors import ConfigError, ModelFileError
from ..models.metadata import ModelMeta
from ..models.onnx_file import (
    INPUT_NAME,
    model_output,
    onnx_proto_module,
    onnx_session_options,
    open_session,
    resolve_model_path,
    session_metadata,
)
from .options import MAX_STREAMS

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
        self.meta: ModelMeta = session_metadata(self.session, str(self.path), self.input_name)
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise ConfigError(f"onnxruntime could not start its CUDA provider (running on {self.provider})",
                              "check the CUDA and cuDNN libraries onnxruntime-gpu needs, or use --device auto")
        self.output_name = model_output(self.meta, [o.name for o in self.session.get_outputs()])
        self.logits = self.meta.output == "logits"
        shape = next(i for i in self.session.get_inputs() if i.name == self.input_name).shape
        self.fixed_batch = _fixed(shape[0])
        self.notes: list[str] = []  # warnings for the job's events
        if self.fixed_batch is not None:
            self.notes.append(f"the model {self.path} takes a fixed batch of {self.fixed_batch} tile(s): tiles are "
                              f"classified {self.fixed_batch} at a time, which is slower (export it with "
                              "`asymkd export` for a model that takes any batch)")
        size = self.meta.patch_size
        self._probe(_fixed(shape[2]) or size, _fixed(shape[3]) or size)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.class_names)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (n, num_classes) for raw-unit tiles (n, C, H, W).

        Tiles reach here with invalid pixels filled, so non-finite output means a broken
        model (its training diverged): refused rather than written as class 0."""
        probs = self._run(images)
        self._check_probabilities(probs, "")
        return probs

    def _run(self, images: np.ndarray) -> np.ndarray:
        """The model's output for the tiles, as probabilities (softmax of declared logits); a
        model with a fixed batch runs on slices of that size (the last one padded)."""
        b = self.fixed_batch
        if b is None:
            out = self.session.run([self.output_name], {self.input_name: images})[0]
        else:
            parts = []
            for i in range(0, len(images), b):
                chunk = images[i:i + b]
                k = len(chunk)
                if k < b:
                    chunk = np.concatenate([chunk, np.repeat(chunk[:1], b - k, axis=0)])
                parts.append(self.session.run([self.output_name], {self.input_name: chunk})[0][:k])
            out = (np.concatenate(parts) if parts
                   else np.zeros((0, self.meta.num_classes), np.float32))
        return softmax(out) if self.logits else out

    def _probe(self, height: int, width: int) -> None:
        """Run a few tiles around the training mean through the model at load: its output must
        be class probabilities (finite, 0..1, summing to 1 per tile), never logits or scores."""
        mean = np.asarray(self.meta.mean, np.float64).reshape(1, -1, 1, 1)
        std = np.asarray(self.meta.std, np.float64).reshape(1, -1, 1, 1)
        steps = np.array([-1.0, -0.3, 0.3, 1.0]).reshape(-1, 1, 1, 1)
        ramp = np.linspace(-0.5, 0.5, height * width).reshape(1, 1, height, width)
        tiles = np.clip(mean + std * (steps + ramp), 0, None)
        if self.input_dtype.kind in "iu":
            info = np.iinfo(self.input_dtype)
            tiles = np.clip(np.rint(tiles), info.min, info.max)
        probs = self._run(np.ascontiguousarray(tiles.astype(self.input_dtype)))
        self._check_probabilities(probs, " on tiles of its training mean")

    def _check_probabilities(self, probs: np.ndarray, where: str) -> None:
        """Finite class probabilities per tile, else a ModelFileError saying what the model gave."""
        if not np.isfinite(probs).all():
            raise ModelFileError(f"the model {self.path} gives non-finite probabilities (NaN){where}",
                                 "the model is broken (its training diverged): train and export it again")
        if not len(probs):
            return
        sums = probs.sum(axis=1, dtype=np.float64)
        if probs.min() >= -PROB_TOLERANCE and probs.max() <= 1 + PROB_TOLERANCE \
                and np.abs(sums - 1).max() <= PROB_TOLERANCE:
            return
        raise ModelFileError(
            f"the model {self.path} does not give class probabilities{where}: its output '{self.output_name}' "
            f"holds {probs.min():.3g}..{probs.max():.3g}, each tile's values summing to {sums.min():.3g}.."
            f"{sums.max():.3g} instead of 1 (logits or scores?)",
            "export the model with `asymkd export` (its graph ends in a softmax); for a model whose output is "
            "logits, declare it in its AsymKD metadata (\"output\": \"logits\")")


PROB_TOLERANCE = 1e-3  # per value out of 0..1, and per tile's sum away from 1


def _fixed(dim: Any) -> int | None:
    """An axis of fixed size in an ONNX shape (None: dynamic)."""
    return dim if isinstance(dim, int) and dim > 0 else None


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float32)
    e = np.exp(x - x.max(axis=1, keepdims=True)) if len(x) else x
    return e / e.sum(axis=1, keepdims=True) if len(x) else x


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
