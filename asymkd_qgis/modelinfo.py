"""Read an exported model's metadata (classes, bands, tile size, ground resolution) without
onnx or onnxruntime: QGIS's Python has neither, and the plugin never imports the engine.

An ONNX file is a protobuf `ModelProto`; its `metadata_props` (field 14) are key/value string
pairs. Only the top-level fields are walked and the graph (weights) is skipped by seeking,
so this reads a few kilobytes whatever the model size. A model folder's meta.json is read too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .layout import META

_METADATA_PROPS = 14
_MAX_STRING = 64 * 1024 * 1024


@dataclass
class ModelInfo:
    path: str
    class_names: list[str] = field(default_factory=list)
    band_names: list[str] = field(default_factory=list)
    tile_size: int | None = None
    gsd: float | None = None  # ground resolution, metres per pixel
    raw: dict[str, Any] = field(default_factory=dict)


class ModelInfoError(Exception):
    pass


def _varint(stream: BinaryIO) -> int | None:
    shift = result = 0
    while True:
        byte = stream.read(1)
        if not byte:
            return None if shift == 0 else _truncated()
        value = byte[0]
        result |= (value & 0x7F) << shift
        if not value & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ModelInfoError("malformed varint")


def _truncated() -> int:
    raise ModelInfoError("the file ends in the middle of a field")


def _skip(stream: BinaryIO, wire_type: int) -> None:
    if wire_type == 0:
        _varint(stream)
    elif wire_type == 1:
        stream.seek(8, 1)
    elif wire_type == 2:
        stream.seek(_varint(stream) or 0, 1)
    elif wire_type == 5:
        stream.seek(4, 1)
    else:
        raise ModelInfoError(f"unsupported protobuf wire type {wire_type}")


def _entry(data: bytes) -> tuple[str, str]:
    """A StringStringEntryProto: field 1 key, field 2 value."""
    import io
    stream = io.BytesIO(data)
    key = value = ""
    while True:
        tag = _varint(stream)
        if tag is None:
            return key, value
        number, wire = tag >> 3, tag & 7
        if wire == 2 and number in (1, 2):
            text = stream.read(_varint(stream) or 0).decode("utf-8", errors="replace")
            key, value = (text, value) if number == 1 else (key, text)
        else:
            _skip(stream, wire)


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """All metadata_props of an ONNX model as a dict."""
    props: dict[str, str] = {}
    with open(path, "rb") as stream:
        while True:
            tag = _varint(stream)
            if tag is None:
                return props
            number, wire = tag >> 3, tag & 7
            if number == _METADATA_PROPS and wire == 2:
                length = _varint(stream) or 0
                if length > _MAX_STRING:
                    raise ModelInfoError("metadata entry too large")
                key, value = _entry(stream.read(length))
                props[key] = value
            else:
                _skip(stream, wire)


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def _flatten(props: dict[str, str]) -> dict[str, Any]:
    """Decode JSON values; merge JSON objects stored under one key (e.g. 'asymkd')."""
    meta: dict[str, Any] = {}
    for key, value in props.items():
        decoded = _decode(value)
        if isinstance(decoded, dict):
            for inner_key, inner in decoded.items():
                meta.setdefault(inner_key, inner)
        meta[key] = decoded
    return meta


def _first(meta: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if meta.get(key) not in (None, "", []):
            return meta[key]
    return None


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, dict):  # {"0": "Forest", ...}
        return [str(value[k]) for k in sorted(value, key=lambda k: int(k) if str(k).isdigit() else k)]
    return [str(v) for v in value or []]


def read_model_info(path: str | Path) -> ModelInfo:
    """Metadata of an .onnx file or a model folder (meta.json)."""
    path = Path(path)
    if path.is_dir():
        meta_file = path / META
        if not meta_file.is_file():
            raise ModelInfoError(f"{path} is not a model folder (no {META})")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    elif path.is_file():
        try:
            meta = _flatten(onnx_metadata(path))
        except (OSError, ModelInfoError) as exc:
            raise ModelInfoError(f"{path} is not a readable ONNX model: {exc}") from exc
    else:
        raise ModelInfoError(f"{path} does not exist")
    size = _first(meta, "tile_size", "patch_size", "size")
    gsd = _first(meta, "gsd", "ground_resolution", "resolution")
    try:
        gsd = float(gsd) if gsd is not None else None
    except (TypeError, ValueError):
        gsd = None
    try:
        size = int(size) if size is not None else None
    except (TypeError, ValueError):
        size = None
    return ModelInfo(path=str(path), class_names=_names(_first(meta, "class_names", "classes")),
                     band_names=_names(_first(meta, "band_names", "bands")), tile_size=size, gsd=gsd,
                     raw=meta)
