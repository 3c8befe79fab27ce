"""Accuracy assessment in Processing with the real engine: Sample tiles for accuracy
assessment, labels typed into the sample in QGIS, then Assess accuracy and class areas;
layers that are not GeoPackages are exported first, bad input is refused with a clear
message and leaves no file, and qgis_process runs both algorithms."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qgis.core import (
    NULL,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureRequest,
    QgsField,
    QgsGeometry,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

import mapdata
from asymkd_qgis.processing_provider import assessment
from conftest import REPO, require_commands

# A classified map written by the engine's own tile writer (tests/backend/test_assess.py: 24 x 30
# tiles of 4 classes in UTM 32N, about 1 tile in 6 wrong), with the truth of every tile.
_WRITE_WORLD = """
import json, sys
from pathlib import Path
from test_assess import CLASSES, _key_truth, _true_accuracy, _truth_and_map, write_tiles
truth, mapped = _truth_and_map()
tiles = write_tiles(Path(sys.argv[1]), mapped)
print(json.dumps({"truth": _key_truth(truth), "accuracy": _true_accuracy(tiles, truth, mapped),
                  "count": len(mapped), "classes": CLASSES}))
"""


@pytest.fixture(scope="module")
def world(real_engine, tmp_path_factory) -> dict:
    require_commands("sample", "assess")
    folder = tmp_path_factory.mktemp("assessment")
    tiles = folder / "classified tiles.gpkg"
    env = real_engine.env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO / "tests" / "backend")) if p)
    done = subprocess.run([str(real_engine.python), "-c", _WRITE_WORLD, str(tiles)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"tiles": tiles, **json.loads(done.stdout)}


@pytest.fixture
def proc(plugin, qgis_processing):
    return plugin


def _layer(path: Path, name: str) -> QgsVectorLayer:
    layer = QgsVectorLayer(str(path), name, "ogr")
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    return layer


def _label(sample: QgsVectorLayer, truth: dict[str, str]) -> None:
    """Fill the reference field as a user does: edit the layer in QGIS and save."""
    index = sample.fields().indexOf(assessment.REFERENCE_FIELD)
    assert sample.startEditing()
    for feature in sample.getFeatures():
        assert sample.changeAttributeValue(feature.id(), index, truth[feature["tile_key"]])
    assert sample.commitChanges(), sample.commitErrors()


def _loaded(name: str) -> list[QgsVectorLayer]:
    return [layer for layer in QgsProject.instance().mapLayers().values() if layer.name() == name]


def _sample(world, sample: Path, **more) -> dict:
    import processing
    parameters = {"TILES": str(world["tiles"]), "N": 120, "MIN_PER_CLASS": 20, "SEED": 1, "OUTPUT": str(sample)}
    return processing.runAndLoadResults("asymkd:sample_tiles", {**parameters, **more})


# -- the workflow -------------------------------------------------------------------------------
def test_sample_label_in_qgis_then_assess(proc, world, tmp_path):
    import processing
    tiles = _layer(world["tiles"], "classified")
    sample_path = tmp_path / "sample é.gpkg"
    result = _sample(world, sample_path, TILES=tiles)
    assert result["SAMPLED"] == 120 and Path(result["OUTPUT"]) == sample_path
    [sample] = _loaded(assessment.SAMPLE_LAYER_NAME)
    assert sample.featureCount() == 120 and sample.geometryType() == QgsWkbTypes.GeometryType.PolygonGeometry
    assert {feature[assessment.REFERENCE_FIELD] for feature in sample.getFeatures()} == {NULL}
    per_class = {name: sum(1 for f in sample.getFeatures() if f["map_class"] == name) for name in world["classes"]}
    assert sum(per_class.values()) == 120 and min(per_class.values()) >= 20, per_class

    _label(sample, world["truth"])
    report = tmp_path / "report"
    result = processing.runAndLoadResults("asymkd:assess_accuracy", {"TILES": tiles, "REFERENCE": sample,
                                                                     "FIELD": "reference", "OUTPUT": str(report)})
    true_accuracy = world["accuracy"]
    assert result["OVERALL_CI_LOW"] <= true_accuracy <= result["OVERALL_CI_HIGH"], (result, true_accuracy)
    assert result["OVERALL_CI_LOW"] < result["OVERALL_ACCURACY"] < result["OVERALL_CI_HIGH"]
    assert result["LABELS"] == 120
    assert Path(result["CSV"]) == report / "accuracy.csv" and Path(result["OUTPUT"]) == report
    with open(result["CSV"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["value"]) for r in rows if r["measure"] == "count") == 120
    overall = [r for r in rows if r["measure"] == "overall_accuracy"]
    assert len(overall) == 1 and float(overall[0]["value"]) == pytest.approx(result["OVERALL_ACCURACY"])
    assert json.loads(Path(result["JSON"]).read_text())["labels"] == 120
    [table] = _loaded(assessment.TABLE_LAYER_NAME)
    assert not table.isSpatial() and table.featureCount() == len(rows)
    assert sorted(os.listdir(report)) == ["accuracy.csv", "assessment.gpkg", "assessment.json"]


class _Log(QgsProcessingFeedback):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def pushInfo(self, info: str) -> None:
        self.lines.append(info)


def test_layers_that_are_not_geopackages_are_exported_first(proc, world, tmp_path):
    """Two temporary layers of the same name: a memory copy of the tiles, and field points in
    WGS 84 (a reference the engine joins to the tile under each point)."""
    import processing
    tiles_file = _layer(world["tiles"], "classified")
    tiles = tiles_file.materialize(QgsFeatureRequest())
    tiles.setName("Scratch layer")
    points = QgsVectorLayer("Point?crs=EPSG:4326", "Scratch layer", "memory")
    points.dataProvider().addAttributes([QgsField("class", QVariant.String)])
    points.updateFields()
    to_wgs84 = QgsCoordinateTransform(tiles_file.crs(), QgsCoordinateReferenceSystem("EPSG:4326"),
                                      QgsProject.instance())
    features = []
    for tile in list(tiles_file.getFeatures())[::40]:
        feature = QgsFeature(points.fields())
        feature.setGeometry(QgsGeometry.fromPointXY(to_wgs84.transform(tile.geometry().centroid().asPoint())))
        feature["class"] = world["truth"][tile["tile_key"]]
        features.append(feature)
    assert points.dataProvider().addFeatures(features)[0]
    QgsProject.instance().addMapLayers([tiles, points])
    assert tiles.providerType() == points.providerType() == "memory"

    log = _Log()
    result = processing.run("asymkd:sample_tiles", {"TILES": tiles, "N": 12, "MIN_PER_CLASS": 3, "DESIGN": 1,
                                                    "OUTPUT": str(tmp_path / "random.gpkg")}, feedback=log)
    assert result["SAMPLED"] == 12 and "exporting 'Scratch layer'..." in log.lines

    log = _Log()
    result = processing.run("asymkd:assess_accuracy", {"TILES": tiles, "REFERENCE": points, "FIELD": "class",
                                                       "OUTPUT": str(tmp_path / "points report")}, feedback=log)
    assert log.lines.count("exporting 'Scratch layer'...") == 2
    [command] = [line for line in log.lines if line.startswith("estimating accuracy and areas: asymkd assess")]
    args = command.split()
    tiles_gpkg, reference_gpkg = args[args.index("assess") + 1], args[args.index("--reference") + 1]
    assert tiles_gpkg.endswith(".gpkg") and reference_gpkg.endswith(".gpkg") and tiles_gpkg != reference_gpkg
    assert result["LABELS"] == len(features) == 18
    assert json.loads(Path(result["JSON"]).read_text())["design"] == "external"


# -- bad input: a clear message, nothing written ------------------------------------------------------
def _refused(algorithm: str, parameters: dict) -> str:
    import processing
    with pytest.raises(QgsProcessingException) as info:
        processing.run(f"asymkd:{algorithm}", parameters)
    return str(info.value)


def _nothing_written(folder: Path, *names: str) -> None:
    left = [p.name for p in folder.iterdir() if any(p.name.startswith(n) or p.name.startswith(f".{n}")
                                                    for n in names)] if folder.exists() else []
    assert not left, left


def _points(path: Path, crs: int, xy: list[tuple[float, float, str]], field: str = "reference") -> Path:
    from osgeo import ogr, osr
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(crs)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    layer = ds.CreateLayer("points", srs, ogr.wkbPoint)
    layer.CreateField(ogr.FieldDefn(field, ogr.OFTString))
    for x, y, label in xy:
        feature = ogr.Feature(layer.GetLayerDefn())
        feature.SetField(field, label)
        feature.SetGeometry(ogr.CreateGeometryFromWkt(f"POINT ({x} {y})"))
        layer.CreateFeature(feature)
    ds = None
    return path


def test_bad_assessment_input(proc, world, tmp_path):
    tiles = str(world["tiles"])
    out = tmp_path / "report"
    base = {"TILES": tiles, "FIELD": "reference", "OUTPUT": str(out)}
    # a point over the map, labeled, in the tiles' CRS
    over_map = _points(tmp_path / "good.gpkg", 32632, [(500_100.0, 5_199_900.0, "Forest")])
    text = _refused("assess_accuracy", {**base, "REFERENCE": str(over_map), "FIELD": "nope"})
    assert "The reference layer 'good' has no field 'nope'; its fields are: fid, reference" in text

    empty = _points(tmp_path / "empty.gpkg", 32632, [])
    assert "The reference layer 'empty' is empty" in _refused("assess_accuracy", {**base, "REFERENCE": str(empty)})

    # WGS 84 points in America: valid coordinates, nowhere near the map in UTM 32N
    far = _points(tmp_path / "far.gpkg", 4326, [(-100.0, 40.0, "Forest"), (-101.0, 41.0, "Water")])
    text = _refused("assess_accuracy", {**base, "REFERENCE": str(far)})
    assert "No feature of the reference layer 'far' (EPSG:4326) lies over the tiles" in text
    assert "(EPSG:32632)" in text and "CRS" in text

    not_tiles = str(mapdata.write_labels(tmp_path / "labels.gpkg", [(0, 0, "Forest")]))
    text = _refused("assess_accuracy", {**base, "TILES": not_tiles, "REFERENCE": str(over_map)})
    assert "has no field 'class_name': it is not a tile layer of Classify scene tiles" in text

    # the engine's refusal (exit 2), message and hint: a reference field with no label in it
    unlabeled = _points(tmp_path / "unlabeled.gpkg", 32632, [(500_100.0, 5_199_900.0, "")])
    text = _refused("assess_accuracy", {**base, "REFERENCE": str(unlabeled)})
    assert "has a label in its field 'reference'" in text and "fill the field 'reference'" in text
    assert not out.exists()
    _nothing_written(tmp_path, "report")


def test_bad_sample_input(proc, world, tmp_path):
    out = tmp_path / "sample.gpkg"
    base = {"TILES": str(world["tiles"]), "N": 50, "OUTPUT": str(out)}
    # the engine's refusal (exit 2) with its hint
    text = _refused("sample_tiles", {**base, "N": world["count"] + 1})
    assert f"more than the {world['count']} classified tiles" in text and f"give --n {world['count']}" in text
    not_tiles = str(mapdata.write_labels(tmp_path / "labels.gpkg", [(0, 0, "Forest")]))
    assert "has no field 'class_name'" in _refused("sample_tiles", {**base, "TILES": not_tiles})
    assert "GeoPackage file (.gpkg)" in _refused("sample_tiles", {**base, "OUTPUT": str(tmp_path / "sample.shp")})
    _nothing_written(tmp_path, "sample")
    # an existing sample (it may hold labels) is replaced only when asked
    out.write_bytes(b"labels")
    assert "already exists and may hold labels" in _refused("sample_tiles", base)
    assert out.read_bytes() == b"labels"
    import processing
    assert processing.run("asymkd:sample_tiles", {**base, "OVERWRITE": True})["SAMPLED"] == 50


def test_unsaved_labels_are_refused(proc, world, tmp_path):
    _sample(world, tmp_path / "sample.gpkg")
    [sample] = _loaded(assessment.SAMPLE_LAYER_NAME)
    assert sample.startEditing()
    first = next(sample.getFeatures())
    sample.changeAttributeValue(first.id(), sample.fields().indexOf("reference"), "Forest")
    text = _refused("assess_accuracy", {"TILES": str(world["tiles"]), "REFERENCE": sample, "FIELD": "reference",
                                        "OUTPUT": str(tmp_path / "report")})
    assert "has unsaved edits: save them" in text and not (tmp_path / "report").exists()
    sample.rollBack()


def test_registered_with_help_cancel_and_batch(plugin):
    from qgis.core import QgsApplication
    names = {"sample_tiles": "Sample tiles for accuracy assessment",
             "assess_accuracy": "Assess accuracy and class areas"}
    for name, title in names.items():
        algorithm = QgsApplication.processingRegistry().algorithmById(f"asymkd:{name}")
        assert algorithm is not None and algorithm.displayName() == title and algorithm.group() == "Assessment"
        help_text = algorithm.shortHelpString()
        assert "count towards the estimates" in help_text and "never counted as accuracy" in help_text
        assert algorithm.flags() & algorithm.FlagCanCancel and algorithm.flags() & algorithm.FlagSupportsBatch


def test_command_lines():
    tiles = assessment.layers.VectorSource("/d/tiles.gpkg", "tiles")
    reference = assessment.layers.VectorSource("/d/sample.gpkg", "sample")
    assert assessment.assess_command(tiles, reference, "ref", Path("/d/out")).args == [
        "assess", "/d/tiles.gpkg", "--reference", "/d/sample.gpkg", "--field", "ref", "--layer", "tiles",
        "--reference-layer", "sample", "--out", "/d/out"]
    options = assessment.SampleOptions(n=10, design="random", min_per_class=0, seed=3, overwrite=True)
    assert assessment.sample_command("/d/t.gpkg", Path("/d/s.gpkg"), options).args == [
        "sample", "/d/t.gpkg", "--n", "10", "--design", "random", "--min-per-class", "0", "--seed", "3",
        "--out", "/d/s.gpkg", "--overwrite"]


# -- qgis_process ---------------------------------------------------------------------------------
def test_qgis_process_samples_and_assesses(world, tmp_path):
    config = tmp_path / "qgis config"
    tool = REPO / "tools" / "plugin_package.py"
    subprocess.run([sys.executable, str(tool), "zip", "--out", str(config / "asymkd_qgis.zip")], check=True,
                   timeout=120, capture_output=True)
    subprocess.run([sys.executable, str(tool), "deploy", "--zip", str(config / "asymkd_qgis.zip"), "--profiles-dir",
                    str(config / "profiles")], check=True, timeout=120, capture_output=True)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "QGIS_CUSTOM_CONFIG_PATH": str(config)}
    env.pop("PYTHONPATH", None)

    def run(*args: str) -> dict:
        done = subprocess.run([mapdata.qgis_process(), "--json", "run", *args], env=env, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads(done.stdout[done.stdout.index("{"):])["results"]

    sample = tmp_path / "qp sample.gpkg"
    assert run("asymkd:sample_tiles", "--", f"TILES={world['tiles']}", "N=40", "MIN_PER_CLASS=5",
               f"OUTPUT={sample}")["SAMPLED"] == 40
    layer = QgsVectorLayer(f"{sample}|layername=sample", "s", "ogr")
    _label(layer, world["truth"])
    del layer
    results = run("asymkd:assess_accuracy", "--", f"TILES={world['tiles']}", f"REFERENCE={sample}",
                  f"OUTPUT={tmp_path / 'qp report'}")
    assert results["LABELS"] == 40 and Path(results["CSV"]).is_file()
    assert results["OVERALL_CI_LOW"] <= results["OVERALL_ACCURACY"] <= results["OVERALL_CI_HIGH"]
