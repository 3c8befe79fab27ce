"""The plugin loads into QGIS and unloads without leaving anything behind."""

from __future__ import annotations

import configparser

from qgis.core import QgsApplication, QgsProject, QgsVectorLayer
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QCoreApplication, QEvent
from qgis.PyQt.QtWidgets import QAction, QDockWidget

import mapdata
from conftest import REPO

ALGORITHMS = {"teacher": "Train teacher", "matcher": "Train matcher and pair", "distill": "Distill student",
              "export": "Export model", "classify": "Classify scene tiles",
              "sample_tiles": "Sample tiles for accuracy assessment",
              "assess_accuracy": "Assess accuracy and class areas"}


def _flush_deletes() -> None:
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    QCoreApplication.processEvents()


def _ours(main_window):
    actions = [a for a in main_window.findChildren(QAction) if a.objectName().startswith("asymkd_")]
    docks = [d for d in main_window.findChildren(QDockWidget) if d.objectName() in ("AsymKDDock", "AsymKDReviewDock")]
    return actions, docks


def test_classfactory_load_and_unload_leave_nothing(qgis_iface, qgis_new_project, tmp_path):
    import asymkd_qgis
    registry = QgsApplication.processingRegistry()
    plugin = asymkd_qgis.classFactory(qgis_iface)
    plugin.initGui()
    actions, docks = _ours(qgis_iface.mainWindow())
    assert len(actions) == 5 and len(docks) == 1
    assert registry.providerById("asymkd") is not None
    tiles = QgsVectorLayer(str(mapdata.write_tiles(tmp_path / "tiles.gpkg")) + "|layername=tiles", "tiles", "ogr")
    QgsProject.instance().addMapLayer(tiles)
    review = plugin.review_uncertain()  # the review panel is docked too, and goes with the plugin
    assert review is not None and review.layer() is tiles and len(_ours(qgis_iface.mainWindow())[1]) == 2
    dock, kept_actions = plugin.dock, list(plugin.actions)

    plugin.unload()
    _flush_deletes()
    actions, docks = _ours(qgis_iface.mainWindow())
    assert actions == [] and docks == []
    assert registry.providerById("asymkd") is None
    assert sip.isdeleted(dock) and sip.isdeleted(review)
    assert all(sip.isdeleted(a) for a in kept_actions)
    assert plugin.actions == [] and plugin.dock is None and plugin.provider is None

    # loading again after an unload works (plugin reload)
    plugin.initGui()
    assert registry.providerById("asymkd") is not None
    plugin.unload()
    _flush_deletes()
    assert registry.providerById("asymkd") is None


def test_dock_builds_with_all_steps(dock):
    titles = [section.title() for section in dock.sections.values()]
    assert titles == ["1. Data", "2. Teacher", "3. Matcher and pairing", "4. Distill", "5. Classify"]
    for step in ("data", "teacher", "matcher", "distill", "classify"):
        panel = dock.panels[step]
        assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()
        assert panel.progress.value() == 0
    dock.show_step("distill")
    assert [s.isCollapsed() for s in dock.sections.values()] == [True, True, True, False, True]


def test_toolbar_action_toggles_the_dock(plugin):
    plugin.dock_action.trigger()
    assert plugin.dock.isVisible() or plugin.dock.isVisibleTo(plugin.dock.parentWidget())
    plugin.dock_action.trigger()
    assert not plugin.dock.isVisible()


def test_all_processing_algorithms_are_registered(plugin):
    provider = QgsApplication.processingRegistry().providerById("asymkd")
    assert provider.name() == "AsymKD"
    found = {a.name(): a.displayName() for a in provider.algorithms()}
    assert found == ALGORITHMS
    for name in ALGORITHMS:
        algorithm = QgsApplication.processingRegistry().algorithmById(f"asymkd:{name}")
        assert algorithm is not None and algorithm.shortHelpString()
        assert algorithm.flags() & algorithm.FlagCanCancel and algorithm.flags() & algorithm.FlagSupportsBatch


def test_metadata_is_complete():
    parser = configparser.ConfigParser()
    parser.read(REPO / "asymkd_qgis" / "metadata.txt", encoding="utf-8")
    general = parser["general"]
    for key in ("name", "description", "about", "version", "qgisMinimumVersion", "author", "email",
                "repository", "tracker", "homepage", "tags", "icon", "category", "hasProcessingProvider",
                "changelog"):
        assert general.get(key, "").strip(), key
    assert general["qgisMinimumVersion"] == "3.22"
    assert general["hasProcessingProvider"] == "yes"


def test_settings_persist_between_docks(plugin, qgis_iface):
    from asymkd_qgis.dock import AsymKDDock
    plugin.dock.forms["teacher"].epochs.setValue(7)
    plugin.dock.forms["matcher"].pair_method.setCurrentText("nearest")
    plugin.dock.forms["classify"].bands.setText("3,2,1")
    again = AsymKDDock(qgis_iface)
    assert again.forms["teacher"].epochs.value() == 7
    assert again.forms["matcher"].pair_method.currentText() == "nearest"
    assert again.forms["classify"].bands.text() == "3,2,1"
    again.deleteLater()
