"""The review of uncertain tiles and the area table, in real QGIS: the queue, the reviews
written to the GeoPackage, the export as labels and their use by the Data step's chips."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer, QgsWkbTypes

import mapdata
from asymkd_qgis import layers, review, steps, validation
from asymkd_qgis.engine import run_engine
from asymkd_qgis.layout import RunLayout
from asymkd_qgis.review import ReviewPanel
from conftest import MODEL_TILE, REPO, require_commands, wait_for


def _rows() -> list[dict]:
    """The test tiles; one more (confidence 0.63) is marked uncertain by another rule."""
    rows = mapdata.tile_rows()
    for row in rows:
        if row["confidence"] == 0.63:
            assert not row["uncertain"]
            row["uncertain"] = 1
    return rows


@pytest.fixture
def tiles(tmp_path) -> Path:
    return mapdata.write_tiles(tmp_path / "out" / "scene.gpkg", _rows(), regions=True)


@pytest.fixture
def panel(qgis_canvas):
    shown = ReviewPanel(qgis_canvas)
    yield shown
    shown.release()


def _tile_layer(path: Path) -> QgsVectorLayer:
    layer = layers.load_vector_result(path, add=True)
    assert layer.isValid() and layer.featureCount() == 16
    return layer


def _fresh(path: Path) -> dict[str, dict]:
    """The tiles read back from the file by a new layer: tile_key -> attributes."""
    layer = QgsVectorLayer(f"{path}|layername=tiles", "check", "ogr")
    assert layer.isValid()
    names = layer.fields().names()
    return {str(f["tile_key"]): {n: (None if f[n] is None or str(f[n]) == "NULL" else f[n]) for n in names}
            for f in layer.getFeatures()}


def test_the_queue_lists_only_uncertain_tiles_least_confident_first(panel, tiles, qgis_new_project):
    layer = _tile_layer(tiles)
    panel.set_layer(layer)
    rows = {r["tile_key"]: r for r in _rows()}
    expected = sorted((r for r in rows.values() if r["uncertain"]), key=lambda r: r["confidence"])
    shown = [layer.getFeature(item.fid)["tile_key"] for item in panel.items]
    assert shown == [r["tile_key"] for r in expected]
    assert len(shown) == 8 and panel.queue.count() == 8  # the 0.63 tile marked by another rule is in it
    assert not panel.threshold.isEnabled()  # the engine's marking decides, not the threshold
    assert panel.rule.currentText() == panel.MARKED
    assert panel.queue.item(0).text().startswith("0.35 Forest, 2nd River")
    assert [panel.class_combo.itemText(i) for i in range(panel.class_combo.count())] == list(mapdata.CLASSES)


def test_selecting_a_tile_selects_it_and_zooms_the_map_to_it(panel, tiles, qgis_canvas, qgis_new_project):
    layer = _tile_layer(tiles)
    qgis_canvas.setDestinationCrs(layer.crs())
    qgis_canvas.setExtent(layer.extent())
    panel.set_layer(layer)
    panel.queue.setCurrentRow(2)
    fid = panel.items[2].fid
    assert layer.selectedFeatureIds() == [fid]
    box = layer.getFeature(fid).geometry().boundingBox()
    extent = qgis_canvas.extent()
    # centred on the tile, 5 tiles across its shorter side (the canvas keeps its aspect ratio)
    assert extent.contains(box) and min(extent.width(), extent.height()) == pytest.approx(5 * box.width())
    assert extent.center().x() == pytest.approx(box.center().x()) and extent.center().y() == pytest.approx(
        box.center().y())
    assert panel.accept_button.isEnabled() and panel.set_button.isEnabled()


def test_accept_and_set_class_write_the_review_to_the_geopackage(panel, tiles, qgis_new_project):
    layer = _tile_layer(tiles)
    panel.set_layer(layer)
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    panel.queue.setCurrentRow(0)
    first = layer.getFeature(panel.current_fid())["tile_key"]
    panel.accept_current()
    assert panel.queue.currentRow() == 1  # on to the next tile
    second = layer.getFeature(panel.current_fid())["tile_key"]
    panel.class_combo.setCurrentIndex(panel.class_combo.findText("Urban"))
    panel.set_current(panel.class_combo.currentData())
    assert not layer.isEditable() and "saved" in panel.status.text()
    read = _fresh(tiles)
    assert read[first]["reviewed_class"] == read[first]["class_id"] == 0  # accepted: its own class (Forest)
    assert read[second]["reviewed_class"] == 2 and read[second]["class_id"] == 1  # River set to Urban
    for key in (first, second):
        assert read[key]["reviewed_by"] == review.reviewer() != ""
        when = dt.datetime.fromisoformat(read[key]["reviewed_at"])
        assert when.utcoffset() == dt.timedelta(0) and before <= when <= dt.datetime.now(dt.timezone.utc)
    assert sum(r["reviewed_class"] is not None for r in read.values()) == 2
    assert "\u2713 Urban" in panel.queue.item(1).text() and "2 reviewed" in panel.summary.text()


def test_a_layer_with_no_tile_marked_is_reviewed_below_a_confidence(panel, tmp_path, qgis_new_project):
    """The engine writes uncertain=0 everywhere when it was not asked to mark: the threshold decides."""
    rows = [dict(r, uncertain=0) for r in mapdata.tile_rows()]
    layer = _tile_layer(mapdata.write_tiles(tmp_path / "unmarked.gpkg", rows))
    panel.set_layer(layer)
    assert panel.rule.currentText() == panel.BELOW and panel.threshold.isEnabled()
    assert [item.confidence for item in panel.items] == [0.35, 0.39, 0.43, 0.47]  # below 0.5
    panel.threshold.setValue(0.4)
    assert [item.confidence for item in panel.items] == [0.35, 0.39]
    panel.rule.setCurrentText(panel.MARKED)
    assert panel.items == [] and "0 tiles marked uncertain" in panel.summary.text()


def test_an_older_output_falls_back_to_the_threshold_and_gets_the_review_fields(panel, tmp_path, qgis_new_project):
    path = mapdata.write_tiles(tmp_path / "old.gpkg", mapdata.tile_rows(), current=False)
    layer = _tile_layer(path)
    assert "uncertain" not in layer.fields().names()
    panel.set_layer(layer)
    assert panel.threshold.isEnabled()
    panel.threshold.setValue(0.45)
    assert [item.confidence for item in panel.items] == [0.35, 0.39, 0.43]
    panel.queue.setCurrentRow(0)
    panel.accept_current()
    read = _fresh(path)
    reviewed = [r for r in read.values() if r.get("reviewed_class") is not None]
    assert len(reviewed) == 1 and reviewed[0]["confidence"] == 0.35 and reviewed[0]["reviewed_by"]
    with pytest.raises(validation.InputError, match="outside 0-1"):
        review.uncertain_tiles(layer, 1.5)


def _review_two(panel, layer) -> dict[str, str]:
    """Accept the first tile (Forest), set the second to Urban: tile_key -> class name."""
    panel.set_layer(layer)
    panel.queue.setCurrentRow(0)
    keys = {str(layer.getFeature(panel.current_fid())["tile_key"]): "Forest"}
    panel.accept_current()
    keys[str(layer.getFeature(panel.current_fid())["tile_key"])] = "Urban"
    panel.set_current(2)
    return keys


def test_export_writes_the_reviewed_tiles_as_label_polygons(panel, tiles, tmp_path, qgis_new_project):
    layer = _tile_layer(tiles)
    reviewed = _review_two(panel, layer)
    out = tmp_path / "labels" / "reviewed.gpkg"
    assert panel.export_to(out) == 2
    assert "2 reviewed tiles written" in panel.status.text() and not panel.status.styleSheet()
    assert "one class only" not in panel.status.text()
    assert layers.gpkg_layers(out) == ["labels"]
    labels = QgsVectorLayer(str(out), "labels", "ogr")
    assert labels.isValid() and labels.featureCount() == 2
    assert labels.geometryType() == QgsWkbTypes.GeometryType.PolygonGeometry
    assert labels.crs().authid() == "EPSG:32632"
    tiles_by_key = {str(f["tile_key"]): f for f in layer.getFeatures()}
    for feature in labels.getFeatures():
        key = str(feature["tile_key"])
        assert feature["class"] == reviewed[key]
        assert feature.geometry().equals(tiles_by_key[key].geometry())
    assert [p.name for p in out.parent.iterdir()] == ["reviewed.gpkg"]  # no temporary file left


def test_an_export_of_one_class_says_the_data_step_needs_more(panel, tiles, tmp_path, qgis_new_project):
    layer = _tile_layer(tiles)
    panel.set_layer(layer)
    panel.queue.setCurrentRow(0)
    panel.accept_current()
    assert panel.export_to(tmp_path / "one.gpkg") == 1
    assert "one class only" in panel.status.text()


def test_export_with_nothing_reviewed_says_so_and_writes_nothing(panel, tiles, tmp_path, qgis_new_project):
    layer = _tile_layer(tiles)
    panel.set_layer(layer)
    out = tmp_path / "labels" / "reviewed.gpkg"
    assert panel.export_to(out) == 0
    assert "No tile of" in panel.status.text() and "Nothing was written" in panel.status.text()
    assert panel.status.styleSheet()  # shown as an error
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_reviewed_labels_feed_the_data_steps_chips(panel, tiles, tmp_path, real_engine, qgis_new_project):
    """Round trip: the exported labels pass the Data step's checks and the engine cuts chips of them."""
    layer = _tile_layer(tiles)
    reviewed = _review_two(panel, layer)
    out = tmp_path / "reviewed.gpkg"
    assert panel.export_to(out) == 2
    raster = QgsRasterLayer(str(mapdata.write_raster(tmp_path / "rgb.tif", 3)), "rgb", "gdal")
    labels = QgsVectorLayer(str(out), "reviewed", "ogr")
    QgsProject.instance().addMapLayers([raster, labels])
    assert sorted(validation.check_labels(labels, review.LABEL_FIELD, raster)) == ["Forest", "Urban"]
    run = RunLayout(tmp_path / "run")
    source = steps.MapSource(raster, labels, review.LABEL_FIELD)
    prepared = steps.map_chips(source, "RGB", run.rgb, run, steps.ChipOptions(size=16), validation.check_rgb_raster)
    assert not prepared.pre_steps  # the GeoPackage is read as it is
    for command in prepared.commands:
        outcome = run_engine(real_engine, command.args)
        assert outcome.ok, outcome.message()
    manifest = json.loads((run.rgb / "chips.json").read_text())
    assert manifest["counts"] == {"Forest": 1, "Urban": 1}
    assert {c["class"] for c in manifest["chips"]} == set(reviewed.values())


def test_the_dock_shows_the_area_table_and_loads_the_regions(dock, tiles, qgis_new_project):
    dock.forms["classify"].show_classified(tiles)
    panel = dock.panels["classify"]
    assert not panel.areas.isHidden() and "scene regions" in panel.areas_note.text()
    # 16 tiles of 160 m x 160 m (2.56 ha): class, tiles, hectares, share, mean confidence
    mean = {name: sum(r["confidence"] for r in _rows() if r["class_name"] == name) / n
            for name, n in (("Forest", 6), ("River", 5), ("Urban", 5))}
    assert panel.areas.cell_texts() == [["Forest", "6", "15.4", "37.5", f"{mean['Forest']:.2f}"],
                                        ["River", "5", "12.8", "31.2", f"{mean['River']:.2f}"],
                                        ["Urban", "5", "12.8", "31.2", f"{mean['Urban']:.2f}"]]
    regions = [lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.name() == "scene regions"]
    assert len(regions) == 1 and regions[0].featureCount() == 3


def test_an_older_output_shows_no_area_table(dock, tmp_path, qgis_new_project):
    path = mapdata.write_tiles(tmp_path / "old.gpkg", current=False)
    dock.forms["classify"].show_classified(path)
    assert dock.panels["classify"].areas.isHidden() and dock.panels["classify"].areas_note.isHidden()
    assert layers.read_class_areas(path) == [] and layers.load_regions(path) is None


def test_the_dock_opens_the_review_of_a_loaded_tile_layer(dock, tiles, qgis_new_project):
    classify = dock.forms["classify"]
    assert classify.open_review() is None and dock.panels["classify"].has_error  # nothing to review yet
    layer = _tile_layer(tiles)
    panel = classify.open_review(layer)
    assert panel is not None and panel.layer() is layer and panel.queue.count() == 8
    assert classify.review is panel


def _engine_marks_uncertain() -> None:
    require_commands("classify")
    if "--uncertain-below" not in (REPO / "backend" / "asymkd" / "commands" / "classify.py").read_text():
        pytest.skip("the engine's classify cannot mark uncertain tiles yet")


def test_a_classification_from_the_dock_shows_its_areas_and_feeds_the_review(dock, real_engine, tiny_model, tmp_path,
                                                                              qgis_new_project):
    """The real engine classifies from the dock with 'Uncertainty' and regions: the area table
    agrees with the tile layer, the regions are loaded, and the review lists the marked tiles."""
    _engine_marks_uncertain()
    scene = QgsRasterLayer(str(mapdata.write_raster(tmp_path / "scene.tif", 3, width=4 * MODEL_TILE,
                                                    height=3 * MODEL_TILE, seed=3)), "scene", "gdal")
    QgsProject.instance().addMapLayer(scene)
    dock.engine_factory = lambda: real_engine
    dock.run_dir.setFilePath(str(tmp_path / "run"))
    classify = dock.forms["classify"]
    classify.model_file.setFilePath(str(tiny_model))
    classify.layer.setLayer(scene)
    classify.uncertain_below.setValue(0.99)  # a fresh model is unsure of every tile
    classify.regions.setChecked(True)
    finished = []
    dock.jobFinished.connect(lambda step, job: finished.append(job))
    assert dock.run_step("classify") is not None
    wait_for(lambda: finished, 300, "the classification")
    assert finished[0].state == finished[0].OK, finished[0].message()
    [tiles] = classify.loaded_layers
    counts: dict[str, int] = {}
    for feature in tiles.getFeatures():
        counts[feature["class_name"]] = counts.get(feature["class_name"], 0) + 1
    shown = {row[0]: int(row[1]) for row in dock.panels["classify"].areas.cell_texts()}
    assert {k: v for k, v in shown.items() if v} == counts and sum(counts.values()) == 12
    [regions] = classify.region_layers
    assert regions.isValid() and sum(f["tiles"] for f in regions.getFeatures()) == 12
    assert regions.name() in dock.panels["classify"].areas_note.text()
    panel = classify.open_review()
    assert panel.layer() is tiles and panel.rule.currentText() == panel.MARKED
    assert len(panel.items) == 12
    assert [i.confidence for i in panel.items] == sorted(i.confidence for i in panel.items)


def test_processing_classify_marks_uncertain_tiles(plugin, qgis_processing, real_engine, tiny_model, tmp_path):
    _engine_marks_uncertain()
    import processing
    scene = mapdata.write_raster(tmp_path / "scene.tif", 3, width=4 * MODEL_TILE, height=3 * MODEL_TILE, seed=3)
    out = tmp_path / "tiles.gpkg"
    result = processing.run("asymkd:classify", {"MODEL": str(tiny_model), "INPUT": str(scene), "UNCERTAIN_BELOW": 0.99,
                                                "UNCERTAIN_BY": 1, "OUTPUT": str(out)})
    assert result["TILES"] == 12
    layer = QgsVectorLayer(f"{out}|layername=tiles", "tiles", "ogr")
    assert sum(f["uncertain"] for f in layer.getFeatures()) == 12  # margins of a fresh model are all below 0.99
    assert sum(row.tiles for row in layers.read_class_areas(out)) == 12


def test_a_review_while_the_user_edits_the_layer_stays_in_the_edits(panel, tiles, qgis_new_project):
    layer = _tile_layer(tiles)
    panel.set_layer(layer)
    assert layer.startEditing()
    panel.queue.setCurrentRow(0)
    panel.accept_current()
    assert layer.isEditable() and "save them" in panel.status.text()
    assert all(r["reviewed_class"] is None for r in _fresh(tiles).values())  # not saved behind the user's back
    assert layer.commitChanges()
    assert sum(r["reviewed_class"] is not None for r in _fresh(tiles).values()) == 1


def test_the_area_table_puts_long_class_names_on_their_own_line_in_a_narrow_dock(qgis_app):
    from asymkd_qgis.widgets import AreaTable
    rows = [layers.ClassArea(0, "HerbaceousVegetation", 10, 410.0, 0.5, 0.38, 3),
            layers.ClassArea(1, "Forest", 10, 410.0, 0.5, 0.62, 0)]
    table = AreaTable()
    table.set_rows(rows)
    expected = [["HerbaceousVegetation", "10", "410", "50.0", "0.38"], ["Forest", "10", "410", "50.0", "0.62"]]
    for width, stacked in ((600, False), (250, True), (600, False)):
        table.resize(width, table.height())
        table.show()
        qgis_app.processEvents()
        assert table.stacked is stacked and table.rowCount() == (4 if stacked else 2)
        assert table.cell_texts() == expected
        assert table.height() >= table.horizontalHeader().height() + sum(
            table.rowHeight(r) for r in range(table.rowCount()))  # every line shown
    table.close()
