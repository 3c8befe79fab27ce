"""One validation of model metadata, used by every reader (meta.json and ONNX metadata).

A model file is input like any other: a tampered or hand-edited file must not broadcast a
short `mean` over the bands, leave classes unstyled, allocate terabytes for a patch size
of 1e9, or crash with a KeyError. `validate_meta` checks types, bounds and that the
lengths agree with each other; `check_graph_shapes` checks them against an ONNX graph.
Every failure is a ModelFileError (exit 2) that names the file and the field.

`ModelMeta` (a scene classifier: teacher, student, baseline; meta.json and ONNX metadata) and
`MatcherMeta` (the matcher's meta.json) are the typed forms every reader and writer uses:
`from_json` checks a file's object, `to_json` gives it back in the same schema.
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from typing import Any, ClassVar, Sequence

from ..errors import ModelFileError
from ..palette import is_hex_color

# Bounds well above any real scene classifier and well below sizes that exhaust memory.
MAX_CHANS = 1024
MAX_CLASSES = 10_000
MAX_PATCH = 2048
MAX_NAME = 255  # a file name's length on common file systems
MIN_GSD = 1e-3  # metres per pixel: 1 mm (close-range imagery) ...
MAX_GSD = 1e4   # ... to 10 km (coarse global products); beyond, tiles of a scene span continents
MAX_INPUT_SIZE = 1024  # the training config's bounds on `input_size` ...
MAX_EMBED_DIM = 4096   # ... and on the matcher's `embed_dim` too
# The sane range of each numeric field, checked where present: (lowest, highest, unit).
BOUNDS: dict[str, tuple[float, float, str]] = {
    "in_chans": (1, MAX_CHANS, "bands"),
    "num_classes": (1, MAX_CLASSES, "classes"),
    "patch_size": (1, MAX_PATCH, "pixels"),
    "input_size": (1, MAX_INPUT_SIZE, "pixels (0 or absent: none)"),
    "gsd": (MIN_GSD, MAX_GSD, "metres per pixel (ground resolution; null: unknown)"),
    "ms_chans": (1, MAX_CHANS, "bands"),
    "embed_dim": (1, MAX_EMBED_DIM, "dimensions"),
}
# what a model's output holds: class probabilities (the default), or logits that the reader
# turns into probabilities (softmax)
OUTPUT_KINDS = (None, "probabilities", "logits")

_HINT_META = "the model's meta.json is damaged or was edited: train the step again (or restore the file)"
_HINT_ONNX = "the model file is damaged or was edited: export it again with `asymkd export`"
_HINT_MATCHER = "the matcher's meta.json is damaged or was edited: run `asymkd matcher` again (or restore the file)"


def control_chars(text: str) -> bool:
    """True when `text` holds control characters (terminal escapes, newlines, NUL...)."""
    return any(unicodedata.category(ch) == "Cc" for ch in text)


class _Check:
    def __init__(self, meta: Any, where: str, hint: str):
        self.meta, self.where, self.hint = meta, where, hint

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.where}: model metadata {what}", self.hint)

    def has(self, key: str) -> Any:
        if key not in self.meta:
            raise self.fail(f"lacks '{key}'")
        return self.meta[key]

    def int_in(self, key: str, lo: int | None = None, hi: int | None = None, value: Any = None) -> int:
        """A whole number within `lo`..`hi` (default: the field's BOUNDS)."""
        value = self.meta[key] if value is None else value
        lo = int(BOUNDS[key][0]) if lo is None else lo
        hi = int(BOUNDS[key][1]) if hi is None else hi
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(f"'{key}' is {_short(value)}; it must be a whole number in {lo}..{hi}")
        return value

    def number_in(self, key: str) -> float:
        """A finite number within the field's BOUNDS."""
        value = self.meta[key]
        lo, hi, unit = BOUNDS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            raise self.fail(f"'{key}' is {_short(value)}; it must be a number from {lo:g} to {hi:g} ({unit})")
        return float(value)

    def model_name(self, key: str) -> str:
        """A timm model name (a backbone)."""
        value = self.has(key)
        if not isinstance(value, str) or not value.strip() or control_chars(value) or len(value) > MAX_NAME:
            raise self.fail(f"'{key}' is {_short(value)}; it must be a model name such as resnet18")
        return value

    def names(self, key: str, lo: int, hi: int, unique: bool) -> list[str]:
        value = self.has(key)
        if not isinstance(value, list) or not lo <= len(value) <= hi:
            raise self.fail(f"'{key}' must be a list of {lo}..{hi} names, not {_short(value)}")
        for name in value:
            if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or control_chars(name):
                raise self.fail(f"'{key}' holds {_short(name)}; names are non-empty text of at most "
                                f"{MAX_NAME} characters without control characters")
        if unique and len(set(value)) != len(value):
            dup = sorted({n for n in value if value.count(n) > 1})
            raise self.fail(f"'{key}' repeats {', '.join(map(repr, dup))}")
        return value

    def numbers(self, key: str, n: int, positive: bool) -> list[float]:
        value = self.has(key)
        if not isinstance(value, list) or len(value) != n:
            raise self.fail(f"'{key}' must be a list of {n} numbers (one per band), not {_short(value)}")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (positive and v <= 0):
                raise self.fail(f"'{key}' holds {_short(v)}; every value must be a finite number"
                                + (" above 0" if positive else ""))
        return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_meta(meta: Any, where: str, onnx: bool = False) -> dict[str, Any]:
    """Check a model's metadata; return it with `in_chans` and `num_classes` filled in.

    Needed: backbone, class_names, band_names, mean, std, patch_size. Checked when present:
    in_chans, num_classes (must equal the name lists' lengths), gsd (None or a number
    in BOUNDS), input_size (0 = none, else within BOUNDS), class_colors (ONNX: one per class),
    output ("probabilities" or "logits").
    Other fields (metrics, summary, kind, ...) are not checked: `ModelMeta.from_json` uses
    those holding their JSON type and keeps the rest as read."""
    c = _Check(meta, where, _HINT_ONNX if onnx else _HINT_META)
    if not isinstance(meta, dict):
        raise c.fail(f"is {type(meta).__name__}, not a JSON object")
    c.model_name("backbone")
    classes = c.names("class_names", 1, MAX_CLASSES, unique=True)
    bands = c.names("band_names", 1, MAX_CHANS, unique=False)
    for key, n in (("in_chans", len(bands)), ("num_classes", len(classes))):
        if key in meta and meta[key] != n:
            c.int_in(key)
            raise c.fail(f"'{key}' is {meta[key]} but it lists {n} "
                         f"{'band' if key == 'in_chans' else 'class'} names")
    c.numbers("mean", len(bands), positive=False)
    c.numbers("std", len(bands), positive=True)
    c.has("patch_size")
    c.int_in("patch_size")
    if meta.get("input_size") not in (None, 0):
        c.int_in("input_size")
    if meta.get("gsd") is not None:
        c.number_in("gsd")
    if meta.get("output") not in OUTPUT_KINDS:
        raise c.fail(f"'output' is {_short(meta.get('output'))}; it must be one of "
                     f"{', '.join(repr(k) for k in OUTPUT_KINDS if k)} (what the model's output holds), or absent")
    if onnx and "class_colors" in meta:
        colors = meta["class_colors"]
        if not isinstance(colors, list) or len(colors) != len(classes) or not all(is_hex_color(v) for v in colors):
            raise c.fail(f"'class_colors' must list one '#rrggbb' colour per class ({len(classes)}), "
                         f"not {_short(colors)}")
    return {**meta, "in_chans": len(bands), "num_classes": len(classes)}


def check_graph_shapes(meta: ModelMeta, input_shape: Sequence[Any], output_shape: Sequence[Any],
                       where: str) -> None:
    """The ONNX graph's input (batch, bands, H, W) and output (batch, classes) agree with
    the metadata. Dynamic axes (names or None) are not checked."""
    def fixed(dim: Any) -> int | None:
        return dim if isinstance(dim, int) and dim > 0 else None

    c = _Check(meta, where, _HINT_ONNX)
    if len(input_shape) != 4:
        raise c.fail(f"does not fit the graph: its input has {len(input_shape)} axes, not 4 (batch, bands, H, W)")
    if fixed(input_shape[1]) not in (None, meta.in_chans):
        raise c.fail(f"lists {meta.in_chans} bands but the graph takes {input_shape[1]}")
    if len(output_shape) != 2:
        raise c.fail(f"does not fit the graph: its output has {len(output_shape)} axes, not 2 (batch, classes)")
    if fixed(output_shape[1]) not in (None, meta.num_classes):
        raise c.fail(f"lists {meta.num_classes} class names but the graph gives {output_shape[1]} outputs")


# -- the typed forms ---------------------------------------------------------------------------

# field name -> the JSON type(s) its value must have to be used
JsonTypes = dict[str, type | tuple[type, ...]]


def _split(meta: dict[str, Any], core: Sequence[str], optional: JsonTypes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the optional fields holding a value of their JSON type, every other non-core key).

    A value of another type (null included) is not used but kept as read, as are keys no
    code reads: a file written by another version, or edited, round-trips unchanged."""
    typed = {k: meta[k] for k, kind in optional.items() if isinstance(meta.get(k), kind)}
    extra = {k: v for k, v in meta.items() if k not in core and k not in typed}
    return {k: typed.get(k) for k in optional}, extra


def _joined(core: dict[str, Any], obj: Any, optional: JsonTypes) -> dict[str, Any]:
    """The JSON object of a typed form: its core fields, its optional fields that are set,
    then its other keys (never replacing a field)."""
    doc = {**core, **{k: getattr(obj, k) for k in optional if getattr(obj, k) is not None}}
    return doc | {k: v for k, v in obj.extra.items() if k not in doc}


# Optional fields of a classifier's metadata and the JSON types they hold.
_MODEL_OPTIONAL: JsonTypes = {
    "kind": str, "role": str, "weights_source": str, "modality": str, "name": str, "output": str,
    "colors": (list, dict), "class_colors": list, "summary": dict, "metrics": dict}
# in_chans and num_classes are the name lists' lengths: written, never stored apart
_MODEL_CORE = ("backbone", "class_names", "band_names", "in_chans", "num_classes", "mean", "std", "patch_size",
               "input_size", "gsd")


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    """A scene classifier's metadata (teacher, student, baseline): its meta.json, and the
    same fields inside an exported ONNX file, which adds `class_colors` and the export's own
    keys (format_version, parity, ...: in `extra`)."""

    backbone: str
    class_names: list[str]
    band_names: list[str]
    mean: list[float]
    std: list[float]
    patch_size: int
    input_size: int = 0                    # the side tiles are resized to inside the model (0: none)
    gsd: float | None = None               # metres per pixel of the training data (None: unknown)
    kind: str | None = None                # "teacher" or "student" (absent in older folders)
    role: str | None = None                # the step that trained it: teacher, student or baseline
    weights_source: str | None = None      # where the backbone's starting weights came from
    modality: str | None = None            # "rgb" or "ms", where the band names do not say
    name: str | None = None                # the model's name in an export (default: its folder's)
    output: str | None = None              # what the output holds: probabilities (None) or "logits"
    colors: list[Any] | dict[str, Any] | None = None  # meta.json: colours chosen for the classes
    class_colors: list[str] | None = None  # ONNX: one '#rrggbb' per class
    summary: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def in_chans(self) -> int:
        return len(self.band_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_json(cls, data: Any, where: str, onnx: bool = False) -> ModelMeta:
        """The metadata in a file's JSON object, checked by `validate_meta` (ModelFileError
        naming `where` and the field)."""
        meta = validate_meta(data, where, onnx)
        optional, extra = _split(meta, _MODEL_CORE, _MODEL_OPTIONAL)
        gsd = meta.get("gsd")
        return cls(backbone=meta["backbone"], class_names=list(meta["class_names"]),
                   band_names=list(meta["band_names"]), mean=[float(v) for v in meta["mean"]],
                   std=[float(v) for v in meta["std"]], patch_size=meta["patch_size"],
                   input_size=int(meta.get("input_size") or 0), gsd=None if gsd is None else float(gsd),
                   **optional, extra=extra)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of meta.json (the schema `from_json` reads)."""
        core = {"backbone": self.backbone, "class_names": list(self.class_names), "band_names": list(self.band_names),
                "in_chans": self.in_chans, "num_classes": self.num_classes, "mean": list(self.mean),
                "std": list(self.std), "patch_size": self.patch_size, "input_size": self.input_size, "gsd": self.gsd}
        return _joined(core, self, _MODEL_OPTIONAL)


MATCHER_KIND = "matcher"
_MATCHER_OPTIONAL: JsonTypes = {"kind": str, "rgb_mean": list, "rgb_std": list, "band_names": list, "summary": dict}


@dataclasses.dataclass(frozen=True)
class MatcherMeta:
    """The matcher's meta.json: its two encoders and the normalisation of the MS set."""

    ms_backbone: str
    rgb_backbone: str
    ms_chans: int
    embed_dim: int
    ms_mean: list[float]
    ms_std: list[float]
    rgb_mean: list[float] | None = None   # the paired RGB's; a set paired later is standardised on itself
    rgb_std: list[float] | None = None
    band_names: list[str] | None = None   # the MS bands
    summary: dict[str, Any] | None = None
    kind: str | None = MATCHER_KIND       # absent in folders of older versions
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    REQUIRED: ClassVar[tuple[str, ...]] = ("ms_backbone", "rgb_backbone", "ms_chans", "embed_dim", "ms_mean", "ms_std")

    @classmethod
    def from_json(cls, data: Any, where: str, hint: str = _HINT_MATCHER) -> MatcherMeta:
        """The matcher's metadata in a file's JSON object; ModelFileError naming `where` and
        the field when a field is missing or out of its bounds."""
        c = _Check(data, where, hint)
        if not isinstance(data, dict):
            raise c.fail(f"is {type(data).__name__}, not a JSON object")
        for key in cls.REQUIRED:
            c.has(key)
        c.model_name("ms_backbone")
        c.model_name("rgb_backbone")
        chans = c.int_in("ms_chans")
        c.int_in("embed_dim")
        c.numbers("ms_mean", chans, positive=False)
        c.numbers("ms_std", chans, positive=True)
        optional, extra = _split(data, cls.REQUIRED, _MATCHER_OPTIONAL)
        return cls(ms_backbone=data["ms_backbone"], rgb_backbone=data["rgb_backbone"], ms_chans=chans,
                   embed_dim=data["embed_dim"], ms_mean=[float(v) for v in data["ms_mean"]],
                   ms_std=[float(v) for v in data["ms_std"]], **optional, extra=extra)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the matcher's meta.json."""
        core = {"ms_backbone": self.ms_backbone, "rgb_backbone": self.rgb_backbone, "ms_chans": self.ms_chans,
                "embed_dim": self.embed_dim, "ms_mean": list(self.ms_mean), "ms_std": list(self.ms_std)}
        return _joined(core, self, _MATCHER_OPTIONAL)
