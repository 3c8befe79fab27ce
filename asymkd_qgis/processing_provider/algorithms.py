"""Processing algorithms: Train teacher, Train matcher and pair, Distill student, Export
model, Classify scene tiles. Each turns its parameters into the options and inputs of the
step's spec that the dock uses too (steps.py), and runs it through the runner the dock uses
too (runner.py), with the feedback object as its sink: exports of layers that are not files
first, then the engine.

Checking the parameters and preparing write nothing; the exports run once, in
processAlgorithm (the worker thread in the toolbox), and a cancel stops them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeatureSourceDefinition,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputFile,
    QgsProcessingOutputFolder,
    QgsProcessingOutputHtml,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingParameterVectorLayer,
    QgsProcessingUtils,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QIcon

from .. import choices, layers, layout, paths, steps
from ..engine import Engine, EngineUnavailable, Outcome
from ..errors import InputError
from ..layout import RunLayout
from ..runner import CANCELLED, OK, Prepared, Runner
from ..validation import check_ms_raster, check_rgb_raster, require_folder

_LABEL_TYPES = [QgsProcessing.SourceType.TypeVectorPolygon, QgsProcessing.SourceType.TypeVectorPoint]


@dataclass
class Plan:
    """What one algorithm run does (exports, engine commands) and how its outcomes become outputs."""

    prepared: Prepared
    finish: Callable[[list[Outcome]], dict]


class _StyleLoader(QgsProcessingLayerPostProcessorInterface):
    """Applies the QML the engine wrote beside the output once QGIS has loaded the layer."""

    _alive: list["_StyleLoader"] = []  # QGIS does not own Python post-processors: keep them

    def __init__(self, qml: str):
        super().__init__()
        self.qml = qml
        _StyleLoader._alive.append(self)

    def postProcessLayer(self, layer, context, feedback) -> None:
        if isinstance(layer, QgsVectorLayer):
            layer.loadNamedStyle(self.qml)
            layer.triggerRepaint()


class _FeedbackSink:
    """The runner's sink for an algorithm: the Processing feedback's bar, log and cancel."""

    def __init__(self, feedback: QgsProcessingFeedback):
        self.feedback = feedback

    def progress(self, percent: float, label: str) -> None:
        self.feedback.setProgress(percent)
        self.feedback.setProgressText(label)

    def log(self, message: str, level: str) -> None:
        if level == "debug":
            self.feedback.pushDebugInfo(message)
        elif level == "warning":
            self.feedback.pushWarning(message)
        elif level == "error":
            self.feedback.reportError(message)
        else:
            self.feedback.pushInfo(message)

    def cancelled(self) -> bool:
        return self.feedback.isCanceled()


class EngineAlgorithm(QgsProcessingAlgorithm):
    """Common parts: icon, groups, running engine commands with feedback, input errors."""

    _id = ""
    _name = ""
    _group = "Training"
    _help = ""
    _models = False  # whether the algorithm offers backbones (its help lists them)
    last_outcomes: tuple[Outcome, ...] = ()  # of the latest run

    def createInstance(self):
        return type(self)()

    def name(self) -> str:
        return self._id

    def displayName(self) -> str:
        return self._name

    def group(self) -> str:
        return self._group

    def groupId(self) -> str:
        return self._group.lower()

    def icon(self) -> QIcon:
        return QIcon(paths.icon_path())

    # -- running ---------------------------------------------------------------------------
    def run_prepared(self, prepared: Prepared, feedback: QgsProcessingFeedback) -> list[Outcome]:
        """The exports, then the engine commands; an unusable engine stops it before any export."""
        engine = Engine.from_settings()
        try:
            engine.check()
        except EngineUnavailable as exc:  # missing, broken, or another event protocol
            raise QgsProcessingException(str(exc)) from exc
        record = Runner(engine, _FeedbackSink(feedback), feedback).run(prepared)
        self.last_outcomes = tuple(record.outcomes)
        if record.state == CANCELLED:
            during = f" during {record.stopped_in}" if record.stopped_in else ""
            raise QgsProcessingException(f"Cancelled{during}: nothing was written.")
        if record.state != OK:
            raise QgsProcessingException(record.message())
        return record.outcomes

    def checkParameterValues(self, parameters, context):
        """Bad input is refused before the run: a message box in the toolbox, an exception
        from processing.run, an error from qgis_process. Planning writes no file."""
        ok, message = super().checkParameterValues(parameters, context)
        if not ok:
            return ok, message
        try:
            self.plan(parameters, context, QgsProcessingFeedback())
        except InputError as exc:
            return False, str(exc)
        return True, ""

    def prepareAlgorithm(self, parameters, context, feedback) -> bool:
        """Main thread: read and check the layers and plan the exports and commands (no file
        is written: the exports run in processAlgorithm)."""
        try:
            self._plan = self.plan(parameters, context, feedback)
        except InputError as exc:
            raise QgsProcessingException(str(exc)) from exc
        return True

    def processAlgorithm(self, parameters, context, feedback):
        """Worker thread (toolbox) or main thread (qgis_process): run the engine."""
        plan, self._plan = self._plan, None
        outcomes = self.run_prepared(plan.prepared, feedback)
        self.last_outcomes = tuple(outcomes)
        return plan.finish(outcomes)

    def plan(self, parameters, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> "Plan":
        raise NotImplementedError

    # -- shared parameters -----------------------------------------------------------------
    def add_map_data(self, prefix: str, what: str, optional: bool = True) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(f"{prefix}_RASTER", f"{what} raster layer",
                                                            optional=optional))
        self.addParameter(QgsProcessingParameterVectorLayer(f"{prefix}_LABELS", f"{what} labels (polygons or points)",
                                                            _LABEL_TYPES, optional=optional))
        self.addParameter(QgsProcessingParameterField(f"{prefix}_FIELD", f"{what} class field",
                                                      parentLayerParameterName=f"{prefix}_LABELS",
                                                      optional=optional))
        self.addParameter(QgsProcessingParameterFile(f"{prefix}_FOLDER",
                                                     f"... or a {what} folder dataset (root/<Class>/*.tif)",
                                                     behavior=QgsProcessingParameterFile.Behavior.Folder,
                                                     optional=True))

    def add_settings_parameter(self) -> None:
        self.addParameter(QgsProcessingParameterString(
            "SETTINGS", "More engine settings (KEY=VALUE separated by spaces, e.g. teacher.folds=0)", "",
            optional=True))

    def engine_settings(self, parameters, context) -> list[str]:
        try:
            return steps.parse_settings(self.parameterAsString(parameters, "SETTINGS", context) or "")
        except ValueError as exc:
            raise InputError(f"More engine settings: {exc}") from exc

    def optional_double(self, parameters, context, key: str) -> float | None:
        if parameters.get(key) in (None, ""):
            return None
        return self.parameterAsDouble(parameters, key, context)

    def optional_int(self, parameters, context, key: str) -> int | None:
        if parameters.get(key) in (None, ""):
            return None
        return self.parameterAsInt(parameters, key, context)

    def add_chip_parameters(self) -> None:
        self.addParameter(QgsProcessingParameterNumber("CHIP_SIZE", "Chip size (pixels)",
                                                       QgsProcessingParameterNumber.Type.Integer, 64, minValue=8,
                                                       maxValue=1024))
        self.addParameter(QgsProcessingParameterNumber("RESOLUTION", "Ground resolution of chips (m, 0 = native)",
                                                       QgsProcessingParameterNumber.Type.Double, 0.0, minValue=0.0))

    def dataset(self, parameters, context, prefix: str, what: str, out: Path, run: RunLayout,
                check_raster, pair_parameter: str | None = None, pair_out: Path | None = None
                ) -> tuple[Path | None, Prepared]:
        """A folder dataset as is, or chips of a raster + labels (exports and the command to cut them)."""
        folder = self.parameterAsFile(parameters, f"{prefix}_FOLDER", context)
        raster = self.parameterAsRasterLayer(parameters, f"{prefix}_RASTER", context)
        if folder and raster is None:
            return require_folder(folder, f"{what} folder"), Prepared(what)
        if raster is None:
            return None, Prepared(what)
        labels = self.parameterAsVectorLayer(parameters, f"{prefix}_LABELS", context)
        field = (self.parameterAsFields(parameters, f"{prefix}_FIELD", context) or [""])[0]
        pair = self.parameterAsRasterLayer(parameters, pair_parameter, context) if pair_parameter else None
        chips = steps.ChipOptions(self.parameterAsInt(parameters, "CHIP_SIZE", context),
                                  self.parameterAsDouble(parameters, "RESOLUTION", context) or None)
        return out, steps.map_chips(steps.MapSource(raster, labels, field), what, out, run, chips, check_raster,
                                    pair, pair_out)

    def add_model_parameters(self, section: str, what: str) -> None:
        """Backbone (its source shown, from `asymkd choices`), input size, ImageNet start, weights file."""
        found = choices.cached()
        named = ", ".join(f"{name} ({choices.SOURCE_TEXT.get(spec.get('source', ''), 'source unknown')})"
                          for name, spec in found.backbones.items())
        marker = " [built-in list: the engine was not asked]" if found.fallback else ""
        default = found.default(section, "backbone")
        self.addParameter(QgsProcessingParameterString(
            "BACKBONE", f"{what} backbone: {named}, or any timm model name (timm hub){marker}; "
            f"empty = {default or 'the engine default'}", "", optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            "INPUT_SIZE", "Input size in pixels (0 = as the patches are; empty = the engine default)",
            QgsProcessingParameterNumber.Type.Integer, None, optional=True, minValue=0, maxValue=1024))
        self.addParameter(QgsProcessingParameterBoolean("PRETRAINED", "Start from ImageNet weights (bundled or hub)",
                                                        True))
        self.addParameter(QgsProcessingParameterFile("WEIGHTS",
                                                     "Backbone weights file to start from (.safetensors, .pth)",
                                                     optional=True))

    def model_options(self, parameters, context, section: str, feedback: QgsProcessingFeedback) -> steps.ModelOptions:
        model = steps.ModelOptions(backbone=self.parameterAsString(parameters, "BACKBONE", context).strip(),
                                   input_size=self.optional_int(parameters, context, "INPUT_SIZE"),
                                   pretrained=self.parameterAsBoolean(parameters, "PRETRAINED", context),
                                   weights=self.parameterAsFile(parameters, "WEIGHTS", context) or "")
        found = choices.cached()
        name = model.backbone or found.default(section, "backbone", "")
        if name:
            described = found.describe(name, model.pretrained, bool(model.weights))
            feedback.pushInfo(f"{section} backbone {name}: {described}")
        return model

    def shortHelpString(self) -> str:
        if not self._models:
            return self._help
        # asked once per session, when the help is first shown (not while QGIS starts)
        found = choices.engine_choices(Engine.from_settings())
        rows = "".join(f"<li><b>{name}</b>: {choices.SOURCE_TEXT.get(spec.get('source', ''), 'source unknown')}"
                       f"{' - ' + spec['about'] if spec.get('about') else ''}</li>"
                       for name, spec in found.backbones.items())
        note = found.note or "any timm model name works too"
        return f"{self._help}<p>Backbones:</p><ul>{rows}</ul><p>{note}</p>"


def _device(algorithm: QgsProcessingAlgorithm, parameters, context) -> str:
    return steps.DEVICES[algorithm.parameterAsEnum(parameters, "DEVICE", context)]


def _run_folder(algorithm: QgsProcessingAlgorithm, parameters, context, step: str) -> RunLayout:
    path = algorithm.parameterAsString(parameters, "RUN", context)
    if not path:
        raise InputError("No run folder given.")
    run = RunLayout(Path(path))
    steps.require_previous(run, step)
    return run


def _outputs(run: RunLayout, step: str, **more) -> dict:
    return {**{key: str(path) for key, path in steps.SPECS[step].outputs(run).items()}, **more}


class TrainTeacher(EngineAlgorithm):
    _id, _name = "teacher", "Train teacher"
    _models = True
    _help = ("Trains the multispectral (MS) teacher on labeled MS samples: an MS raster with labeled "
             "polygons or points (cut into chips), or a folder dataset. An RGB raster co-registered "
             "with the MS raster gives same-target pairs for the matcher.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterFolderDestination("RUN", "Run folder"))
        self.add_map_data("MS", "MS")
        self.addParameter(QgsProcessingParameterRasterLayer(
            "PAIRED_RGB", "RGB raster co-registered with the MS raster (same-target pairs)", optional=True))
        self.add_chip_parameters()
        self.addParameter(QgsProcessingParameterString("BANDS", "MS band names (preset or comma list)", "sentinel2",
                                                       optional=True))
        self.add_model_parameters("teacher", "Teacher")
        self.addParameter(QgsProcessingParameterNumber("EPOCHS", "Epochs (0 = default)",
                                                       QgsProcessingParameterNumber.Type.Integer, 0, minValue=0))
        self.addParameter(QgsProcessingParameterEnum("DEVICE", "Device", list(steps.DEVICES), defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber("SEED", "Seed", QgsProcessingParameterNumber.Type.Integer, 0,
                                                       minValue=0))
        self.add_settings_parameter()
        self.addOutput(QgsProcessingOutputFolder("TEACHER", "Teacher model folder"))
        self.addOutput(QgsProcessingOutputString("METRICS", "Metrics (JSON)"))

    def plan(self, parameters, context, feedback) -> Plan:
        run = _run_folder(self, parameters, context, "teacher")
        ms, prepared = self.dataset(parameters, context, "MS", "MS", run.ms, run, check_ms_raster,
                                    "PAIRED_RGB", run.rgb_paired)
        if ms is None:
            raise InputError("No MS layer chosen: give an MS raster layer with its labels, or an MS folder dataset.")
        options = steps.TeacherOptions(bands=self.parameterAsString(parameters, "BANDS", context).strip(),
                                       model=self.model_options(parameters, context, "teacher", feedback),
                                       epochs=self.parameterAsInt(parameters, "EPOCHS", context),
                                       device=_device(self, parameters, context),
                                       seed=self.parameterAsInt(parameters, "SEED", context),
                                       settings=self.engine_settings(parameters, context))
        prepared.commands.append(steps.teacher_command(run.root, ms, options))
        return Plan(prepared, lambda outcomes: _outputs(run, "teacher", RUN=str(run.root),
                                                        METRICS=json.dumps(outcomes[-1].metrics)))


class TrainMatcher(EngineAlgorithm):
    _id, _name = "matcher", "Train matcher and pair"
    _help = ("Trains the MS/RGB matcher on same-target pairs (co-located chips from the teacher run, "
             "a paired folder, or pseudo-RGB from the MS bands) and pairs every RGB sample with an MS "
             "sample of its class.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterFile("RUN", "Run folder (with a teacher)",
                                                     behavior=QgsProcessingParameterFile.Behavior.Folder))
        self.add_map_data("RGB", "RGB")
        self.addParameter(QgsProcessingParameterFile("PAIRED_FOLDER",
                                                     "RGB folder paired with the MS samples by file name (optional)",
                                                     behavior=QgsProcessingParameterFile.Behavior.Folder,
                                                     optional=True))
        self.add_chip_parameters()
        self.addParameter(QgsProcessingParameterNumber("EPOCHS", "Matcher epochs (0 = default)",
                                                       QgsProcessingParameterNumber.Type.Integer, 0, minValue=0))
        self.addParameter(QgsProcessingParameterEnum("METHOD", "Pairing", list(steps.PAIR_METHODS), defaultValue=0))
        self.addParameter(QgsProcessingParameterEnum("DEVICE", "Device", list(steps.DEVICES), defaultValue=0))
        self.add_settings_parameter()
        self.addOutput(QgsProcessingOutputFolder("RUN_FOLDER", "Run folder (for the next step)"))
        self.addOutput(QgsProcessingOutputFolder("MATCHER", "Matcher folder"))
        self.addOutput(QgsProcessingOutputFile("PAIRS", "Pairs"))

    def plan(self, parameters, context, feedback) -> Plan:
        run = _run_folder(self, parameters, context, "matcher")
        rgb, prepared = self.dataset(parameters, context, "RGB", "RGB", run.rgb, run, check_rgb_raster)
        if rgb is None:
            raise InputError("No RGB layer chosen: give an RGB raster layer with its labels, or an RGB folder dataset.")
        paired_folder = self.parameterAsFile(parameters, "PAIRED_FOLDER", context)
        paired = Path(paired_folder) if paired_folder else (run.rgb_paired if run.rgb_paired.is_dir() else None)
        options = steps.MatcherOptions(epochs=self.parameterAsInt(parameters, "EPOCHS", context),
                                      method=steps.PAIR_METHODS[self.parameterAsEnum(parameters, "METHOD", context)],
                                      device=_device(self, parameters, context),
                                      settings=self.engine_settings(parameters, context))
        prepared.commands += steps.matcher_commands(run.root, rgb, options, paired)
        return Plan(prepared, lambda outcomes: _outputs(run, "matcher", RUN_FOLDER=str(run.root),
                                                        PAIRS=outcomes[-1].results.get("pairs", str(run.pairs_file))))


class DistillStudent(EngineAlgorithm):
    _id, _name = "distill", "Distill student"
    _models = True
    _help = ("Distills the teacher into the RGB student over the matcher's pairs (cross-modal attention, "
             "domain-shift loss, teacher pseudo-labels, re-pairing), evaluates it on the RGB test set and "
             "writes an HTML report with the baseline for comparison.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterFile("RUN", "Run folder (with teacher, matcher and pairs)",
                                                     behavior=QgsProcessingParameterFile.Behavior.Folder))
        self.add_map_data("TEST", "RGB test")
        self.add_chip_parameters()
        self.add_model_parameters("distill", "Student")
        self.addParameter(QgsProcessingParameterNumber("EPOCHS", "Epochs (0 = default)",
                                                       QgsProcessingParameterNumber.Type.Integer, 0, minValue=0))
        self.addParameter(QgsProcessingParameterNumber("REPAIR_EVERY", "Re-pair every K steps (0 = default)",
                                                       QgsProcessingParameterNumber.Type.Integer, 0, minValue=0))
        for key, label in (("W_FEAT", "Weight: feature alignment"), ("W_PSEUDO", "Weight: teacher pseudo-labels"),
                           ("W_GT", "Weight: ground truth")):
            self.addParameter(QgsProcessingParameterNumber(key, f"{label} (empty = engine default)",
                                                           QgsProcessingParameterNumber.Type.Double,
                                                           None, optional=True, minValue=0.0))
        self.addParameter(QgsProcessingParameterBoolean("BASELINE", "Also train the baseline (no distillation)", True))
        self.addParameter(QgsProcessingParameterEnum("DEVICE", "Device", list(steps.DEVICES), defaultValue=0))
        self.add_settings_parameter()
        self.addOutput(QgsProcessingOutputFolder("RUN_FOLDER", "Run folder"))
        self.addOutput(QgsProcessingOutputFolder("STUDENT", "Student model folder"))
        self.addOutput(QgsProcessingOutputHtml("REPORT", "Report"))
        self.addOutput(QgsProcessingOutputString("METRICS", "Metrics (JSON)"))

    def plan(self, parameters, context, feedback) -> Plan:
        run = _run_folder(self, parameters, context, "distill")
        test, prepared = self.dataset(parameters, context, "TEST", "RGB test", run.rgb_test, run, check_rgb_raster)
        options = steps.DistillOptions(model=self.model_options(parameters, context, "distill", feedback),
                                      epochs=self.parameterAsInt(parameters, "EPOCHS", context),
                                      repair_every=self.parameterAsInt(parameters, "REPAIR_EVERY", context),
                                      w_feat=self.optional_double(parameters, context, "W_FEAT"),
                                      w_pseudo=self.optional_double(parameters, context, "W_PSEUDO"),
                                      w_gt=self.optional_double(parameters, context, "W_GT"),
                                      baseline=self.parameterAsBoolean(parameters, "BASELINE", context),
                                      device=_device(self, parameters, context),
                                      settings=self.engine_settings(parameters, context))
        prepared.commands.append(steps.distill_command(run.root, options, test))
        return Plan(prepared, lambda outcomes: _outputs(run, "distill", RUN_FOLDER=str(run.root),
                                                        REPORT=outcomes[-1].results.get("report", str(run.report)),
                                                        METRICS=json.dumps(outcomes[-1].metrics)))


class ExportModel(EngineAlgorithm):
    _id, _name, _group = "export", "Export model", "Mapping"
    _help = ("Exports a trained student (a model folder, e.g. RUN/student) to ONNX with its classes, bands and "
             "normalisation inside.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterFile("MODEL", "Model folder (e.g. RUN/student)",
                                                     behavior=QgsProcessingParameterFile.Behavior.Folder))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", "ONNX model", "ONNX model (*.onnx)"))

    def plan(self, parameters, context, feedback) -> Plan:
        model = Path(self.parameterAsFile(parameters, "MODEL", context))
        if not (model / layout.META).is_file():
            raise InputError(f"{model} is not a model folder (no {layout.META}): choose the student folder of a run.")
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        return Plan(Prepared(self._name, [steps.export_command(model, Path(out))]), lambda outcomes: {"OUTPUT": out})


class ClassifyTiles(EngineAlgorithm):
    _id, _name, _group = "classify", "Classify scene tiles", "Mapping"
    _help = ("Classifies the tiles of a raster with an exported model: one polygon per tile with class, "
             "confidence, runner-up class and entropy, styled by class. The grid is tiles of the "
             "model's size (or a given tile and stride in pixels) or the XYZ web-map grid at a zoom "
             "level. A raster layer that is not a local file is exported for the area first; a run's "
             "student.onnx is exported again first when its student is newer. Empty options take the "
             "engine's defaults.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterFile("MODEL", "Model (.onnx)", extension="onnx"))
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Raster layer"))
        self.addParameter(QgsProcessingParameterString("BANDS", "Bands (e.g. 1,2,3; empty = all)", "", optional=True))
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "Area: extent", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource("MASK", "Area: polygons",
                                                              [QgsProcessing.SourceType.TypeVectorPolygon],
                                                              optional=True))
        self._add_grid_parameters()
        self.addParameter(QgsProcessingParameterEnum("DEVICE", "Device", list(steps.DEVICES), defaultValue=0))
        self._add_output_parameters()
        self.addParameter(QgsProcessingParameterVectorDestination("OUTPUT", "Classified tiles",
                                                                  QgsProcessing.SourceType.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("TILES", "Number of tiles"))

    def _add_grid_parameters(self) -> None:
        integer = QgsProcessingParameterNumber.Type.Integer
        self.addParameter(QgsProcessingParameterEnum("GRID", "Grid",
                                                     ["Pixels (tile and stride)", "XYZ tiles (zoom level)"],
                                                     defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber("TILE", "Tile size in pixels (0 = the model's)",
                                                       integer, 0, minValue=0))
        self.addParameter(QgsProcessingParameterNumber("STRIDE", "Stride in pixels (0 = tile size)",
                                                       integer, 0, minValue=0))
        self.addParameter(QgsProcessingParameterNumber("ZOOM", "XYZ zoom level", integer, 16, minValue=0,
                                                       maxValue=24))
        self.addParameter(QgsProcessingParameterNumber("BATCH_SIZE", "Batch size (empty = the engine default)",
                                                       integer, None, optional=True, minValue=1))

    def _add_output_parameters(self) -> None:
        """Optional: models saved before these parameters existed must still validate and run."""
        double = QgsProcessingParameterNumber.Type.Double
        self.addParameter(QgsProcessingParameterNumber("UNCERTAIN_BELOW",
                                                       "Mark tiles uncertain below this certainty (0 = none)",
                                                       double, 0.0, optional=True, minValue=0.0, maxValue=1.0))
        self.addParameter(QgsProcessingParameterEnum("UNCERTAIN_BY", "Certainty measure",
                                                     list(steps.UNCERTAINTY_MEASURES), defaultValue=0,
                                                     optional=True))
        self.addParameter(QgsProcessingParameterBoolean("REGIONS", "Also merge tiles into regions (layer 'regions')",
                                                        False, optional=True))
        self.addParameter(QgsProcessingParameterNumber("MIN_REGION_HA", "Smallest region in hectares (0 = default)",
                                                       double, 0.0, optional=True, minValue=0.0))

    def plan(self, parameters, context, feedback) -> Plan:
        prepared = Prepared(self._name)
        model = Path(self.parameterAsFile(parameters, "MODEL", context))
        model = steps.classify_model(model, prepared, f"The model file {model} does not exist: export a student "
                                     "first (Export model).")
        raster = check_rgb_raster(self.parameterAsRasterLayer(parameters, "INPUT", context), "raster layer to classify")
        gsd = steps.model_gsd(model, strict=True)
        temp = Path(QgsProcessingUtils.tempFolder())
        area = steps.classify_area(raster, temp, prepared, **self._area(parameters, context))
        raster_file = steps.raster_file(raster, temp, area.extent, area.crs, gsd, prepared)
        out = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        prepared.commands.append(steps.classify_command(model, raster_file, Path(out), area,
                                                        self._chosen(parameters, context)))
        return Plan(prepared, lambda outcomes: self._outputs(out, context))

    def _chosen(self, parameters, context) -> dict[str, Any]:
        """The options set, by the engine's names; unset ones are None (the engine's default)."""
        xyz = self.parameterAsEnum(parameters, "GRID", context) == 1
        return {"bands": self.parameterAsString(parameters, "BANDS", context).strip(),
                "xyz_zoom": self.parameterAsInt(parameters, "ZOOM", context) if xyz else None,
                "tile": self.parameterAsInt(parameters, "TILE", context) or None,
                "stride": self.parameterAsInt(parameters, "STRIDE", context) or None,
                "batch_size": self.optional_int(parameters, context, "BATCH_SIZE"),
                "device": _device(self, parameters, context),
                "uncertain_below": self.parameterAsDouble(parameters, "UNCERTAIN_BELOW", context) or None,
                "uncertain_by": steps.UNCERTAINTY_MEASURES[self.parameterAsEnum(parameters, "UNCERTAIN_BY", context)],
                "regions": self.parameterAsBool(parameters, "REGIONS", context),
                "min_region_ha": self.parameterAsDouble(parameters, "MIN_REGION_HA", context) or None,
                # QGIS's file dialog has confirmed replacing the destination (or it is a new temporary file)
                "overwrite": True}

    def _area(self, parameters, context) -> dict[str, Any]:
        """steps.classify_area's box or polygons from EXTENT or MASK (neither: the whole raster)."""
        if parameters.get("EXTENT"):
            crs = self.parameterAsExtentCrs(parameters, "EXTENT", context)
            return {"box": (self.parameterAsExtent(parameters, "EXTENT", context, crs), crs)}
        if not parameters.get("MASK"):
            return {}
        mask = self.parameterAsVectorLayer(parameters, "MASK", context)
        if mask is None:
            raise InputError("The polygon layer for the area cannot be read: choose a polygon layer.")
        value = parameters.get("MASK")
        selected = isinstance(value, QgsProcessingFeatureSourceDefinition) and value.selectedFeaturesOnly
        return {"mask": mask, "selected": selected}

    @staticmethod
    def _outputs(out: str, context: QgsProcessingContext) -> dict:
        result_layer = QgsVectorLayer(out, Path(out).stem, "ogr")
        if not result_layer.isValid():
            raise QgsProcessingException(f"The engine did not write a readable layer at {out}.")
        qml = layers.style_beside(out)
        if qml is not None and context.willLoadLayerOnCompletion(out):
            context.layerToLoadOnCompletionDetails(out).setPostProcessor(_StyleLoader(str(qml)))
        return {"OUTPUT": out, "TILES": result_layer.featureCount()}


ALGORITHMS = (TrainTeacher, TrainMatcher, DistillStudent, ExportModel, ClassifyTiles)
