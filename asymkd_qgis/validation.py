"""Checks of the user's layers before any engine command starts.

Each check raises InputError with a message that says what is wrong and what to do; the
dock shows it in the message bar, the Processing algorithms raise it as a
QgsProcessingException. The engine checks the same things again on its side.
"""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    Qgis,
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsGeometry,
    QgsMapLayer,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
    QgsWkbTypes,
)

from .errors import InputError

MIN_CLASSES = 2


def require_layer(layer: QgsMapLayer | None, what: str) -> QgsMapLayer:
    if layer is None or not layer.isValid():
        raise InputError(f"No {what} chosen: pick one in the list (or give a folder) and run again.")
    return layer


def require_folder(folder: str | None, what: str) -> Path:
    if not folder:
        raise InputError(f"No {what} chosen: pick a folder (or a layer) and run again.")
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"The {what} {path} does not exist: pick an existing folder.")
    return path


def is_colour_image(layer: QgsRasterLayer) -> bool:
    """Web layers (WMS, XYZ) deliver one ARGB colour band, not data bands."""
    provider = layer.dataProvider()
    return provider is not None and provider.dataType(1) in (Qgis.DataType.ARGB32, Qgis.DataType.ARGB32_Premultiplied)


def band_count(layer: QgsRasterLayer) -> int:
    """Bands as the engine will see them: an exported web layer has red, green, blue, alpha."""
    return 4 if is_colour_image(layer) else layer.bandCount()


def check_ms_raster(layer: QgsRasterLayer | None) -> QgsRasterLayer:
    layer = require_layer(layer, "multispectral (MS) raster layer")
    if is_colour_image(layer):
        raise InputError(f"The MS layer '{layer.name()}' is a web map of colours (red, green, blue): a "
                         "multispectral layer needs its data bands. Choose the MS scene.")
    if band_count(layer) <= 3:
        raise InputError(
            f"The MS layer '{layer.name()}' has {band_count(layer)} band(s): a multispectral layer "
            "needs more than 3 bands (e.g. Sentinel-2's 13). Choose the MS scene, not an RGB image.")
    return layer


def check_rgb_raster(layer: QgsRasterLayer | None, what: str = "RGB raster layer") -> QgsRasterLayer:
    layer = require_layer(layer, what)
    if band_count(layer) < 3:
        raise InputError(
            f"The {what} '{layer.name()}' has {band_count(layer)} band(s): an RGB layer needs at "
            "least 3 (red, green, blue). Choose a colour image.")
    return layer


def raster_extent_in(raster: QgsRasterLayer, other: QgsMapLayer) -> QgsRectangle:
    transform = QgsCoordinateTransform(raster.crs(), other.crs(), QgsProject.instance())
    return transform.transformBoundingBox(raster.extent())


def check_labels(labels: QgsVectorLayer | None, field: str | None, raster: QgsRasterLayer) -> list[str]:
    """The label layer must have features over the raster with at least two classes.

    Returns the class names found over the raster.
    """
    labels = require_layer(labels, "label layer")
    if not isinstance(labels, QgsVectorLayer) or labels.geometryType() not in (
            QgsWkbTypes.GeometryType.PolygonGeometry, QgsWkbTypes.GeometryType.PointGeometry):
        raise InputError(f"The label layer '{labels.name()}' must hold polygons or points.")
    if not field:
        raise InputError(f"No class field chosen for the label layer '{labels.name()}': "
                         "pick the field that holds the class names.")
    index = labels.fields().indexOf(field)
    if index < 0:
        raise InputError(f"The label layer '{labels.name()}' has no field '{field}'.")
    extent = raster_extent_in(raster, labels)
    area = QgsGeometry.fromRect(extent)
    request = QgsFeatureRequest().setFilterRect(extent).setSubsetOfAttributes([index])
    classes: set[str] = set()
    count = 0
    for feature in labels.getFeatures(request):
        if not feature.hasGeometry() or not feature.geometry().intersects(area):
            continue
        count += 1
        value = feature.attribute(index)
        if value is not None and str(value) not in ("", "NULL"):
            classes.add(str(value))
    if count == 0:
        raise InputError(
            f"The label layer '{labels.name()}' has no features over the raster '{raster.name()}': "
            "choose the labels of this scene (check that both are in the right place and CRS).")
    if len(classes) < MIN_CLASSES:
        only = f" ({next(iter(classes))})" if classes else ""
        raise InputError(
            f"The class field '{field}' of '{labels.name()}' has {len(classes)} class{only} over the "
            f"raster: a classifier needs at least {MIN_CLASSES}. Choose the field with the class names, "
            "or add labels of other classes.")
    return sorted(classes)
