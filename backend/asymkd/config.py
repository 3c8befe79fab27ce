"""Run configuration: dataclasses validated at the edge (config file, CLI flags, --set).

A run's resolved config is written to RUN/config.yaml; later steps of the same run start
from it, so `asymkd teacher` then `asymkd distill --run RUN` share data paths and seeds.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, get_args, get_origin, get_type_hints

import tomllib
import yaml

from . import choices, settings
from .errors import ConfigError
from .models.metadata import MAX_EMBED_DIM, MAX_GSD, MAX_INPUT_SIZE, MIN_GSD
from .settings import BOTH, setting


@dataclass
class DataConfig:
    ms: str | None = setting(None, path=True, help="MS folder dataset root/<Class>/*.tif")
    rgb: str | None = setting(None, path=True, help="labeled RGB folder dataset")
    rgb_unlabeled: str | None = setting(None, path=True,
                                        help="folder of unlabeled RGB images (class folders not needed)")
    rgb_paired: str | None = setting(None, path=True,
                                     help="RGB images of the same targets as the MS set (same file stems)")
    rgb_test: str | None = setting(None, path=True, help="labeled RGB test folder")
    bands: str | None = setting(None, help="MS band names: sentinel2 or B01,B02,...")
    # Few labels are worth more as training data than as a noisy model-selection set.
    val_fraction: float = setting(0.0, flag=False, help="stratified validation split of the labeled RGB, "
                                  "in [0, 0.9) (0 = none: train on every label and keep the last epoch)")
    rgb_limit_per_class: int = setting(0, flag=False, range=(0, 10**9, "0 = all"),
                                       help="use at most N labeled RGB per class")
    rgb_rest_unlabeled: bool = setting(False, flag=False, help="labeled RGB beyond that limit join as unlabeled")
    # JPEG and PNG patches carry no ground resolution; a model needs one to tile a map at the
    # scale it was trained on (classify resamples rasters to it).
    rgb_gsd: float = setting(0.0, metavar="M", help="ground resolution of RGB patches without a georeference "
                             "(JPEG, PNG), in metres per pixel (0 = that of georeferenced RGB patches, else "
                             "of the MS patches)")


@dataclass
class ClassifierConfig:
    """What the teacher and the student share: their network, its start and its schedule."""
    backbone: str = setting(choices.DEFAULT_BACKBONE, help="efficientnet_lite0 (bundled ImageNet weights), "
                            "resnet18_w32 (from scratch) or a timm model name (default {default})")
    pretrained: bool = setting(True, help="start the backbone from its ImageNet weights (bundled or hub), "
                               "not from random weights")
    weights: str | None = setting(None, path=True, help="local backbone weights file to start from")
    # Small patches gain detail for the pretrained filters (docs/benchmarks.md).
    input_size: int = setting(96, metavar="PX", range=(0, MAX_INPUT_SIZE, "0 = the patches as they are"),
                              help="resize patches to PX inside the model (0 = as they are; default {default})")
    epochs: int = setting(0, range=(0, 100_000, "0 = automatic for the teacher and the student"),
                          help="training epochs (0 = auto: 30 pretrained / 80 from scratch, or enough for min_steps)")
    min_steps: int = setting(240, flag=False, range=(0, 10**7, ""),
                             help="with automatic epochs, at least this many optimiser steps")
    batch_size: int = setting(32, range=(2, 65_536, ""), help="samples per optimiser step (default {default})")
    lr: float = setting(2e-3, help="learning rate (default {default})")
    weight_decay: float = setting(5e-4, flag=False, help="AdamW weight decay")
    # Both students' terms are smoothed too, so the gain measured is the teacher's, not the
    # smoothing's (docs/benchmarks.md).
    label_smoothing: float = setting(0.1, flag=False, help="label smoothing of the ground-truth term")


@dataclass
class TeacherConfig(ClassifierConfig):
    folds: int = setting(5, range=(0, 100, "0 = no out-of-fold teachers; else at least 2"),
                         help="out-of-fold teachers for soft labels (0 = none: in-sample; default {default})")


@dataclass
class MatcherConfig:
    backbone_ms: str = setting("resnet18_w16", flag=False, help="backbone of the MS branch")
    backbone_rgb: str = setting("resnet18_w16", flag=False, help="backbone of the RGB branch")
    embed_dim: int = setting(64, range=(1, MAX_EMBED_DIM, ""), help="size of the shared embedding (default {default})")
    epochs: int = setting(60, range=(0, 100_000, ""), help="training epochs (default {default})")
    batch_size: int = setting(64, flag=False, range=(2, 65_536, ""), help="pairs per optimiser step")
    lr: float = setting(2e-3, flag=False, help="learning rate")
    temperature: float = setting(0.1, flag=False, help="temperature of the contrastive loss")
    positives: str = setting("auto", choices=choices.POSITIVES,
                             help="same-target positives: explicit pairs, or pseudo-RGB from MS bands")


@dataclass
class PairingConfig:
    method: str = setting("balanced", choices=choices.PAIRING_METHODS,
                          help="how each RGB sample finds an MS sample of its class (default {default})")
    sinkhorn_iters: int = setting(50, flag=False, range=(1, 100_000, ""), help="Sinkhorn iterations of balanced")
    epsilon: float = setting(0.05, flag=False, help="entropic regularisation of balanced")


@dataclass
class DistillConfig(ClassifierConfig):
    w_feat: float = setting(0.05, help="weight of the domain-shift (CORAL/MMD) term on attention-aligned features")
    w_pseudo: float = setting(1.0, help="weight of the teacher pseudo-label term")
    w_gt: float = setting(1.0, help="weight of the ground-truth term (labeled RGB)")
    pseudo: str = setting("kl", choices=choices.PSEUDO_MODES, help="pseudo-label term")
    temperature: float = setting(3.0, help="temperature of the pseudo-label term (default {default})")
    domain_loss: str = setting("coral", choices=choices.DOMAIN_LOSSES, help="domain-shift term")
    attention_dim: int = setting(64, flag=False, range=(1, 4096, ""), help="width of the feature attention")
    attention_heads: int = setting(4, flag=False, range=(1, 64, ""), help="heads of the feature attention")
    repair_every: int = setting(0, metavar="K", range=(-1, 10**9, "0 = every epoch, -1 = never"),
                                help="re-pair every K steps (0 = every epoch, -1 = never)")
    trust: bool = setting(True, flag=False, help="weight pseudo-labels by teacher confidence/agreement")
    baseline: bool = setting(True, flag=BOTH,
                             help="also train the same student without distillation (default {default})")
    semi_supervised: str = setting("fixmatch", choices=choices.SEMI_SUPERVISED,
                                   help="how unlabeled RGB trains the student")
    fixmatch_threshold: float = setting(0.95, flag=False, help="pseudo-label a strong view where the weak view is "
                                        "this sure, as a share of the confidence label smoothing lets the model "
                                        "reach, in (0, 1]")
    fixmatch_ratio: int = setting(2, flag=False, range=(1, 16, ""), help="unlabeled samples per labeled sample "
                                  "in a batch")
    w_unlabeled: float = setting(1.0, flag=False, help="weight of the consistency term")
    # Re-pairing gives an unlabeled sample the MS partner whose soft label is closest to the
    # student's own guess: on top of FixMatch that reinforces the guess, and across sensors
    # it collapsed the 40-label aid8 student (docs/benchmarks.md).
    teacher_on_unlabeled: bool = setting(False, flag=False, help="with semi-supervision, the unlabeled RGB also "
                                         "take their MS partner's soft label (without it they always do)")
    shift: int = setting(-1, flag=False, range=(-1, 64, "-1 = automatic"),
                         help="random translation of labeled patches, pixels (-1 = auto: an eighth of the patch "
                              "from scratch, 0 for a pretrained start)")
    ms_rows: bool = setting(True, flag=False, help="the MS samples also train the distilled student as RGB rows "
                            "(their own target in RGB), each paired with itself; the baseline stays RGB-only")
    balance_rows: bool = setting(False, flag=False,
                                 help="repeat the labeled RGB rows until they are as many as the MS rows")
    ms_rows_jitter: bool = setting(False, flag=False,
                                   help="colour jitter on the MS rows' labeled view (another sensor's colours)")
    all_teacher_classes: bool = setting(False, help="the student learns every class of the teacher, not only "
                                        "those of its RGB labels")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = setting(0, range=(0, 2**32 - 1, ""), help="random seed (default {default})")
    device: str = setting("auto", choices=choices.DEVICES, help="torch device")
    amp: bool = setting(True, flag=False, help="mixed precision on CUDA")
    checkpoint_every: int = setting(1, flag=False, range=(1, 100_000, ""),
                                    help="epochs between resumable checkpoints")
    workers: int = setting(0, flag=False, range=(0, 1024, "0 = torch's default"), help="torch threads")


# Every setting of a run, each as its section declares it (settings.py).
SETTINGS: list[settings.Entry] = settings.entries(RunConfig)
# config key -> its table of named choices
CONFIG_CHOICES: dict[str, Mapping[str, str]] = {e.key: e.spec.choices for e in SETTINGS if e.spec.choices}


def _int_ranges() -> dict[str, tuple[int, int, str]]:
    """Inclusive bounds of the integer settings by field name, for readers outside the config
    (models/metadata.py); sections that share a name share its bounds (a test checks), and
    validation reads each field's own declaration."""
    out: dict[str, tuple[int, int, str]] = {}
    for e in SETTINGS:
        if e.kind is int and e.spec.range:
            out.setdefault(e.name, (int(e.spec.range[0]), int(e.spec.range[1]), e.spec.range[2]))
    return out


INT_RANGES = _int_ranges()


def _to_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    return bool(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)  # `epochs: true` is not 1 epoch
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


# The longest text setting (paths, names): a path is at most 4096 bytes on Linux, and a
# longer value is a mistake (or an attack) that would be copied into every run file.
MAX_TEXT = 4096


def _to_text(value: Any) -> str:
    if isinstance(value, (dict, list, tuple, set)):  # `ms: [a, b]` is not the folder "['a', 'b']"
        raise ValueError(value)
    text = str(value)
    if len(text) > MAX_TEXT:
        raise ValueError(value)
    if not _is_utf8(text):
        raise ValueError(value)
    return text


def _is_utf8(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (a lone surrogate, e.g. YAML's "\\ud800", cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SCALARS: dict[Any, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_text}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check and convert one value to its field type (strings from --set included)."""
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, not {value!r}")
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
    convert = _SCALARS.get(hint)
    if convert is None:
        return value
    try:
        converted = convert(value)
    except (TypeError, ValueError):
        if hint is str:
            raise ConfigError(f"{where} must be a single text value (a path or a name) of at most {MAX_TEXT} "
                              f"characters, without lone surrogates, not {_shown(value)}",
                              f"set {where} to one path or name (not a list or a mapping)") from None
        raise ConfigError(f"{where} must be {getattr(hint, '__name__', hint)}, not {_shown(value)}") from None
    if hint is float and not math.isfinite(converted):  # inf/nan settings train NaN models
        raise ConfigError(f"{where} must be a finite number, not {value!r}")
    return converted


def _shown(value: Any, limit: int = 80) -> str:
    """`value` as a short, printable representation for a message."""
    text = ascii(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(text)} characters)"


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{where}{key}'", hint)


def _apply(obj: Any, values: dict[str, Any], where: str) -> None:
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in names:
            raise _unknown(key, names, where)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}{key}' must be a section (a mapping of keys)")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}{key}"))


def check_settings(cfg: Any) -> None:
    """Every setting of `cfg` within its declared range and among its declared choices."""
    for entry in settings.entries(type(cfg)):
        value = settings.value(cfg, entry.key)
        if entry.spec.range is not None:
            _check_range(entry, value)
        if entry.spec.choices is not None:
            choices.check(entry.key, value, entry.spec.choices)


def _check_range(entry: settings.Entry, value: Any) -> None:
    low, high, note = entry.spec.range or (0, 0, "")
    number = int if entry.kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, number) or not low <= value <= high:
        whole = "a whole number" if entry.kind is int else "a number"
        raise ConfigError(f"{entry.key} must be {whole} from {low} to {high}{f' ({note})' if note else ''}, "
                          f"not {value!r}",
                          f"set it in the config file (or RUN/config.yaml), or with --set {entry.key}=N")


def validate(cfg: RunConfig) -> RunConfig:
    check_settings(cfg)
    checks = [
        (0 <= cfg.data.val_fraction < 0.9, "data.val_fraction must be in [0, 0.9)"),
        (cfg.data.rgb_gsd == 0 or MIN_GSD <= cfg.data.rgb_gsd <= MAX_GSD,
         f"data.rgb_gsd must be 0 (unset) or from {MIN_GSD:g} to {MAX_GSD:g} metres per pixel"),
        (min(cfg.teacher.lr, cfg.distill.lr, cfg.matcher.lr) > 0, "lr must be > 0"),
        (min(cfg.distill.w_feat, cfg.distill.w_pseudo, cfg.distill.w_gt) >= 0, "loss weights must be >= 0"),
        (cfg.distill.temperature > 0 and cfg.matcher.temperature > 0, "temperatures must be > 0"),
        (0 < cfg.distill.fixmatch_threshold <= 1, "distill.fixmatch_threshold must be in (0, 1]"),
        (cfg.distill.w_unlabeled >= 0, "distill.w_unlabeled must be >= 0"),
        (cfg.teacher.folds == 0 or cfg.teacher.folds >= 2, "teacher.folds must be 0 or >= 2"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    from .models.backbones import resolve_backbone  # fail before training, not after hours
    for name in {cfg.teacher.backbone, cfg.distill.backbone, cfg.matcher.backbone_ms, cfg.matcher.backbone_rgb}:
        resolve_backbone(name)
    return cfg


def from_dict(values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    cfg = from_plain(to_dict(base)) if base is not None else RunConfig()  # a deep copy
    _apply(cfg, values or {}, "")
    return validate(cfg)


def from_plain(values: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, values, "")
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a config file has no use for them, and a few
    nested aliases (a "billion laughs") expand into gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed in a config file",
                event.start_mark)
        return super().compose_node(parent, index)


def _check_text(values: Any, path: Path, where: str = "") -> None:
    """Every key and string of a parsed config file is UTF-8 text."""
    if isinstance(values, dict):
        for key, value in values.items():
            if isinstance(key, str) and not _is_utf8(key):
                raise ConfigError(f"config file {path} has a key that is not UTF-8 text: {_shown(key)}",
                                  "remove the lone surrogate (an escape such as \\ud800) from the key")
            _check_text(value, path, f"{where}{key}.")
    elif isinstance(values, list):
        for value in values:
            _check_text(value, path, where)
    elif isinstance(values, str) and not _is_utf8(values):
        raise ConfigError(f"config file {path}: {where.rstrip('.')} is not UTF-8 text: {_shown(values)}",
                          "remove the lone surrogate (an escape such as \\ud800) from the value")


def read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                          "give a YAML or TOML config file saved as UTF-8") from None
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.load(text, Loader=_NoAliasLoader)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}",
                          "write the settings out in full (no &anchor/*alias), as plain YAML or TOML") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    _check_text(values, path)
    return values


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set distill.w_feat=0.1 seed=3` -> nested dict (values stay strings; coerced later)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}", "e.g. --set distill.epochs=5")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_config(path: str | Path, cfg: RunConfig) -> Path:
    """Write `cfg` as YAML to `path` (a run's RUN/config.yaml) atomically."""
    from .fileio import atomic_write_text
    return atomic_write_text(path, dump(cfg))
