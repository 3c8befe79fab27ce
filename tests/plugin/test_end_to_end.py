"""End to end with the real engine: Processing classification, a full dock job, qgis_process,
and the plugin zip installed into a fresh profile. Tiny data and epochs keep this short."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qgis.core import QgsCategorizedSymbolRenderer, QgsProject, QgsRasterLayer, QgsVectorLayer

import mapdata
from asymkd_qgis.engine import run_engine
from conftest import MODEL_CLASSES, MODEL_TILE, REPO, require_commands, wait_for

CLASSES, TILE = MODEL_CLASSES, MODEL_TILE


@pytest.fixture
def scene(tmp_path) -> Path:
    """An RGB scene of 4 x 3 tiles of 32 pixels, no nodata."""
    return mapdata.write_raster(tmp_path / "scène rgb.tif", 3, width=4 * TILE, height=3 * TILE, seed=3)


# -- Processing ------------------------------------------------------------------------
def test_processing_classify_scene_tiles(plugin, qgis_processing, real_engine, tiny_model, scene, tmp_path):
    require_commands("classify")
    import processing
    out = tmp_path / "tiles out.gpkg"
    result = processing.runAndLoadResults("asymkd:classify", {"MODEL": str(tiny_model), "INPUT": str(scene),
                                                              "BATCH_SIZE": 5, "OUTPUT": str(out)})
    assert result["TILES"] == 12
    layer = QgsVectorLayer(str(out), "tiles", "ogr")
    assert layer.isValid() and layer.featureCount() == 12
    loaded = [found for found in QgsProject.instance().mapLayers().values()
              if isinstance(found, QgsVectorLayer) and Path(found.source().split("|")[0]) == out]
    assert len(loaded) == 1
    renderer = loaded[0].renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer)
    assert {c.label() for c in renderer.categories()} >= set(CLASSES) or len(renderer.categories()) >= len(CLASSES)
    names = {f[renderer.classAttribute()] for f in layer.getFeatures()}
    assert names <= {c.value() for c in renderer.categories()}


_OPEN_WITH_SYSTEM_GDAL = """
import json, sys
from osgeo import gdal, ogr
messages = []
gdal.PushErrorHandler(lambda level, number, text: messages.append(text))
ds = ogr.Open(sys.argv[1])
print(json.dumps({"gdal": gdal.__version__, "features": ds.GetLayer(0).GetFeatureCount(), "messages": messages}))
"""


def test_classified_geopackage_opens_cleanly_in_the_oldest_supported_qgis(real_engine, tiny_model, scene, tmp_path):
    """QGIS 3.22's GDAL (Debian's system GDAL here) reads the engine's GeoPackage without the
    'may only be partially supported' warning that GeoPackage 1.4 brings."""
    require_commands("classify")
    out = tmp_path / "tiles.gpkg"
    outcome = run_engine(real_engine, ["classify", str(tiny_model), str(scene), "--out", str(out)])
    assert outcome.ok, outcome.message()
    done = subprocess.run(["/usr/bin/python3", "-c", _OPEN_WITH_SYSTEM_GDAL, str(out)], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["features"] == 12
    assert report["messages"] == [], report


def test_processing_classify_a_layer_that_is_not_a_file(plugin, qgis_processing, real_engine, tiny_model, scene,
                                                        tmp_path):
    """A virtual raster layer (no file behind it) is exported for the area at the model's resolution."""
    require_commands("classify")
    import processing
    source = QgsRasterLayer(str(scene), "source", "gdal")
    extent = source.extent()
    uri = (f"?crs=EPSG:{mapdata.EPSG}"
           f"&extent={extent.xMinimum()},{extent.yMinimum()},{extent.xMaximum()},{extent.yMaximum()}"
           f"&width={source.width()}&height={source.height()}&formula=%22s@1%22&s:uri={scene}&s:provider=gdal")
    virtual = QgsRasterLayer(uri, "virtual", "virtualraster")
    if not virtual.isValid():
        pytest.skip("the virtual raster provider is not available")
    QgsProject.instance().addMapLayers([source, virtual])  # the project owns them (freed before QGIS exits)
    # one band: the classify algorithm must refuse it as an RGB layer
    from qgis.core import QgsProcessingException
    with pytest.raises(QgsProcessingException, match="has 1 band"):
        processing.run("asymkd:classify",
                       {"MODEL": str(tiny_model), "INPUT": virtual, "OUTPUT": str(tmp_path / "v.gpkg")})
    from asymkd_qgis import layers
    assert layers.local_raster_path(virtual) is None
    path, export = layers.raster_source(virtual, tmp_path / "exports", extent, virtual.crs(), 10.0)
    exported = export.run()
    assert exported == path
    written = QgsRasterLayer(exported, "exported", "gdal")
    assert (written.width(), written.height()) == (source.width(), source.height())
    del written


def test_processing_classify_an_xyz_layer_exported_for_the_area(plugin, qgis_processing, real_engine, tiny_model,
                                                                tmp_path):
    """A web map layer (XYZ tiles, here from local files) is exported for the area at the
    model's resolution, then classified."""
    require_commands("classify")
    import processing
    uri, (minx, miny, maxx, maxy) = mapdata.write_xyz_tiles(tmp_path / "xyz tiles")
    xyz = QgsRasterLayer(uri, "xyz", "wms")
    assert xyz.isValid()
    QgsProject.instance().addMapLayer(xyz)
    # a 640 m x 320 m box: 64 x 32 pixels at the model's 10 m, two 32-pixel tiles
    box = f"{minx + 200},{minx + 840},{maxy - 520},{maxy - 200} [EPSG:3857]"
    out = tmp_path / "xyz tiles.gpkg"
    result = processing.run("asymkd:classify",
                            {"MODEL": str(tiny_model), "INPUT": xyz, "EXTENT": box, "OUTPUT": str(out)})
    assert result["TILES"] == 2
    assert QgsVectorLayer(str(out), "t", "ogr").featureCount() == 2


def test_model_designer_chain_export_then_classify(plugin, qgis_processing, real_engine, tiny_model, scene, tmp_path):
    """The algorithms chain in a Processing model: Export model feeds Classify scene tiles."""
    require_commands("export", "classify")
    from qgis.core import (
        QgsProcessingContext,
        QgsProcessingFeedback,
        QgsProcessingModelAlgorithm,
        QgsProcessingModelChildAlgorithm,
        QgsProcessingModelChildParameterSource,
        QgsProcessingModelOutput,
        QgsProcessingModelParameter,
        QgsProcessingParameterFile,
        QgsProcessingParameterRasterLayer,
    )
    source = QgsProcessingModelChildParameterSource
    model = QgsProcessingModelAlgorithm("export and classify", "tests")
    model.addModelParameter(QgsProcessingParameterFile("student", "student",
                                                       behavior=QgsProcessingParameterFile.Folder),
                            QgsProcessingModelParameter("student"))
    model.addModelParameter(QgsProcessingParameterRasterLayer("scene", "scene"), QgsProcessingModelParameter("scene"))
    export = QgsProcessingModelChildAlgorithm("asymkd:export")
    export.setChildId("export")
    export.addParameterSources("MODEL", [source.fromModelParameter("student")])
    model.addChildAlgorithm(export)
    classify = QgsProcessingModelChildAlgorithm("asymkd:classify")
    classify.setChildId("classify")
    classify.addParameterSources("MODEL", [source.fromChildOutput("export", "OUTPUT")])
    classify.addParameterSources("INPUT", [source.fromModelParameter("scene")])
    for name, value in (("GRID", 0), ("TILE", 0), ("STRIDE", 0), ("ZOOM", 16), ("BATCH_SIZE", 8), ("DEVICE", 0)):
        classify.addParameterSources(name, [source.fromStaticValue(value)])
    output = QgsProcessingModelOutput("tiles")
    output.setChildId("classify")
    output.setChildOutputName("OUTPUT")
    classify.setModelOutputs({"tiles": output})
    model.addChildAlgorithm(classify)
    assert model.validate()[0], model.validate()[1]
    out = tmp_path / "model tiles.gpkg"
    context, feedback = QgsProcessingContext(), QgsProcessingFeedback()
    results, ok = model.run({"student": str(tiny_model.parent / "student"), "scene": str(scene),
                             "classify:tiles": str(out)}, context, feedback)
    assert ok
    assert QgsVectorLayer(str(out), "t", "ogr").featureCount() == 12


# -- the dock, all steps ---------------------------------------------------------------
@pytest.fixture
def synthetic_world(real_engine, tmp_path) -> dict:
    require_commands("synth")
    outcome = run_engine(real_engine, ["synth", "--out", str(tmp_path / "world"), "--size", str(TILE),
                                       "--ms-per-class", "8", "--rgb-per-class", "8", "--test-per-class", "4",
                                       "--unlabeled-per-class", "0", "--paired", "0", "--classes", "3"])
    assert outcome.ok, outcome.message()
    return outcome.results


def test_full_dock_job_teacher_matcher_distill_classify(dock, real_engine, synthetic_world, tmp_path):
    require_commands("chips", "teacher", "matcher", "pair", "distill", "export", "classify")
    world = synthetic_world
    project = QgsProject.instance()
    layer = {}
    for key in ("ms_scene", "rgb_scene", "rgb_test_scene"):
        layer[key] = QgsRasterLayer(world[key], key, "gdal")
    for key in ("ms_labels", "rgb_labels", "rgb_test_labels"):
        layer[key] = QgsVectorLayer(world[key], key, "ogr")
    for item in layer.values():
        assert item.isValid()
        project.addMapLayer(item)
    dock.engine_factory = lambda: real_engine
    dock.run_dir.setFilePath(str(tmp_path / "run with space"))
    data, teacher, distill, classify = (dock.forms[s] for s in ("data", "teacher", "distill", "classify"))
    data.ms_source.set_layer(layer["ms_scene"])
    data.ms_labels.set(layer["ms_labels"], "class")
    data.pair_raster.setLayer(layer["rgb_scene"])  # overlaps the MS scene in part: co-located pairs
    data.rgb_source.set_layer(layer["rgb_scene"])
    data.rgb_labels.set(layer["rgb_labels"], "class")
    data.test_source.set_layer(layer["rgb_test_scene"])
    data.test_labels.set(layer["rgb_test_labels"], "class")
    data.chip_size.setValue(TILE)
    teacher.epochs.setValue(1)
    teacher.settings.setText("teacher.folds=0")
    teacher.device.setCurrentText("cpu")
    distill.device.setCurrentText("cpu")
    dock.forms["matcher"].epochs.setValue(1)
    distill.epochs.setValue(1)
    distill.baseline.setChecked(False)
    classify.layer.setLayer(layer["rgb_test_scene"])
    classify.area.setCurrentText("Whole layer")
    finished = []
    dock.jobFinished.connect(lambda step, job: finished.append((step, job.state, job.message())))
    dock.run_all()
    wait_for(lambda: len(finished) == 5 or any(state != "ok" for _, state, _ in finished), 600, "all five steps")
    expected = [(s, "ok") for s in ("data", "teacher", "matcher", "distill", "classify")]
    assert [(s, state) for s, state, _ in finished] == expected, finished
    run = tmp_path / "run with space"
    assert (run / "report.html").is_file() and (run / "student.onnx").is_file()
    assert "report.html" in dock.panels["distill"].results.text()
    assert dock.panels["distill"].image.isVisibleTo(dock.panels["distill"])
    [classified] = classify.loaded_layers
    assert project.mapLayer(classified.id()) is classified
    assert classified.featureCount() > 0
    assert isinstance(classified.renderer(), QgsCategorizedSymbolRenderer)


# -- qgis_process and the plugin zip ------------------------------------------------------
@pytest.fixture(scope="session")
def installed_profile(tmp_path_factory) -> Path:
    """The zip from `make package`'s tool, installed into a fresh profile directory."""
    root = tmp_path_factory.mktemp("qgis config")
    zip_path = root / "asymkd_qgis.zip"
    tool = REPO / "tools" / "plugin_package.py"
    subprocess.run([sys.executable, str(tool), "zip", "--out", str(zip_path)], check=True, timeout=120)
    subprocess.run([sys.executable, str(tool), "deploy", "--zip", str(zip_path), "--profiles-dir",
                    str(root / "profiles")], check=True, timeout=120)
    return root


def _qgis_process(config: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "QGIS_CUSTOM_CONFIG_PATH": str(config)}
    env.pop("PYTHONPATH", None)
    return subprocess.run([mapdata.qgis_process(), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_zip_installs_into_a_fresh_profile_and_loads(installed_profile):
    import zipfile
    plugin_dir = installed_profile / "profiles" / "default" / "python" / "plugins" / "asymkd_qgis"
    names = zipfile.ZipFile(installed_profile / "asymkd_qgis.zip").namelist()
    assert all(n.startswith("asymkd_qgis/") for n in names)
    assert "asymkd_qgis/metadata.txt" in names and "asymkd_qgis/backend/asymkd/cli.py" in names
    assert "asymkd_qgis/backend/requirements.txt" in names and "asymkd_qgis/resources/icons/asymkd.png" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/tests/" in n or "egg-info" in n]
    assert (plugin_dir / "metadata.txt").is_file()
    plugins = _qgis_process(installed_profile, "plugins")
    assert "* asymkd_qgis" in plugins.stdout, plugins.stdout + plugins.stderr
    listed = _qgis_process(installed_profile, "list")
    for name in ("classify", "distill", "export", "matcher", "teacher"):
        assert f"asymkd:{name}" in listed.stdout
    # the installed plugin uses its bundled engine source, not the repository's
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from asymkd_qgis import paths; "
            "print(paths.engine_source_dir()); print(paths.resources_dir())")
    where = subprocess.run([sys.executable, "-c", code, str(plugin_dir.parent)], capture_output=True, text=True,
                           check=True)
    assert where.stdout.splitlines() == [str(plugin_dir / "backend"), str(plugin_dir / "resources")]


def test_qgis_process_run_classify(installed_profile, real_engine, tiny_model, scene, tmp_path):
    require_commands("classify")
    out = tmp_path / "qp tiles.gpkg"
    done = _qgis_process(installed_profile, "--json", "run", "asymkd:classify", "--", f"MODEL={tiny_model}",
                         f"INPUT={scene}", "TILE=32", f"OUTPUT={out}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["results"]["TILES"] == 12
    assert QgsVectorLayer(str(out), "t", "ogr").featureCount() == 12
    assert out.with_suffix(".qml").is_file()
