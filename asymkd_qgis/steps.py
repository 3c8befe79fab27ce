"""One spec per step of a run, shared by the dock and the Processing algorithms: options ->
engine command lines, input preparation (chips cut from map layers; layers that are not
files exported by the job, in its worker thread), the run-folder paths a step needs and
writes, and the reader of its results. The forms only turn their widgets or parameters into
these options and inputs.

A run folder holds everything of one training run (layout.py): the plugin keeps the map
datasets it cuts under RUN/data/, the engine writes RUN/teacher, RUN/matcher, RUN/pairs, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer, QgsRectangle, QgsVectorLayer

from . import layers, layout, results
from .errors import InputError
from .layout import RunLayout
from .modelinfo import ModelInfoError, read_model_info
from .runner import EngineCommand, Prepared, PreStep
from .validation import check_labels, check_rgb_raster

# The device choices of the forms (the engine also takes cuda:N, e.g. in More settings).
DEVICES = ("auto", "cpu", "cuda")
# Offered when the engine cannot be asked (choices.FALLBACK); otherwise `asymkd choices` names them.
PAIR_METHODS = ("balanced", "nearest")
DOMAIN_LOSSES = ("coral", "coral_rel", "mmd")
UNCERTAINTY_MEASURES = ("confidence", "margin", "entropy")  # classify --uncertain-by


@dataclass(frozen=True)
class StepSpec:
    """A step's name in the forms, the run folder it needs first, and where its results are."""

    title: str
    needs: str | None = None                       # a folder of the run that must exist
    needs_hint: str = ""
    read_results: Callable[[RunLayout], results.StepResults] | None = None
    outputs: Callable[[RunLayout], dict[str, Path]] = lambda run: {}


SPECS: dict[str, StepSpec] = {
    "data": StepSpec("Data", read_results=results.data_results),
    "teacher": StepSpec("Teacher", read_results=results.teacher_results,
                        outputs=lambda run: {"TEACHER": run.teacher}),
    "matcher": StepSpec("Matcher and pairing", layout.TEACHER, "run the Teacher step first",
                        results.matcher_results, lambda run: {"MATCHER": run.matcher, "PAIRS": run.pairs_file}),
    "distill": StepSpec("Distill", layout.PAIRS, "run the Matcher and pairing step first",
                        results.distill_results, lambda run: {"STUDENT": run.student, "REPORT": run.report}),
    "classify": StepSpec("Classify"),
}


def require_previous(run: RunLayout, step: str) -> None:
    """InputError unless the run folder holds what `step` builds on."""
    spec = SPECS[step]
    if spec.needs and not (run.root / spec.needs).is_dir():
        raise InputError(f"There {'are' if spec.needs.endswith('s') else 'is'} no {spec.needs} in this run folder "
                         f"yet ({run.root / spec.needs} is missing): {spec.needs_hint} on the same run folder.")


# -- inputs ---------------------------------------------------------------------------------
def raster_file(layer: QgsRasterLayer, folder: Path, extent: QgsRectangle | None,
                extent_crs: QgsCoordinateReferenceSystem | None, resolution: float | None,
                prepared: Prepared) -> str:
    """The layer's file; a layer that is not a local file is exported by the job, in its
    worker thread, before the engine starts (web layers can take a while)."""
    path, export = layers.raster_source(layer, folder, extent, extent_crs, resolution)
    if export is not None:
        prepared.pre_steps.append(PreStep(f"exporting '{layer.name()}' for the area", export.run))
    return path


def vector_file(layer: QgsVectorLayer, folder: Path, prepared: Prepared, only_selected: bool = False,
                gpkg_only: bool = False) -> layers.VectorSource:
    """The layer's OGR file; other layers (or a selection; with gpkg_only, any layer that is
    not a whole GeoPackage) are exported by the job first."""
    source, export = layers.vector_source(layer, folder, only_selected, gpkg_only)
    if export is not None:
        prepared.pre_steps.append(PreStep(f"exporting '{layer.name()}'", export.run))
    return source


@dataclass
class MapSource:
    """A raster layer and its labeled polygons or points, chosen in a form."""

    raster: QgsRasterLayer | None
    labels: QgsVectorLayer | None
    field: str


@dataclass
class ChipOptions:
    size: int = 64
    resolution: float | None = None  # ground resolution; None = the raster's


def map_chips(source: MapSource, what: str, out: Path, run: RunLayout, chips: ChipOptions,
              check_raster: Callable, pair: QgsRasterLayer | None = None,
              pair_out: Path | None = None) -> Prepared:
    """Check a map dataset and cut it into chips under `out` (co-located chips of `pair`,
    an RGB raster co-registered with it, under `pair_out`)."""
    raster = check_raster(source.raster)
    if pair is not None:
        check_rgb_raster(pair, "co-registered RGB layer")
    check_labels(source.labels, source.field, raster)
    prepared = Prepared(f"cutting {what} chips")
    pair_file = None
    if pair is not None:
        pair_file = raster_file(pair, run.exports, raster.extent(), raster.crs(), chips.resolution, prepared)
    vector = vector_file(source.labels, run.exports, prepared)
    data = MapData(raster_file(raster, run.exports, raster.extent(), raster.crs(), chips.resolution, prepared),
                   vector.path, source.field, vector.layer_name)
    prepared.commands.append(chips_command(data, out, chips.size, chips.resolution, pair_file,
                                           pair_out if pair_file else None, f"cutting {what} chips"))
    return prepared


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
class ModelOptions:
    """The network a step trains: empty / None values leave the engine's default."""

    backbone: str = ""
    input_size: int | None = None  # resize patches to this many pixels (0 = as they are)
    pretrained: bool = True        # False: random weights (--no-pretrained)
    weights: str = ""              # a local state dict to start from

    def args(self, section: str) -> tuple[list[str], list[str]]:
        """(flags, --set items) for the `teacher` or `distill` command."""
        args: list[str] = []
        if self.backbone:
            args += ["--backbone", self.backbone]
        if self.input_size is not None and self.input_size >= 0:
            args += ["--input-size", str(int(self.input_size))]
        if not self.pretrained:
            args.append("--no-pretrained")
        return args, ([f"{section}.weights={self.weights}"] if self.weights else [])


@dataclass
class TeacherOptions:
    bands: str = ""
    model: ModelOptions = field(default_factory=ModelOptions)
    epochs: int = 0
    device: str = "auto"
    seed: int | None = None
    settings: list[str] = field(default_factory=list)


def teacher_command(run: Path, ms: Path, options: TeacherOptions) -> EngineCommand:
    args = ["teacher", "--run", str(run), "--ms", str(ms)]
    if options.bands:
        args += ["--bands", options.bands]
    model_args, model_settings = options.model.args("teacher")
    args += model_args
    if options.epochs:
        args += ["--epochs", str(int(options.epochs))]
    if options.device:
        args += ["--device", options.device]
    if options.seed is not None:
        args += ["--seed", str(int(options.seed))]
    return EngineCommand(_with_settings(args, model_settings + options.settings), "training the teacher", weight=3.0)


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
    model: ModelOptions = field(default_factory=ModelOptions)
    domain_loss: str = ""  # empty: the engine's default
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
    model_args, model_settings = options.model.args("distill")
    args += model_args
    if options.domain_loss:
        args += ["--domain-loss", options.domain_loss]
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
    return EngineCommand(_with_settings(args, model_settings + options.settings), "distilling the student",
                         weight=4.0, phases=phases)


def export_command(model: Path, out: Path) -> EngineCommand:
    return EngineCommand(["export", str(model), "--out", str(out), "--overwrite"], "exporting the model", weight=0.3)


# -- classify ---------------------------------------------------------------------------------
# The classify options are the engine's (asymkd.classify.ClassifyOptions, by its names): the
# forms send only what the user set, so the engine's defaults apply to the rest.
def engine_flags(chosen: dict[str, Any]) -> list[str]:
    """`--name value` for each option set (True: the flag alone); None, "" and False are not sent."""
    args: list[str] = []
    for name, value in chosen.items():
        if value is None or value is False or value == "":
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        else:
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return args


def _applicable(chosen: dict[str, Any]) -> dict[str, Any]:
    """Drop what the other choices make moot, as the forms grey it out (the engine refuses some)."""
    chosen = dict(chosen)
    if chosen.get("xyz_zoom") is not None:
        chosen.pop("tile", None)
        chosen.pop("stride", None)
    if not chosen.get("uncertain_below"):
        chosen.pop("uncertain_by", None)
    if not chosen.get("regions"):
        chosen.pop("min_region_ha", None)
    if chosen.get("device") == "auto":  # the forms' "auto" is the engine's own choice
        chosen.pop("device")
    if chosen.get("bands"):
        chosen["bands"] = str(chosen["bands"]).replace(" ", "")
    return chosen


@dataclass
class Area:
    """Where to classify: its engine flags (none: the whole raster) and the extent and CRS
    that an export of the raster covers."""

    flags: list[str]
    extent: QgsRectangle
    crs: QgsCoordinateReferenceSystem


def classify_area(raster: QgsRasterLayer, folder: Path, prepared: Prepared,
                  box: tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None = None,
                  mask: QgsVectorLayer | None = None, selected: bool = False) -> Area:
    """A box, polygons (with `selected`, the selected ones: written by the job, not now), or
    with neither the whole raster."""
    if box is not None:
        extent, crs = box
        corners = (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())
        # one token: a box with a negative minx would otherwise read as an option
        flags = ["--bbox=" + ",".join(f"{v:.10g}" for v in corners)]
        return Area(flags + (["--bbox-crs", crs.authid()] if crs.authid() else []), extent, crs)
    if mask is not None:
        if selected and mask.selectedFeatureCount() == 0:
            raise InputError(f"No polygons are selected in '{mask.name()}': select the area's polygons first.")
        source = vector_file(mask, folder, prepared, only_selected=selected)
        flags = ["--mask", source.path] + (["--mask-layer", source.layer_name] if source.layer_name else [])
        return Area(flags, mask.boundingBoxOfSelected() if selected else mask.extent(), mask.crs())
    return Area([], raster.extent(), raster.crs())


def classify_model(model: Path, prepared: Prepared, missing: str) -> Path:
    """`model`; when it is a run's student.onnx and the student beside it is newer (or not
    exported yet), the export runs first. InputError(`missing`) when there is neither."""
    run = RunLayout(model.parent)
    weights = run.student_weights
    if model == run.student_onnx and weights.is_file() and (
            not model.is_file() or model.stat().st_mtime < weights.stat().st_mtime):
        prepared.commands.append(export_command(run.student, model))
    elif not model.is_file():
        raise InputError(missing)
    return model


def model_gsd(model: Path, strict: bool = False) -> float | None:
    """The ground resolution the model was trained at (web layers are exported at it), read
    from the model or else the student folder beside it (a model not exported yet). None when
    unknown; with `strict`, a model file that neither explains is an InputError."""
    try:
        return read_model_info(model).gsd
    except ModelInfoError as exc:
        error = exc
    try:
        return read_model_info(RunLayout(model.parent).student).gsd
    except ModelInfoError:
        if strict and model.is_file():
            raise InputError(str(error)) from error
        return None


def classify_command(model: Path, raster: str, out: Path, area: Area, chosen: dict[str, Any]) -> EngineCommand:
    """`chosen`: the classify options the user set, by the engine's names (tile, batch_size,
    uncertain_below, overwrite, ...); None leaves the engine's default."""
    args = ["classify", str(model), str(raster), "--out", str(out), *area.flags, *engine_flags(_applicable(chosen))]
    return EngineCommand(args, "classifying tiles", weight=2.0)
