"""Engine command lines for each step, shared by the dock and the Processing algorithms
(one code path per job). Pure functions of plain values: no widgets, no layers.

A run folder holds everything of one training run; the plugin keeps the map datasets it cuts
under RUN/data/ and the engine writes RUN/teacher, RUN/matcher, RUN/pairs, RUN/student, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .tasks import EngineCommand

DEVICES = ("auto", "cpu", "cuda")
PAIR_METHODS = ("balanced", "nearest")
GRIDS = ("pixels", "xyz")


@dataclass
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def ms(self) -> Path:
        return self.data / "ms"

    @property
    def rgb_paired(self) -> Path:
        return self.data / "rgb_paired"

    @property
    def rgb(self) -> Path:
        return self.data / "rgb"

    @property
    def rgb_test(self) -> Path:
        return self.data / "rgb_test"

    @property
    def exports(self) -> Path:
        """Layers that are not local files, written out for the engine."""
        return self.data / "exports"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def student_onnx(self) -> Path:
        return self.root / "student.onnx"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def classified(self) -> Path:
        return self.root / "classified"


@dataclass
class MapData:
    """A raster file plus a labeled vector file to cut into chips."""

    raster: str
    labels: str
    field: str
    layer: str | None = None


def chips_command(data: MapData, out: Path, size: int = 64, resolution: float | None = None,
                  pair_raster: str | None = None, pair_out: Path | None = None,
                  label: str = "cutting chips") -> EngineCommand:
    args = ["chips", "--raster", data.raster, "--labels", data.labels, "--field", data.field]
    if data.layer:
        args += ["--layer", data.layer]
    args += ["--size", str(int(size)), "--out", str(out)]
    if resolution:
        args += ["--resolution", f"{float(resolution):g}"]
    if pair_raster:
        args += ["--pair-raster", pair_raster, "--pair-out", str(pair_out)]
    return EngineCommand(args, label, weight=0.5)


def parse_settings(text: str) -> list[str]:
    """'teacher.folds=0 distill.lr=0.001' -> ['teacher.folds=0', 'distill.lr=0.001'] for --set."""
    items = [item.strip() for item in text.replace(",", " ").split() if item.strip()]
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"'{item}' is not KEY=VALUE (e.g. teacher.folds=0)")
    return items


def _with_settings(args: list[str], settings: list[str]) -> list[str]:
    return args + (["--set", *settings] if settings else [])


@dataclass
class TeacherOptions:
    bands: str = ""
    backbone: str = ""
    epochs: int = 0
    device: str = "auto"
    seed: int | None = None
    settings: list[str] = field(default_factory=list)


def teacher_command(run: Path, ms: Path, options: TeacherOptions) -> EngineCommand:
    args = ["teacher", "--run", str(run), "--ms", str(ms)]
    if options.bands:
        args += ["--bands", options.bands]
    if options.backbone:
        args += ["--backbone", options.backbone]
    if options.epochs:
        args += ["--epochs", str(int(options.epochs))]
    if options.device:
        args += ["--device", options.device]
    if options.seed is not None:
        args += ["--seed", str(int(options.seed))]
    return EngineCommand(_with_settings(args, options.settings), "training the teacher", weight=3.0)


@dataclass
class MatcherOptions:
    epochs: int = 0
    method: str = "balanced"
    device: str = "auto"
    settings: list[str] = field(default_factory=list)


def matcher_commands(run: Path, rgb: Path, options: MatcherOptions, rgb_paired: Path | None = None,
                     rgb_unlabeled: Path | None = None) -> list[EngineCommand]:
    matcher = ["matcher", "--run", str(run)]
    if rgb_paired is not None:
        matcher += ["--rgb-paired", str(rgb_paired)]
    if options.epochs:
        matcher += ["--epochs", str(int(options.epochs))]
    if options.device:
        matcher += ["--device", options.device]
    pair = ["pair", "--run", str(run), "--rgb", str(rgb)]
    if rgb_unlabeled is not None:
        pair += ["--rgb-unlabeled", str(rgb_unlabeled)]
    if options.method:
        pair += ["--method", options.method]
    if options.device:
        pair += ["--device", options.device]
    return [EngineCommand(_with_settings(matcher, options.settings), "training the matcher", weight=2.0),
            EngineCommand(_with_settings(pair, options.settings), "pairing RGB with MS samples", weight=0.5)]


@dataclass
class DistillOptions:
    epochs: int = 0
    repair_every: int = 0
    w_feat: float | None = None
    w_pseudo: float | None = None
    w_gt: float | None = None
    baseline: bool = True
    device: str = "auto"
    settings: list[str] = field(default_factory=list)


def distill_command(run: Path, options: DistillOptions, rgb_test: Path | None = None) -> EngineCommand:
    args = ["distill", "--run", str(run)]
    if rgb_test is not None:
        args += ["--rgb-test", str(rgb_test)]
    if options.epochs:
        args += ["--epochs", str(int(options.epochs))]
    if options.repair_every:
        args += ["--repair-every", str(int(options.repair_every))]
    for flag, value in (("--w-feat", options.w_feat), ("--w-pseudo", options.w_pseudo),
                        ("--w-gt", options.w_gt)):
        if value is not None and value >= 0:  # negative: the engine's default
            args += [flag, f"{float(value):g}"]
    args.append("--baseline" if options.baseline else "--no-baseline")
    if options.device:
        args += ["--device", options.device]
    phases = ("distill", "baseline") if options.baseline else ("distill",)
    return EngineCommand(_with_settings(args, options.settings), "distilling the student", weight=4.0, phases=phases)


def export_command(model: Path, out: Path) -> EngineCommand:
    return EngineCommand(["export", str(model), "--out", str(out), "--overwrite"], "exporting the model", weight=0.3)


@dataclass
class ClassifyOptions:
    bands: str = ""
    tile: int = 0
    stride: int = 0
    xyz_zoom: int | None = None
    batch_size: int = 0
    bbox: tuple[float, float, float, float] | None = None
    bbox_crs: str = ""
    mask: str = ""
    device: str = "auto"
    overwrite: bool = True


def classify_command(model: Path, raster: str, out: Path, options: ClassifyOptions) -> EngineCommand:
    args = ["classify", str(model), str(raster), "--out", str(out)]
    if options.bands:
        args += ["--bands", options.bands.replace(" ", "")]
    if options.bbox is not None:
        # one token: a box with a negative minx would otherwise read as an option
        args.append("--bbox=" + ",".join(f"{v:.10g}" for v in options.bbox))
        if options.bbox_crs:
            args += ["--bbox-crs", options.bbox_crs]
    elif options.mask:
        args += ["--mask", options.mask]
    if options.xyz_zoom is not None:
        args += ["--xyz-zoom", str(int(options.xyz_zoom))]
    else:
        if options.tile:
            args += ["--tile", str(int(options.tile))]
        if options.stride:
            args += ["--stride", str(int(options.stride))]
    if options.batch_size:
        args += ["--batch-size", str(int(options.batch_size))]
    if options.device and options.device != "auto":
        args += ["--device", options.device]
    if options.overwrite:
        args.append("--overwrite")
    return EngineCommand(args, "classifying tiles", weight=2.0)
