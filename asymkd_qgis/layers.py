"""Layer I/O between QGIS and the engine: file paths for layers, exports of layers that are
not local files, and loading the engine's results (GeoPackage + QML style) into the project.

An export is planned in the main thread (where layers live) and written later, in a job's
worker thread: planning writes nothing, so checking a form's inputs never writes a file.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsFeedback,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterBlockFeedback,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRasterProjector,
    QgsRectangle,
    QgsVectorFileWriter,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import Qt

from .errors import InputError

# The layers of a classification GeoPackage (the engine's names).
TILES, AREAS, REGIONS = "tiles", "class_areas", "regions"


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


@dataclass
class RasterExport:
    """The export of an area of a raster layer to a GeoTIFF, prepared in the main thread (a
    clone of the layer's provider, the pixel grid) so that `run` can go in a worker thread."""

    name: str
    provider: object  # QgsRasterDataProvider clone, handed to the pipe by run()
    source_crs: QgsCoordinateReferenceSystem
    crs: QgsCoordinateReferenceSystem
    extent: QgsRectangle
    width: int
    height: int
    out_path: Path

    def run(self, feedback: QgsFeedback | None = None) -> str:
        """Write the file; a cancelled feedback stops it (InputError)."""
        if self.provider is None:
            raise InputError(f"The export of '{self.name}' has already run.")
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        pipe = QgsRasterPipe()
        provider, self.provider = self.provider, None
        if not pipe.set(provider):
            raise InputError(f"The raster layer '{self.name}' cannot be read for export.")
        context = QgsProject.instance().transformContext()
        if self.crs != self.source_crs:
            projector = QgsRasterProjector()
            projector.setCrs(self.source_crs, self.crs, context)
            pipe.insert(2, projector)
        writer = QgsRasterFileWriter(str(self.out_path))
        writer.setOutputFormat("GTiff")
        writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES"])
        block_feedback = feedback if isinstance(feedback, QgsRasterBlockFeedback) else QgsRasterBlockFeedback()
        if feedback is not None and feedback is not block_feedback:
            # direct: the flag is set from whichever thread cancels, no event loop needed
            feedback.canceled.connect(block_feedback.cancel, Qt.ConnectionType.DirectConnection)
            if feedback.isCanceled():
                block_feedback.cancel()
        error = writer.writeRaster(pipe, self.width, self.height, self.extent, self.crs, context, block_feedback)
        if error == QgsRasterFileWriter.WriterError.WriteCanceled or block_feedback.isCanceled():
            self.out_path.unlink(missing_ok=True)
            raise InputError(f"Exporting '{self.name}' was cancelled.")
        if error != QgsRasterFileWriter.WriterError.NoError:
            raise InputError(f"Exporting '{self.name}' to {self.out_path} failed (writer error {int(error)}).")
        return str(self.out_path)


def plan_export(layer: QgsRasterLayer, extent: QgsRectangle, resolution: float, out_path: Path,
                crs: QgsCoordinateReferenceSystem | None = None) -> RasterExport:
    """Check the area and resolution and fix the pixel grid of an export (main thread)."""
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
    provider = layer.dataProvider().clone() if layer.dataProvider() is not None else None
    if provider is None:
        raise InputError(f"The raster layer '{layer.name()}' cannot be read for export.")
    return RasterExport(layer.name(), provider, layer.crs(), crs, extent, width, height, Path(out_path))


def projected_crs_for(layer: QgsRasterLayer) -> QgsCoordinateReferenceSystem:
    """The layer's CRS when it is projected; Web Mercator otherwise (resolutions are metres)."""
    crs = layer.crs()
    if crs.isValid() and not crs.isGeographic():
        return crs
    return QgsCoordinateReferenceSystem("EPSG:3857")


def raster_source(layer: QgsRasterLayer, folder: Path, extent: QgsRectangle | None,
                  extent_crs: QgsCoordinateReferenceSystem | None,
                  resolution: float | None) -> tuple[str, RasterExport | None]:
    """The file the engine reads for a raster layer, and the export that writes it first
    (None when the layer is a local file already)."""
    path = local_raster_path(layer)
    if path is not None:
        return path, None
    crs = projected_crs_for(layer)
    if extent is None or extent.isEmpty():
        extent, extent_crs = layer.extent(), layer.crs()
    if extent_crs is not None and extent_crs != crs:
        extent = QgsCoordinateTransform(extent_crs, crs, QgsProject.instance()).transformBoundingBox(extent)
    if not resolution:
        resolution = layer.rasterUnitsPerPixelX() if crs == layer.crs() else 0.0
    out = Path(folder) / f"{_safe_name(layer.name())}_export.tif"
    export = plan_export(layer, extent, resolution, out, crs)
    return str(out), export


# -- vectors ------------------------------------------------------------------------------
@dataclass
class VectorExport:
    """The export of a vector layer to a GeoPackage: its features are copied into memory in
    the main thread (no file), so that `run` can write them from a worker thread."""

    name: str
    copy: QgsVectorLayer | None  # a memory layer of the features to write
    out_path: Path
    layer_name: str

    def run(self, feedback: QgsFeedback | None = None) -> str:
        """Write the file; a cancelled feedback stops it (InputError)."""
        if self.copy is None:
            raise InputError(f"The export of '{self.name}' has already run.")
        if feedback is not None and feedback.isCanceled():
            raise InputError(f"Exporting '{self.name}' was cancelled.")
        layer, self.copy = self.copy, None
        try:
            return write_gpkg_atomic(layer, self.out_path, self.layer_name, feedback)
        except InputError as exc:
            cancelled = feedback is not None and feedback.isCanceled()
            raise InputError(f"Exporting '{self.name}' was cancelled." if cancelled
                             else f"Exporting '{self.name}': {exc}") from exc


def vector_source(layer: QgsVectorLayer, folder: Path, only_selected: bool = False,
                  gpkg_only: bool = False) -> tuple[VectorSource, VectorExport | None]:
    """The OGR file the engine reads for a vector layer, and the export that writes it first
    (None when the layer is a whole local file already; with gpkg_only, a whole GeoPackage)."""
    if not only_selected and layer.providerType() == "ogr" and not layer.subsetString():
        parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
        path = parts.get("path")
        if path and os.path.isfile(path) and (not gpkg_only or path.lower().endswith(".gpkg")):
            return VectorSource(path, parts.get("layerName") or None), None
    suffix = "_selection" if only_selected else ""
    out = Path(folder) / f"{_safe_name(layer.name())}{suffix}.gpkg"
    request = QgsFeatureRequest()
    if only_selected:
        request.setFilterFids(layer.selectedFeatureIds())
    copy = layer.materialize(request)
    source = VectorSource(str(out), _safe_name(layer.name()))
    return source, VectorExport(layer.name(), copy, out, source.layer_name)


# -- results ------------------------------------------------------------------------------
def style_beside(path: str | Path) -> Path | None:
    qml = Path(path).with_suffix(".qml")
    return qml if qml.is_file() else None


def _styled(layer, path: Path, kind: str, add: bool, strict: bool):
    """Check an engine output layer, apply the QML beside it and add it to the project.
    `strict`: a style that fails to apply is an error (vector results are styled by class)."""
    if not layer.isValid():
        raise InputError(f"The engine wrote {path} but QGIS cannot open it as a {kind} layer.")
    qml = style_beside(path)
    if qml is not None:
        message, ok = layer.loadNamedStyle(str(qml))
        if strict and not ok:
            raise InputError(f"The style {qml} could not be applied: {message}")
    if add:
        QgsProject.instance().addMapLayer(layer)
    return layer


def gpkg_layers(path: str | Path) -> list[str]:
    """The layer (and table) names of a vector file; [] when it cannot be opened."""
    from osgeo import ogr
    try:
        source = ogr.Open(str(path))
    except RuntimeError:  # GDAL raises when its exceptions are on
        return []
    if source is None:
        return []
    return [source.GetLayerByIndex(i).GetName() for i in range(source.GetLayerCount())]


def _uri(path: Path, layer_name: str | None) -> str:
    return f"{path}|layername={layer_name}" if layer_name else str(path)


def load_vector_result(path: str | Path, name: str | None = None, add: bool = True) -> QgsVectorLayer:
    """Load an engine GeoPackage's tile layer with the QML style written beside it (the file
    also holds the class_areas table, and regions when they were asked for)."""
    path = Path(path)
    layer_name = TILES if TILES in gpkg_layers(path) else None
    layer = QgsVectorLayer(_uri(path, layer_name), name or path.stem, "ogr")
    return _styled(layer, path, "vector", add, strict=True)


def load_regions(path: str | Path, add: bool = True) -> QgsVectorLayer | None:
    """The merged regions of a classification (with the style the engine stored in the
    GeoPackage), or None when the run wrote none."""
    path = Path(path)
    if REGIONS not in gpkg_layers(path):
        return None
    layer = QgsVectorLayer(_uri(path, REGIONS), f"{path.stem} regions", "ogr")
    if not layer.isValid():
        raise InputError(f"The engine wrote regions into {path} but QGIS cannot open them.")
    if add:
        QgsProject.instance().addMapLayer(layer)
    return layer


@dataclass
class ClassArea:
    """One row of a classification's class_areas table."""

    class_id: int | None
    class_name: str
    tiles: int
    hectares: float
    share: float  # 0..1
    mean_confidence: float | None
    uncertain_tiles: int | None


def read_class_areas(path: str | Path) -> list[ClassArea]:
    """The per-class areas the engine wrote into the GeoPackage; [] for outputs written
    before the table existed."""
    path = Path(path)
    if AREAS not in gpkg_layers(path):
        return []
    table = QgsVectorLayer(_uri(path, AREAS), AREAS, "ogr")
    if not table.isValid():
        return []
    rows = []
    for feature in table.getFeatures():
        values = {name: null_to_none(feature[name]) for name in table.fields().names()}
        rows.append(ClassArea(_integer(values.get("class_id"), -1), str(values.get("class_name") or ""),
                              int(values.get("tiles") or 0), float(values.get("hectares") or 0.0),
                              float(values.get("share") or 0.0), _number(values.get("mean_confidence")),
                              _integer(values.get("uncertain_tiles"))))
    return sorted(rows, key=lambda row: (row.class_id is None, row.class_id or 0))


def null_to_none(value):
    """None for NULL (a QVariant NULL in QGIS 3, None in QGIS 4)."""
    return None if value is None or (hasattr(value, "isNull") and value.isNull()) else value


def _number(value) -> float | None:
    return None if value is None else float(value)


def _integer(value, default: int | None = None) -> int | None:
    return default if value is None else int(value)


def write_gpkg_atomic(layer: QgsVectorLayer, path: str | Path, layer_name: str,
                      feedback: QgsFeedback | None = None) -> str:
    """Write a layer as a new GeoPackage: to a hidden file beside `path`, moved into place
    only when complete (a failure or cancel leaves the old file, or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}.{os.getpid()}.partial.gpkg")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = layer_name
    options.feedback = feedback
    try:
        result = QgsVectorFileWriter.writeAsVectorFormatV3(layer, str(temp),
                                                           QgsProject.instance().transformContext(), options)
        if feedback is not None and feedback.isCanceled():
            raise InputError(f"Writing {path} was cancelled.")
        if result[0] != QgsVectorFileWriter.WriterError.NoError:
            raise InputError(f"Writing {path} failed: {result[1]}")
        os.replace(temp, path)
    finally:
        for leftover in (temp, *(temp.with_name(temp.name + s) for s in ("-journal", "-wal", "-shm"))):
            leftover.unlink(missing_ok=True)
    return str(path)
