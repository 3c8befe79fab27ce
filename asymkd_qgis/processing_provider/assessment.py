"""Processing algorithms of the accuracy assessment: Sample tiles for accuracy assessment
(`asymkd sample`) and Assess accuracy and class areas (`asymkd assess`).

They run the engine like the other algorithms (EngineAlgorithm: one runner, progress, cancel,
the engine's own message and hint when it refuses the input). Layers are handed to the
engine as GeoPackage files: a layer that is not a whole GeoPackage (a shapefile, a memory
layer, a filtered layer) is exported to one when the algorithm runs. The engine writes its
outputs under temporary names and moves them into place when complete.

Labels given on a sample drawn here count towards the estimates. The review queue of
uncertain tiles is a biased sample: its corrections go back to training, never into accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qgis.core import (
    QgsCsException,
    QgsFeatureRequest,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputFile,
    QgsProcessingOutputNumber,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterField,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterVectorDestination,
    QgsProcessingParameterVectorLayer,
    QgsProcessingUtils,
    QgsVectorLayer,
)

from .. import layers, steps
from ..engine import Outcome
from ..errors import InputError
from ..runner import EngineCommand, Prepared
from .algorithms import EngineAlgorithm, Plan

# The engine's names (backend/asymkd/assess): sampling designs, layers, fields, output files.
SAMPLE_DESIGNS = ("stratified", "random")
CLASS_FIELD = "class_name"
SAMPLE_LAYER = "sample"
REFERENCE_FIELD = "reference"
ASSESSMENT_TABLE = "assessment"
OUTPUT_FILES = {"csv": "accuracy.csv", "json": "assessment.json", "gpkg": "assessment.gpkg"}

SAMPLE_LAYER_NAME = "accuracy sample (label the reference field)"
TABLE_LAYER_NAME = "accuracy assessment"

_RULE = ("<p>Labels given on a sample drawn by <i>Sample tiles for accuracy assessment</i> count towards the "
         "estimates. The review queue of uncertain tiles is a biased sample: its corrections go back to training "
         "and are never counted as accuracy.</p>")


# -- engine command lines ----------------------------------------------------------------------
@dataclass
class SampleOptions:
    n: int
    design: str = "stratified"
    min_per_class: int = 30
    seed: int = 0
    layer: str | None = None  # the tile layer of the GeoPackage; None: the engine's (tiles)
    overwrite: bool = False


def sample_command(tiles: str, out: Path, options: SampleOptions) -> EngineCommand:
    args = ["sample", str(tiles), "--n", str(int(options.n)), "--design", options.design,
            "--min-per-class", str(int(options.min_per_class)), "--seed", str(int(options.seed))]
    if options.layer:
        args += ["--layer", options.layer]
    args += ["--out", str(out)]
    if options.overwrite:
        args.append("--overwrite")
    return EngineCommand(args, "drawing the sample", weight=1.0)


def assess_command(tiles: layers.VectorSource, reference: layers.VectorSource, field: str,
                   out_dir: Path) -> EngineCommand:
    args = ["assess", tiles.path, "--reference", reference.path, "--field", field]
    if tiles.layer_name:
        args += ["--layer", tiles.layer_name]
    if reference.layer_name:
        args += ["--reference-layer", reference.layer_name]
    args += ["--out", str(out_dir)]
    return EngineCommand(args, "estimating accuracy and areas", weight=1.0)


# -- layers as the engine's files ---------------------------------------------------------------
def check_saved(layer: QgsVectorLayer, what: str) -> None:
    """The engine reads the file: edits still in QGIS's edit buffer would be missed."""
    if layer.isEditable() and layer.isModified():
        raise InputError(f"The {what} '{layer.name()}' has unsaved edits: save them (Layer > Save Layer Edits) "
                         "and run again.")


def gpkg_file(layer: QgsVectorLayer, prepared: Prepared, role: str) -> layers.VectorSource:
    """The GeoPackage and layer name the engine reads for `layer`: the layer's own file, or an
    export to a temporary GeoPackage (written when the algorithm runs) in a folder of its role,
    so that two layers of the same name do not meet."""
    folder = Path(QgsProcessingUtils.tempFolder()) / role
    source = steps.vector_file(layer, folder, prepared, gpkg_only=True)
    if source.layer_name is None:  # a GeoPackage opened without a layer name: QGIS shows its first layer
        names = layers.gpkg_layers(source.path)
        source.layer_name = names[0] if names else None
    return source


def check_tiles(layer: QgsVectorLayer | None) -> QgsVectorLayer:
    if layer is None or not layer.isValid():
        raise InputError("No classified tiles chosen: give the tile layer (or GeoPackage) written by "
                         "Classify scene tiles.")
    if layer.fields().indexOf(CLASS_FIELD) < 0:
        raise InputError(f"The layer '{layer.name()}' has no field '{CLASS_FIELD}': it is not a tile layer of "
                         "Classify scene tiles. Choose the classified tiles.")
    check_saved(layer, "tile layer")
    return layer


def check_reference(reference: QgsVectorLayer | None, field: str, tiles: QgsVectorLayer,
                    context: QgsProcessingContext) -> QgsVectorLayer:
    """A reference layer with the field, features, and features over the tiles."""
    if reference is None or not reference.isValid():
        raise InputError("No reference layer chosen: give the labeled sample (or a point or polygon layer with "
                         "the reference classes).")
    name = reference.name()
    if reference.fields().indexOf(field) < 0:
        names = ", ".join(reference.fields().names()) or "(none)"
        raise InputError(f"The reference layer '{name}' has no field '{field}'; its fields are: {names}. "
                         "Choose the field with the reference classes.")
    if reference.featureCount() == 0:
        raise InputError(f"The reference layer '{name}' is empty: give a layer with labeled points or polygons, "
                         "e.g. a sample from Sample tiles for accuracy assessment.")
    check_saved(reference, "reference layer")
    if not _overlaps(reference, tiles, context):
        raise InputError(
            f"No feature of the reference layer '{name}' ({reference.crs().authid() or 'no CRS'}) lies over the "
            f"tiles '{tiles.name()}' ({tiles.crs().authid() or 'no CRS'}): choose the reference of this map, "
            "and check that the layer's CRS is the one its coordinates are in.")
    return reference


def _overlaps(reference: QgsVectorLayer, tiles: QgsVectorLayer, context: QgsProcessingContext) -> bool:
    """Whether a feature of `reference` lies within the tiles' extent (in the tiles' CRS)."""
    extent = tiles.extent()
    if extent.isNull():
        return True  # nothing to compare with: the engine says what it finds
    request = QgsFeatureRequest().setNoAttributes().setFilterRect(extent)
    if reference.crs().isValid() and tiles.crs().isValid() and reference.crs() != tiles.crs():
        request.setDestinationCrs(tiles.crs(), context.transformContext())
        request.setTransformErrorCallback(lambda feature: None)  # a point outside the CRS's domain: skipped
    try:
        return any(feature.hasGeometry() for feature in reference.getFeatures(request))
    except QgsCsException:
        return False


def _number(value) -> float | None:
    return None if value is None else float(value)


# -- the algorithms -----------------------------------------------------------------------------
class SampleTiles(EngineAlgorithm):
    _id, _name, _group = "sample_tiles", "Sample tiles for accuracy assessment", "Assessment"
    _help = ("Draws the tiles to label for an accuracy assessment of a classification (Olofsson et al. 2014): "
             "stratified by map class (at least the given number of tiles of each class, all of a smaller "
             "class's, the rest in proportion to the class's mapped area) or simple random. The same seed draws "
             "the same tiles. The sample is a GeoPackage with the layer <i>sample</i>: label each tile by "
             "filling its empty field <i>reference</i> with the class seen on the ground or in imagery, save the "
             "edits, then run <i>Assess accuracy and class areas</i>." + _RULE)

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterVectorLayer("TILES", "Classified tiles (from Classify scene tiles)",
                                                            [QgsProcessing.SourceType.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterNumber("N", "Number of tiles to label",
                                                       QgsProcessingParameterNumber.Type.Integer, 400, minValue=1))
        self.addParameter(QgsProcessingParameterEnum(
            "DESIGN", "Design", ["Stratified by map class (minimum per class, the rest by area)", "Simple random"],
            defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber("MIN_PER_CLASS", "Stratified: tiles of each class at least",
                                                       QgsProcessingParameterNumber.Type.Integer, 30, minValue=0))
        self.addParameter(QgsProcessingParameterNumber("SEED", "Seed (the same seed draws the same tiles)",
                                                       QgsProcessingParameterNumber.Type.Integer, 0, minValue=0))
        self.addParameter(QgsProcessingParameterBoolean(
            "OVERWRITE", "Replace an existing sample file (its labels are lost)", False, optional=True))
        self.addParameter(QgsProcessingParameterVectorDestination("OUTPUT", "Sample",
                                                                  QgsProcessing.SourceType.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("SAMPLED", "Number of sampled tiles"))

    def plan(self, parameters, context, feedback) -> Plan:
        tiles = check_tiles(self.parameterAsVectorLayer(parameters, "TILES", context))
        out = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        if not out or out.startswith("memory:") or not out.lower().endswith(".gpkg"):
            raise InputError(f"The sample must be saved to a GeoPackage file (.gpkg), not '{out}': it is the layer "
                             "the labels are written into.")
        overwrite = self.parameterAsBoolean(parameters, "OVERWRITE", context)
        if Path(out).exists() and not overwrite:
            raise InputError(f"The sample {out} already exists and may hold labels: choose another file, or tick "
                             "'Replace an existing sample file'.")
        prepared = Prepared(self._name)
        source = gpkg_file(tiles, prepared, "tiles")
        options = SampleOptions(n=self.parameterAsInt(parameters, "N", context),
                                design=SAMPLE_DESIGNS[self.parameterAsEnum(parameters, "DESIGN", context)],
                                min_per_class=self.parameterAsInt(parameters, "MIN_PER_CLASS", context),
                                seed=self.parameterAsInt(parameters, "SEED", context),
                                layer=source.layer_name, overwrite=overwrite)
        prepared.commands.append(sample_command(source.path, Path(out), options))

        def finish(outcomes: list[Outcome]) -> dict:
            written = outcomes[-1].results.get("gpkg", out)
            sample = QgsVectorLayer(f"{written}|layername={SAMPLE_LAYER}", SAMPLE_LAYER_NAME, "ogr")
            if not sample.isValid():
                raise QgsProcessingException(f"The engine did not write a readable sample at {written}.")
            if context.willLoadLayerOnCompletion(out):
                details = context.layerToLoadOnCompletionDetails(out)
                details.name, details.forceName = SAMPLE_LAYER_NAME, True
            feedback.pushInfo(f"{sample.featureCount()} tiles to label in {written}: fill the field "
                              f"'{REFERENCE_FIELD}' with the class of each, save, then run Assess accuracy and "
                              "class areas.")
            return {"OUTPUT": out, "SAMPLED": sample.featureCount()}
        return Plan(prepared, finish)


class AssessAccuracy(EngineAlgorithm):
    _id, _name, _group = "assess_accuracy", "Assess accuracy and class areas", "Assessment"
    _help = ("Estimates the accuracy of a classification and the area of each class from reference labels, with "
             "standard errors and 95 % intervals (Olofsson et al. 2014): the error matrix in counts and area "
             "proportions, overall, user's and producer's accuracy, and each class's estimated area. The "
             "reference is a labeled sample from <i>Sample tiles for accuracy assessment</i>, or any point or "
             "polygon layer with a class field (each feature is joined to the tile under it; the estimates then "
             "assume the features are a probability sample of the map). Writes accuracy.csv, assessment.json and "
             "assessment.gpkg into the output folder, all or none." + _RULE)

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterVectorLayer("TILES", "Classified tiles (from Classify scene tiles)",
                                                            [QgsProcessing.SourceType.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterVectorLayer(
            "REFERENCE", "Reference (labeled sample, or points or polygons with the reference class)",
            [QgsProcessing.SourceType.TypeVectorPoint, QgsProcessing.SourceType.TypeVectorPolygon]))
        # optional: left out (qgis_process) or empty, it is the sample's field
        self.addParameter(QgsProcessingParameterField("FIELD", f"Reference class field (empty: {REFERENCE_FIELD})",
                                                      REFERENCE_FIELD, parentLayerParameterName="REFERENCE",
                                                      optional=True))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", "Assessment folder"))
        self.addOutput(QgsProcessingOutputFile("CSV", "Accuracy table (CSV)"))
        self.addOutput(QgsProcessingOutputFile("JSON", "Assessment (JSON)"))
        self.addOutput(QgsProcessingOutputVectorLayer("TABLE", "Assessment table",
                                                      QgsProcessing.SourceType.TypeVector))
        self.addOutput(QgsProcessingOutputNumber("OVERALL_ACCURACY", "Overall accuracy (0-1)"))
        self.addOutput(QgsProcessingOutputNumber("OVERALL_CI_LOW", "Overall accuracy: 95 % interval, low"))
        self.addOutput(QgsProcessingOutputNumber("OVERALL_CI_HIGH", "Overall accuracy: 95 % interval, high"))
        self.addOutput(QgsProcessingOutputNumber("LABELS", "Labels used"))

    def plan(self, parameters, context, feedback) -> Plan:
        tiles = check_tiles(self.parameterAsVectorLayer(parameters, "TILES", context))
        field = (self.parameterAsFields(parameters, "FIELD", context) or [""])[0] or REFERENCE_FIELD
        reference = check_reference(self.parameterAsVectorLayer(parameters, "REFERENCE", context), field, tiles,
                                    context)
        out_dir = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        if not out_dir:
            raise InputError("No assessment folder given.")
        if Path(out_dir).exists() and not Path(out_dir).is_dir():
            raise InputError(f"The assessment folder {out_dir} is a file: choose a folder.")
        prepared = Prepared(self._name)
        tiles_file, reference_file = gpkg_file(tiles, prepared, "tiles"), gpkg_file(reference, prepared, "reference")
        prepared.commands.append(assess_command(tiles_file, reference_file, field, Path(out_dir)))

        def finish(outcomes: list[Outcome]) -> dict:
            written = {key: outcomes[-1].results.get(key, str(Path(out_dir) / name))
                       for key, name in OUTPUT_FILES.items()}
            metrics = outcomes[-1].metrics.get("assess", {})
            overall = metrics.get("overall_accuracy") or {}
            table = f"{written['gpkg']}|layername={ASSESSMENT_TABLE}"
            if QgsVectorLayer(table, TABLE_LAYER_NAME, "ogr").isValid():
                details = QgsProcessingContext.LayerDetails(TABLE_LAYER_NAME, context.project(), "TABLE")
                details.forceName = True
                context.addLayerToLoadOnCompletion(table, details)
            else:
                feedback.reportError(f"The assessment table {table} cannot be opened.")
            results = {"OUTPUT": out_dir, "CSV": written["csv"], "JSON": written["json"], "TABLE": table,
                       "OVERALL_ACCURACY": _number(overall.get("value")),
                       "OVERALL_CI_LOW": _number(overall.get("ci_low")),
                       "OVERALL_CI_HIGH": _number(overall.get("ci_high")), "LABELS": metrics.get("labels")}
            feedback.pushInfo(_headline(results, metrics))
            return results
        return Plan(prepared, finish)


def _headline(results: dict, metrics: dict) -> str:
    value, low, high = results["OVERALL_ACCURACY"], results["OVERALL_CI_LOW"], results["OVERALL_CI_HIGH"]
    text = "overall accuracy " + ("undefined" if value is None else f"{100 * value:.1f} %")
    if low is not None and high is not None:
        text += f" (95 % interval {100 * low:.1f}-{100 * high:.1f} %)"
    text += f" from {metrics.get('labels', '?')} labels ({metrics.get('design', '?')} sample)"
    notes = metrics.get("notes") or []
    return text + "".join(f"\nnote: {note}" for note in notes) + f"\nwritten to {results['OUTPUT']}"


ALGORITHMS = (SampleTiles, AssessAccuracy)
