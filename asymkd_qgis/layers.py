"""Layer I/O between QGIS and the engine: file paths for layers, exports of layers that are
not local files, and loading the engine's results (GeoPackage + QML style) into the project.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsFeedback,
                       QgsProject, QgsProviderRegistry, QgsRasterBlockFeedback, QgsRasterFileWriter, QgsRasterLayer,
                       QgsRasterPipe, QgsRasterProjector, QgsRectangle, QgsVectorFileWriter,
                       QgsVectorLayer)

from .validation import InputError


@dataclass
class VectorSource:
    path: str
    layer_name: str | None = None


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name, flags=re.UNICODE).strip("_") or "layer"


# -- rasters ------------------------------------------------------------------------------
def local_raster_path(layer: QgsRasterLayer) -> str | None:
    """The file behind a raster layer, or None when it is not a local GDAL file (WMS, XYZ, ...)."""
    if layer is None or layer.providerType() != "gdal":
        return None
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    path = parts.get("path") or layer.source()
    return path if path and os.path.isfile(path) else None


def export_raster(layer: QgsRasterLayer, extent: QgsRectangle, resolution: float, out_path: Path,
                  crs: QgsCoordinateReferenceSystem | None = None,
                  feedback: QgsFeedback | None = None) -> str:
    """Write `extent` (in `crs`, default the layer's) of any raster layer to a GeoTIFF at
    `resolution` map units per pixel. Web layers (WMS, XYZ) come out as RGBA images."""
    crs = crs if crs is not None and crs.isValid() else layer.crs()
    if extent is None or extent.isEmpty():
        raise InputError(f"Nothing to export from '{layer.name()}': the area is empty.")
    if not resolution or resolution <= 0:
        raise InputError(f"No ground resolution to export '{layer.name()}' at: set one (metres per pixel).")
    width = max(1, int(math.ceil(extent.width() / resolution)))
    height = max(1, int(math.ceil(extent.height() / resolution)))
    if width * height > 40000 * 40000:
        raise InputError(f"The area is {width} x {height} pixels at {resolution} per pixel: choose a smaller area.")
    # Snap the extent to whole pixels so the grid keeps the requested resolution exactly.
    extent = QgsRectangle(extent.xMinimum(), extent.yMaximum() - height * resolution,
                          extent.xMinimum() + width * resolution, extent.yMaximum())
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pipe = QgsRasterPipe()
    if not pipe.set(layer.dataProvider().clone()):
        raise InputError(f"The raster layer '{layer.name()}' cannot be read for export.")
    if crs != layer.crs():
        projector = QgsRasterProjector()
        projector.setCrs(layer.crs(), crs, QgsProject.instance().transformContext())
        pipe.insert(2, projector)
    writer = QgsRasterFileWriter(str(out_path))
    writer.setOutputFormat("GTiff")
    writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES"])
    block_feedback = QgsRasterBlockFeedback()
    if feedback is not None:  # a Processing cancel also stops the export
        feedback.canceled.connect(block_feedback.cancel)
        if feedback.isCanceled():
            block_feedback.cancel()
    error = writer.writeRaster(pipe, width, height, extent, crs,
                               QgsProject.instance().transformContext(), block_feedback)
    if error == QgsRasterFileWriter.WriteCanceled:
        raise InputError(f"Exporting '{layer.name()}' was cancelled.")
    if error != QgsRasterFileWriter.NoError:
        raise InputError(f"Exporting '{layer.name()}' to {out_path} failed (writer error {int(error)}).")
    return str(out_path)


def projected_crs_for(layer: QgsRasterLayer) -> QgsCoordinateReferenceSystem:
    """The layer's CRS when it is projected; Web Mercator otherwise (resolutions are metres)."""
    crs = layer.crs()
    if crs.isValid() and not crs.isGeographic():
        return crs
    return QgsCoordinateReferenceSystem("EPSG:3857")


def raster_file_for(layer: QgsRasterLayer, folder: Path, extent: QgsRectangle | None,
                    extent_crs: QgsCoordinateReferenceSystem | None, resolution: float | None,
                    feedback: QgsFeedback | None = None) -> str:
    """A local file for a raster layer: its own file, or an export of the area at `resolution`."""
    path = local_raster_path(layer)
    if path is not None:
        return path
    crs = projected_crs_for(layer)
    if extent is None or extent.isEmpty():
        extent, extent_crs = layer.extent(), layer.crs()
    if extent_crs is not None and extent_crs != crs:
        extent = QgsCoordinateTransform(extent_crs, crs, QgsProject.instance()).transformBoundingBox(extent)
    if not resolution:
        resolution = layer.rasterUnitsPerPixelX() if crs == layer.crs() else 0.0
    out = Path(folder) / f"{_safe_name(layer.name())}_export.tif"
    return export_raster(layer, extent, resolution, out, crs, feedback)


# -- vectors ------------------------------------------------------------------------------
def vector_source_for(layer: QgsVectorLayer, folder: Path, only_selected: bool = False) -> VectorSource:
    """A GeoPackage or other OGR file for a vector layer (exported when it is not one)."""
    if not only_selected and layer.providerType() == "ogr" and not layer.subsetString():
        parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
        path = parts.get("path")
        if path and os.path.isfile(path):
            return VectorSource(path, parts.get("layerName") or None)
    suffix = "_selection" if only_selected else ""
    out = Path(folder) / f"{_safe_name(layer.name())}{suffix}.gpkg"
    out.parent.mkdir(parents=True, exist_ok=True)
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = _safe_name(layer.name())
    options.onlySelectedFeatures = only_selected
    result = QgsVectorFileWriter.writeAsVectorFormatV3(layer, str(out), QgsProject.instance().transformContext(), options)
    if result[0] != QgsVectorFileWriter.NoError:
        raise InputError(f"Exporting '{layer.name()}' to {out} failed: {result[1]}")
    return VectorSource(str(out), options.layerName)


# -- results ------------------------------------------------------------------------------
def style_beside(path: str | Path) -> Path | None:
    qml = Path(path).with_suffix(".qml")
    return qml if qml.is_file() else None


def load_vector_result(path: str | Path, name: str | None = None, add: bool = True) -> QgsVectorLayer:
    """Load an engine GeoPackage with the QML style written beside it."""
    path = Path(path)
    layer = QgsVectorLayer(str(path), name or path.stem, "ogr")
    if not layer.isValid():
        raise InputError(f"The engine wrote {path} but QGIS cannot open it as a vector layer.")
    qml = style_beside(path)
    if qml is not None:
        message, ok = layer.loadNamedStyle(str(qml))
        if not ok:
            raise InputError(f"The style {qml} could not be applied: {message}")
    if add:
        QgsProject.instance().addMapLayer(layer)
    return layer


def load_raster_result(path: str | Path, name: str | None = None, add: bool = True) -> QgsRasterLayer:
    path = Path(path)
    layer = QgsRasterLayer(str(path), name or path.stem, "gdal")
    if not layer.isValid():
        raise InputError(f"The engine wrote {path} but QGIS cannot open it as a raster layer.")
    qml = style_beside(path)
    if qml is not None:
        layer.loadNamedStyle(str(qml))
    if add:
        QgsProject.instance().addMapLayer(layer)
    return layer


def load_results(paths: dict[str, str], add: bool = True) -> list:
    """Load every map layer among an engine result's paths (GeoPackages, GeoTIFFs)."""
    layers = []
    for key, value in paths.items():
        suffix = Path(value).suffix.lower()
        if suffix == ".gpkg" and Path(value).is_file():
            layers.append(load_vector_result(value, add=add))
        elif suffix in (".tif", ".tiff") and Path(value).is_file() and "raster" in key.lower():
            layers.append(load_raster_result(value, add=add))
    return layers
