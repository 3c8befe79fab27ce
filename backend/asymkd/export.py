"""Export a model folder to one self-describing ONNX file (models/onnx_file.py reads it).

The ONNX graph takes raw band values (the units the model was trained on, shape
(batch, bands, H, W), float32) and does the normalisation itself, so a caller never has to
know mean/std; it returns `probabilities` (softmax) and `logits`. The batch axis is dynamic
(and so are H and W: the backbones pool globally, but tiles should be `patch_size` pixels).

Everything needed to use the file travels inside it as ONNX metadata: key `asymkd` holds a
JSON object (see `build_metadata`), key `asymkd_format_version` its format version.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .errors import ConfigError, DataError, ModelFileError
from .events import NULL_EVENTS, Events
from .fileio import atomic_write_bytes, check_writable
from .models.metadata import ModelMeta
from .models.onnx_file import FORMAT_VERSION, INPUT_NAME, META_KEY, OUTPUT_NAMES, VERSION_KEY, onnx_session_options
from .palette import class_colors

PARITY_TOLERANCE = 1e-4
DEFAULT_OPSET = 17

@dataclasses.dataclass
class ExportResult:
    path: Path
    max_abs_diff: float
    checked_samples: int
    check_source: str
    metadata: dict[str, Any]


def build_metadata(meta: ModelMeta, model_folder: Path | None = None,
                   parity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object stored in the ONNX file (format version FORMAT_VERSION)."""
    return {
        "format_version": FORMAT_VERSION,
        "producer": f"asymkd {__version__}",
        "model_name": meta.name or (model_folder.name if model_folder else "model"),
        "backbone": meta.backbone,
        "class_names": list(meta.class_names),
        "class_colors": class_colors(meta.class_names, meta.colors),  # meta.json's, else the palette's
        "band_names": list(meta.band_names),
        "in_chans": meta.in_chans,
        "num_classes": meta.num_classes,
        "mean": [float(v) for v in meta.mean],
        "std": [float(v) for v in meta.std],
        "normalization": "in_graph",  # the graph takes raw band values
        "patch_size": meta.patch_size,
        "gsd": meta.gsd,
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "units": "raw"},
        "outputs": list(OUTPUT_NAMES),
        "summary": meta.summary,
        "metrics": meta.metrics,
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


def _synthetic_check_batch(meta: ModelMeta, n: int, seed: int = 0) -> np.ndarray:
    """Raw-unit inputs spread like the training data (mean +- 2 std, non-negative)."""
    rng = np.random.default_rng(seed)
    size = meta.patch_size
    mean = np.asarray(meta.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta.std, np.float32).reshape(1, -1, 1, 1)
    x = mean + std * rng.standard_normal((n, meta.in_chans, size, size)).astype(np.float32) * 1.0
    return np.clip(x, 0, None).astype(np.float32)


def _check_batches(meta: ModelMeta, data: np.ndarray | None, limit: int) -> tuple[np.ndarray, str]:
    if data is None:
        return _synthetic_check_batch(meta, limit), "synthetic (training mean/std)"
    data = np.asarray(data, np.float32)
    if data.ndim != 4 or data.shape[1] != meta.in_chans:
        raise DataError(f"check data has shape {data.shape}; the model needs (N, {meta.in_chans}, H, W)",
                        "give patches with the model's bands")
    return data[:limit], "data"


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
    per_patch = meta.in_chans * meta.patch_size ** 2 * 4
    fits = max(1, CHECK_BYTES // per_patch)  # large patches: fewer check patches, bounded memory
    if check_samples > fits:
        events.log(f"checking on {fits} patches, not {check_samples}: larger batches of "
                   f"{meta.patch_size}-px patches would not fit in memory")
        check_samples = fits
    batch, source = _check_batches(meta, check_data, check_samples)
    size = meta.patch_size
    if batch.shape[-2:] != (size, size):
        events.warning(f"check patches are {batch.shape[-2]}x{batch.shape[-1]} pixels, "
                       f"the model's patch size is {size}")
    deploy = _Deployable.wrap(model, meta.mean, meta.std)
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
