"""Review of a classification's uncertain tiles, and their export as labels for the next
training round.

The queue lists the tiles the engine marked `uncertain` (or, for outputs without that field
or with no tile marked, the tiles below a confidence threshold), least confident first. Selecting one zooms the map
to it; Accept keeps its class and Set class gives another one. Both write `reviewed_class`,
`reviewed_by` and `reviewed_at` into the tile layer (its edit buffer, then committed).
"Export reviewed tiles as labels" writes the reviewed tiles as polygons with a `class` field of
class names to a new GeoPackage (layer `labels`): the layer and field the Data step and the
engine's `chips` command pick by default.
"""

from __future__ import annotations

import datetime as _dt
import getpass
from dataclasses import dataclass
from pathlib import Path

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureRequest,
    QgsField,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsVectorDataProvider,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDockWidget,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from . import layers
from .errors import InputError
from .widgets import ERROR_STYLE, guard_form, plain_label, wrap_labels

# What makes a layer an AsymKD tile layer, and the fields a review writes.
TILE_FIELDS = ("class_id", "class_name", "confidence")
REVIEWED_CLASS, REVIEWED_BY, REVIEWED_AT = "reviewed_class", "reviewed_by", "reviewed_at"
UNCERTAIN = "uncertain"
# The label layer and class field that the Data step and `asymkd chips` take by default.
LABEL_LAYER, LABEL_FIELD = "labels", "class"
DEFAULT_THRESHOLD = 0.5
FID_ROLE = Qt.ItemDataRole.UserRole


def is_tile_layer(layer) -> bool:
    """A polygon layer with the class and confidence fields the engine writes."""
    if not isinstance(layer, QgsVectorLayer) or not layer.isValid():
        return False
    if layer.geometryType() != QgsWkbTypes.GeometryType.PolygonGeometry:
        return False
    names = set(layer.fields().names())
    return all(name in names for name in TILE_FIELDS)


def _null(value) -> bool:
    return layers.null_to_none(value) is None


@dataclass
class QueueItem:
    """One tile of the review queue."""

    fid: int
    confidence: float
    class_id: int
    class_name: str
    second_name: str = ""
    reviewed_class: int | None = None

    def text(self, classes: dict[int, str]) -> str:
        """'0.35 Forest, 2nd River' and, once reviewed, '\u2713 Urban' on a second line."""
        second = f", 2nd {self.second_name}" if self.second_name else ""
        shown = f"{self.confidence:.2f} {self.class_name}{second}"
        if self.reviewed_class is not None:
            shown += f"\n    \u2713 {classes.get(self.reviewed_class, self.reviewed_class)}"
        return shown


def _queue_item(feature: QgsFeature, names: set[str]) -> QueueItem:
    def get(name: str):
        return layers.null_to_none(feature[name]) if name in names else None
    reviewed = get(REVIEWED_CLASS)
    return QueueItem(int(feature.id()), float(get("confidence") or 0.0), int(get("class_id") or 0),
                     str(get("class_name") or ""), str(get("second_name") or ""),
                     None if reviewed is None else int(reviewed))


def has_marked(layer: QgsVectorLayer) -> bool:
    """Whether the engine marked any tile uncertain (it writes the field even when it was not
    asked to mark: then every tile is 0)."""
    if UNCERTAIN not in layer.fields().names():
        return False
    request = QgsFeatureRequest().setFilterExpression(f'"{UNCERTAIN}" = 1').setLimit(1)
    request.setFlags(QgsFeatureRequest.Flag.NoGeometry)
    return any(True for _ in layer.getFeatures(request))


def uncertain_tiles(layer: QgsVectorLayer, threshold: float = DEFAULT_THRESHOLD,
                    marked: bool | None = None) -> list[QueueItem]:
    """The tiles to review, least confident first: those marked uncertain=1 (`marked`; None:
    when the engine marked any), else those with a confidence below `threshold`."""
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"The confidence threshold {threshold} is outside 0-1: choose a value from 0 to 1.")
    names = set(layer.fields().names())
    marked = has_marked(layer) if marked is None else marked and UNCERTAIN in names
    expression = f'"{UNCERTAIN}" = 1' if marked else f'"confidence" < {float(threshold)!r}'
    request = QgsFeatureRequest().setFilterExpression(expression)
    request.setFlags(QgsFeatureRequest.Flag.NoGeometry)
    items = [_queue_item(feature, names) for feature in layer.getFeatures(request)]
    return sorted(items, key=lambda item: (item.confidence, item.fid))


def layer_classes(layer: QgsVectorLayer) -> dict[int, str]:
    """Class id -> name: the classes of the layer's tiles (best and second) and of the
    class_areas table beside them in the GeoPackage."""
    classes: dict[int, str] = {}
    path = _gpkg_path(layer)
    if path is not None:
        for row in layers.read_class_areas(path):
            if row.class_id is not None and row.class_name:
                classes[row.class_id] = row.class_name
    names = set(layer.fields().names())
    pairs = [("class_id", "class_name")] + ([("second_id", "second_name")] if "second_name" in names else [])
    request = QgsFeatureRequest().setFlags(QgsFeatureRequest.Flag.NoGeometry)
    request.setSubsetOfAttributes([name for pair in pairs for name in pair], layer.fields())
    for feature in layer.getFeatures(request):
        for id_field, name_field in pairs:
            if not _null(feature[id_field]) and not _null(feature[name_field]):
                classes.setdefault(int(feature[id_field]), str(feature[name_field]))
    return dict(sorted(classes.items()))


def _gpkg_path(layer: QgsVectorLayer) -> Path | None:
    if layer.providerType() != "ogr":
        return None
    path = Path(layer.source().split("|")[0])
    return path if path.is_file() else None


# -- writing reviews -------------------------------------------------------------------------
def reviewer() -> str:
    """Who reviews: the QGIS user's login name, else the system's."""
    name = QgsApplication.userLoginName() if hasattr(QgsApplication, "userLoginName") else ""
    return name or getpass.getuser()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _field(name: str, integer: bool) -> QgsField:
    """A QgsField of QGIS 3 (QVariant types) or of QGIS >= 3.38 and 4 (QMetaType types)."""
    if Qgis.QGIS_VERSION_INT >= 33800:
        from qgis.PyQt.QtCore import QMetaType
        return QgsField(name, QMetaType.Type.Int if integer else QMetaType.Type.QString)
    from qgis.PyQt.QtCore import QVariant
    return QgsField(name, QVariant.Type.Int if integer else QVariant.Type.String)


def ensure_review_fields(layer: QgsVectorLayer) -> None:
    """Add reviewed_class/by/at to a layer written before the engine wrote them."""
    names = set(layer.fields().names())
    missing = [_field(name, name == REVIEWED_CLASS) for name in (REVIEWED_CLASS, REVIEWED_BY, REVIEWED_AT)
               if name not in names]
    if not missing:
        return
    provider = layer.dataProvider()
    if not provider.capabilities() & QgsVectorDataProvider.Capability.AddAttributes:
        raise InputError(f"The review fields cannot be added to '{layer.name()}': save it as a GeoPackage first.")
    if not provider.addAttributes(missing):
        raise InputError(f"The review fields could not be added to '{layer.name()}': "
                         f"{'; '.join(provider.errors()) or 'is the file writable?'}")
    layer.updateFields()


def set_reviewed(layer: QgsVectorLayer, fids: list[int], class_id: int | None = None,
                 who: str | None = None, when: str | None = None) -> bool:
    """Write the review of tiles: `class_id`, or each tile's own class when None (accept).
    Returns True when committed; False when the layer was already being edited (the review
    is then in its edit buffer, saved with the other edits)."""
    ensure_review_fields(layer)
    fields = layer.fields()
    index = {name: fields.indexOf(name) for name in ("class_id", REVIEWED_CLASS, REVIEWED_BY, REVIEWED_AT)}
    who, when = who or reviewer(), when or utc_now()
    own_session = not layer.isEditable()
    if own_session and not layer.startEditing():
        raise InputError(f"'{layer.name()}' cannot be edited: is the GeoPackage read-only?")
    for fid in fids:
        chosen = class_id if class_id is not None else layer.getFeature(fid)[index["class_id"]]
        layer.changeAttributeValues(fid, {index[REVIEWED_CLASS]: int(chosen), index[REVIEWED_BY]: who,
                                          index[REVIEWED_AT]: when})
    if not own_session:
        return False
    if not layer.commitChanges():
        errors = "; ".join(layer.commitErrors())
        layer.rollBack()
        raise InputError(f"The review could not be saved to '{layer.name()}': {errors}")
    return True


# -- exporting labels ------------------------------------------------------------------------
def _label_layer(layer: QgsVectorLayer) -> QgsVectorLayer:
    geometry = QgsWkbTypes.displayString(layer.wkbType()) or "Polygon"
    uri = (f"{geometry}?crs={layer.crs().authid() or 'EPSG:4326'}&field={LABEL_FIELD}:string"
           "&field=class_id:integer&field=tile_key:string&field=confidence:double"
           f"&field={REVIEWED_BY}:string&field={REVIEWED_AT}:string")
    memory = QgsVectorLayer(uri, LABEL_LAYER, "memory")
    if not layer.crs().authid():
        memory.setCrs(layer.crs())
    return memory


def reviewed_features(layer: QgsVectorLayer, classes: dict[int, str]) -> list[QgsFeature]:
    """The reviewed tiles as label features (class name, id, tile key, confidence, who, when)."""
    if REVIEWED_CLASS not in layer.fields().names():
        return []
    names = set(layer.fields().names())
    memory_fields = _label_layer(layer).fields()
    out = []
    for tile in layer.getFeatures(QgsFeatureRequest().setFilterExpression(f'"{REVIEWED_CLASS}" IS NOT NULL')):
        class_id = int(tile[REVIEWED_CLASS])
        if class_id not in classes:
            raise InputError(f"Tile {tile.id()} of '{layer.name()}' was reviewed as class id {class_id}, "
                             f"which is not one of its classes ({', '.join(classes.values())}): set its class "
                             "again. Nothing was written.")
        feature = QgsFeature(memory_fields)
        feature.setGeometry(tile.geometry())
        feature.setAttributes([classes[class_id], class_id,
                               str(tile["tile_key"]) if "tile_key" in names else None,
                               float(tile["confidence"]), _text(tile[REVIEWED_BY]), _text(tile[REVIEWED_AT])])
        out.append(feature)
    return out


def _text(value) -> str | None:
    value = layers.null_to_none(value)
    return None if value is None else str(value)


def export_labels(layer: QgsVectorLayer, path: str | Path, classes: dict[int, str] | None = None) -> int:
    """Write the reviewed tiles of `layer` as labels to a new GeoPackage (atomically);
    returns how many. No reviewed tile: InputError, and nothing is written."""
    classes = classes if classes is not None else layer_classes(layer)
    features = reviewed_features(layer, classes)
    if not features:
        raise InputError(f"No tile of '{layer.name()}' has been reviewed yet: accept or set the class of "
                         "some tiles first. Nothing was written.")
    memory = _label_layer(layer)
    memory.dataProvider().addFeatures(features)
    memory.updateExtents()
    layers.write_gpkg_atomic(memory, path, LABEL_LAYER)
    return len(features)


def default_export_path(layer: QgsVectorLayer) -> str:
    path = _gpkg_path(layer)
    folder = path.parent if path is not None else Path.home()
    stem = path.stem if path is not None else layers._safe_name(layer.name())
    return str(folder / f"{stem}_reviewed_labels.gpkg")


# -- the panel -------------------------------------------------------------------------------
class ReviewPanel(QDockWidget):
    """The review queue of one tile layer: the list, Accept, Set class and the export."""

    MARKED, BELOW = "Marked uncertain", "Below a threshold"

    def __init__(self, canvas=None, parent: QWidget | None = None):
        super().__init__("AsymKD review", parent)
        self.setObjectName("AsymKDReviewDock")
        self.canvas = canvas
        self.items: list[QueueItem] = []
        self.classes: dict[int, str] = {}
        self.last_export: str | None = None
        self._build()
        project = QgsProject.instance()
        project.layersAdded.connect(self._update_choosable)
        project.layersRemoved.connect(self._update_choosable)
        self._update_choosable()

    def _build(self) -> None:
        body = QWidget()
        box = QVBoxLayout(body)
        form = QFormLayout()
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(QgsMapLayerProxyModel.Filter.PolygonLayer)
        self.layer_combo.setAllowEmptyLayer(True)
        self.layer_combo.setLayer(None)
        self.layer_combo.layerChanged.connect(self._layer_chosen)
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setDecimals(2)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(DEFAULT_THRESHOLD)
        self.threshold.setToolTip("Review the tiles whose confidence is below this value")
        self.threshold.valueChanged.connect(lambda *_: self.refresh())
        self.rule = QComboBox()
        self.rule.addItems([self.MARKED, self.BELOW])
        self.rule.setToolTip("Which tiles to review: those the engine marked uncertain (Classify's "
                             "'Uncertainty'), or those below a confidence you choose here")
        self.rule.currentIndexChanged.connect(lambda *_: self.refresh())
        form.addRow("Tile layer", self.layer_combo)
        form.addRow("Review", self.rule)
        form.addRow("Confidence threshold", self.threshold)
        wrap_labels(form)
        box.addLayout(form)
        self.summary = plain_label()
        box.addWidget(self.summary)
        self.queue = QListWidget()
        # Long class names wrap instead of widening the panel past the dock's width.
        self.queue.setWordWrap(True)
        self.queue.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.queue.setResizeMode(QListView.ResizeMode.Adjust)
        self.queue.currentItemChanged.connect(lambda current, _previous: self.go_to(current))
        box.addWidget(self.queue, 1)
        self.accept_button = QPushButton("Accept")
        self.accept_button.setToolTip("Keep the tile's class as reviewed")
        self.accept_button.clicked.connect(lambda _=False: self.accept_current())
        box.addWidget(self.accept_button)
        row = QHBoxLayout()
        self.class_combo = QComboBox()
        self.set_button = QPushButton("Set class")
        self.set_button.clicked.connect(lambda _=False: self.set_current(self.class_combo.currentData()))
        row.addWidget(self.class_combo, 1)
        row.addWidget(self.set_button)
        box.addLayout(row)
        self.export_button = QPushButton("Export reviewed tiles as labels...")
        self.export_button.clicked.connect(lambda _=False: self._export_clicked())
        box.addWidget(self.export_button)
        self.status = plain_label()
        box.addWidget(self.status)
        guard_form(body)
        self.setWidget(body)
        self._enable()

    def release(self) -> None:
        """Stop following the project and delete the panel (plugin unload)."""
        project = QgsProject.instance()
        project.layersAdded.disconnect(self._update_choosable)
        project.layersRemoved.disconnect(self._update_choosable)
        self.setParent(None)
        self.deleteLater()

    # -- state --------------------------------------------------------------------------------
    def layer(self) -> QgsVectorLayer | None:
        layer = self.layer_combo.currentLayer()
        return layer if is_tile_layer(layer) else None

    def set_layer(self, layer: QgsVectorLayer) -> None:
        self._update_choosable()
        self.layer_combo.blockSignals(True)  # chosen once, below, not again by the combo's signal
        self.layer_combo.setLayer(layer)
        self.layer_combo.blockSignals(False)
        self._layer_chosen(layer)

    def _layer_chosen(self, layer) -> None:
        """Review the tiles the engine marked, or when it marked none, those below the
        confidence threshold. The layer's classes are read here, once per layer."""
        self.rule.blockSignals(True)
        self.rule.setCurrentText(self.MARKED if is_tile_layer(layer) and has_marked(layer) else self.BELOW)
        self.rule.blockSignals(False)
        chosen = self.layer()
        self.classes = layer_classes(chosen) if chosen is not None else {}
        self.class_combo.clear()
        for class_id, name in self.classes.items():
            self.class_combo.addItem(name, class_id)
        self.refresh()

    def _update_choosable(self, *_args) -> None:
        """Only AsymKD tile layers can be chosen."""
        others = [layer for layer in QgsProject.instance().mapLayers().values()
                  if isinstance(layer, QgsVectorLayer) and not is_tile_layer(layer)]
        self.layer_combo.setExceptedLayerList(others)

    def set_status(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet(ERROR_STYLE if error else "")

    def _enable(self) -> None:
        layer = self.layer()
        has_item = self.queue.currentItem() is not None
        for widget in (self.accept_button, self.set_button, self.class_combo):
            widget.setEnabled(has_item)
        self.export_button.setEnabled(layer is not None)
        marked_field = layer is not None and UNCERTAIN in layer.fields().names()
        self.rule.setEnabled(marked_field)
        self.threshold.setEnabled(layer is not None and self.rule.currentText() == self.BELOW)

    def refresh(self) -> None:
        """Read the queue of the chosen layer again (its classes do not change with the rule
        or the threshold)."""
        layer = self.layer()
        self.queue.blockSignals(True)
        self.queue.clear()
        self.queue.blockSignals(False)
        self.items = []
        if layer is None:
            self.summary.setText("Choose an AsymKD tile layer (the result of Classify).")
            self._enable()
            return
        self.items = uncertain_tiles(layer, self.threshold.value(), self.rule.currentText() == self.MARKED)
        for item in self.items:
            entry = QListWidgetItem(item.text(self.classes))
            entry.setData(FID_ROLE, item.fid)
            self.queue.addItem(entry)
        self._show_summary(layer)
        self._enable()

    def _show_summary(self, layer: QgsVectorLayer) -> None:
        reviewed = sum(item.reviewed_class is not None for item in self.items)
        rule = ("marked uncertain" if self.rule.currentText() == self.MARKED
                else f"with confidence below {self.threshold.value():.2f}")
        self.summary.setText(f"{len(self.items)} tiles {rule}, {reviewed} reviewed; least confident first.")

    # -- actions ------------------------------------------------------------------------------
    def current_fid(self) -> int | None:
        entry = self.queue.currentItem()
        return None if entry is None else int(entry.data(FID_ROLE))

    def go_to(self, entry: QListWidgetItem | None = None) -> None:
        """Select the tile (default: the current one) and centre the map on it, zoomed to show
        its neighbours."""
        entry = entry if entry is not None else self.queue.currentItem()
        self._enable()
        layer = self.layer()
        if entry is None or layer is None:
            return
        fid = int(entry.data(FID_ROLE))
        layer.selectByIds([fid])
        feature = layer.getFeature(fid)
        if self.canvas is None or not feature.hasGeometry():
            return
        extent = feature.geometry().boundingBox()
        target = self.canvas.mapSettings().destinationCrs()
        if target.isValid() and target != layer.crs():
            extent = QgsCoordinateTransform(layer.crs(), target, QgsProject.instance()).transformBoundingBox(extent)
        extent.scale(5.0)
        self.canvas.setExtent(extent)
        self.canvas.refresh()

    def accept_current(self) -> None:
        self._review(None)

    def set_current(self, class_id) -> None:
        if class_id is None:
            self.set_status("Choose a class first.", error=True)
            return
        self._review(int(class_id))

    def _review(self, class_id: int | None) -> None:
        layer, fid = self.layer(), self.current_fid()
        if layer is None or fid is None:
            self.set_status("Choose a tile in the list first.", error=True)
            return
        row = self.queue.currentRow()
        try:
            committed = set_reviewed(layer, [fid], class_id)
        except InputError as exc:
            self.set_status(str(exc), error=True)
            return
        item = self.items[row]
        item.reviewed_class = item.class_id if class_id is None else class_id
        self.queue.item(row).setText(item.text(self.classes))
        self._show_summary(layer)
        saved = "saved" if committed else "in the layer's edits (save them to keep it)"
        self.set_status(f"Tile {fid}: {self.classes.get(item.reviewed_class, item.reviewed_class)}, {saved}.")
        if row + 1 < self.queue.count():
            self.queue.setCurrentRow(row + 1)  # on to the next tile

    def export_to(self, path: str | Path) -> int:
        """Write the reviewed tiles as labels to `path`; the status says what happened."""
        layer = self.layer()
        if layer is None:
            self.set_status("Choose an AsymKD tile layer first.", error=True)
            return 0
        try:
            count = export_labels(layer, path, self.classes or None)
        except InputError as exc:
            self.set_status(str(exc), error=True)
            return 0
        self.last_export = str(path)
        values = layer.uniqueValues(layer.fields().indexOf(REVIEWED_CLASS))
        classes = {value for value in values if not _null(value)}
        one = (" They hold one class only: the Data step needs two or more, so review tiles of other "
               "classes too.") if len(classes) == 1 else ""
        self.set_status(f"{count} reviewed tiles written to {path} (layer '{LABEL_LAYER}', class field "
                        f"'{LABEL_FIELD}'): use them as labels in the Data step.{one}")
        return count

    def _export_clicked(self) -> None:
        layer = self.layer()
        if layer is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export reviewed tiles as labels", default_export_path(layer),
                                              "GeoPackage (*.gpkg)")
        if not path:
            return
        path = path if path.lower().endswith(".gpkg") else f"{path}.gpkg"
        if self.export_to(path):
            # in the project, ready to be picked as the Data step's labels
            labels = QgsVectorLayer(path, f"{layer.name()} reviewed labels", "ogr")
            if labels.isValid():
                QgsProject.instance().addMapLayer(labels)
