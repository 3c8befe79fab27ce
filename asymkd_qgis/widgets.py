"""Small widgets of the dock: the engine state banner, a step's run/cancel/progress/results
panel, a layer-or-folder picker, a label layer + class field picker, a backbone picker, and a
guard that keeps the mouse wheel from changing unfocused fields."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from qgis.core import QgsMapLayerProxyModel
from qgis.gui import QgsFieldComboBox, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import QEvent, QObject, Qt, QUrl, pyqtSignal
from qgis.PyQt.QtGui import QPixmap
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QStackedWidget,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .choices import FALLBACK, EngineChoices
from .engine import BROKEN, MISSING, EngineState

ERROR_STYLE = "color: #b00020;"
# Combo boxes may shrink to this many characters: long layer names must not widen the dock.
COMBO_MIN_CHARS = 4


class WheelGuard(QObject):
    """Wheel events over a spin box or combo box that has no focus go to the form instead:
    scrolling the dock must never change a value (e.g. a loss weight to -1 = "default")."""

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.Wheel and isinstance(watched, QWidget) and not watched.hasFocus():
            event.ignore()  # ignored: Qt hands it on to the parents, i.e. the scroll area
            return True
        return False


_WHEEL_GUARD = WheelGuard()


def guard_wheel(widget: QWidget) -> QWidget:
    """Focus by click or tab only, and no wheel changes until then."""
    widget.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
    widget.installEventFilter(_WHEEL_GUARD)
    return widget


def narrow_combo(combo: QComboBox) -> QComboBox:
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(COMBO_MIN_CHARS)
    combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    return guard_wheel(combo)


def guard_form(root: QWidget) -> None:
    """guard_wheel every spin box and combo box under root; combo boxes may shrink."""
    for widget in root.findChildren(QAbstractSpinBox):
        guard_wheel(widget)
    for combo in root.findChildren(QComboBox):
        if combo.property("keep_width"):
            guard_wheel(combo)  # a few short choices: shown in full
        else:
            narrow_combo(combo)


def heading(html_text: str) -> QLabel:
    """A section heading inside a form (rich text of our own), wrapped to the dock's width."""
    label = QLabel(html_text)
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setWordWrap(True)
    return label


def wrap_labels(form: QFormLayout) -> None:
    """Let the form's row labels wrap, so a long label never sets the dock's minimum width."""
    for row in range(form.rowCount()):
        item = form.itemAt(row, QFormLayout.ItemRole.LabelRole)
        if item is not None and isinstance(item.widget(), QLabel):
            item.widget().setWordWrap(True)


def plain_label(text: str = "") -> QLabel:
    """A wrapping label that shows text as it is (never as rich text, where `<...>` vanishes)."""
    label = QLabel(text)
    label.setTextFormat(Qt.TextFormat.PlainText)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


class EngineBanner(QFrame):
    """The engine state at the top of the dock, with the one button that fixes it: missing
    (create), broken (repair), being created (progress, cancel) or working (no button)."""

    CREATE, REPAIR, CANCEL = "Create engine environment", "Repair engine environment", "Cancel"
    actionRequested = pyqtSignal(str)  # the button's text

    _STYLES = {MISSING: "background: #fff4ce; border: 1px solid #d9a400;",
               BROKEN: "background: #fde7e9; border: 1px solid #c50f1f;",
               "creating": "background: #eef4fb; border: 1px solid #6b9bd1;"}

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("asymkdEngineBanner")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 4, 6, 4)
        self.label = plain_label()
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.hide()
        self.button = QPushButton(self.CREATE)
        self.button.hide()
        self.button.clicked.connect(lambda _checked=False: self.actionRequested.emit(self.button.text()))
        layout.addWidget(self.label)
        layout.addWidget(self.progress)
        layout.addWidget(self.button)
        self.state: str = ""

    def _style(self, key: str) -> None:
        style = self._STYLES.get(key, "")
        self.setStyleSheet(f"QFrame#asymkdEngineBanner {{ {style} border-radius: 3px; }}" if style else "")

    def show_state(self, state: EngineState, failure: str = "") -> None:
        """`failure`: why the last creation did not succeed, shown above the state."""
        self.state = state.kind
        self.progress.hide()
        prefix = f"{failure}\n" if failure else ""
        if state.kind == MISSING:
            self.label.setText(prefix + "The AsymKD engine is not installed yet; the steps below need it. "
                               "Creating it downloads torch and the engine packages (offline: Plugins > "
                               "AsymKD > Create engine environment from a folder...).")
            self.button.setText(self.CREATE)
        elif state.kind == BROKEN:
            self.label.setText(prefix + state.message)
            self.button.setText(self.REPAIR)
        else:
            self.label.setText(prefix + f"Engine ready: asymkd {state.version}")
            self.label.setToolTip(state.message)
        self.button.setVisible(state.kind in (MISSING, BROKEN))
        self._style(state.kind)

    def show_creating(self, percent: float, text: str) -> None:
        self.state = "creating"
        self.label.setText(f"Creating the engine environment: {text}")
        self.progress.setValue(int(round(percent)))
        self.progress.show()
        self.button.setText(self.CANCEL)
        self.button.show()
        self._style("creating")


class StepPanel(QWidget):
    """Run and Cancel buttons, a progress bar, a status line and the step's results."""

    def __init__(self, run_text: str = "Run", parent: QWidget | None = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 4, 0, 0)
        buttons = QHBoxLayout()
        self.run_button = QPushButton(run_text)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        layout.addWidget(self.progress)
        self.status = plain_label()
        layout.addWidget(self.status)
        self.results = QLabel("")
        self.results.setWordWrap(True)
        self.results.setTextFormat(Qt.TextFormat.RichText)
        self.results.setOpenExternalLinks(True)
        self.results.setTextInteractionFlags(Qt.TextInteractionFlag.TextBrowserInteraction)
        layout.addWidget(self.results)
        self.areas = AreaTable()  # a classification's areas per class
        self.areas.hide()
        layout.addWidget(self.areas)
        self.areas_note = plain_label()
        self.areas_note.hide()
        layout.addWidget(self.areas_note)
        self.image = QLabel()
        self.image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.image.hide()
        layout.addWidget(self.image)

    def set_running(self, running: bool, text: str = "") -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self.progress.setValue(0)
            self.results.setText("")
            self.show_areas([])
            self.image.hide()
        self.set_status(text)

    def set_progress(self, percent: float, text: str) -> None:
        self.progress.setValue(int(round(percent)))
        self.set_status(text)

    def set_status(self, text: str, error: bool = False) -> None:
        """The status line; an error in red until the next status replaces it."""
        self.status.setText(text)
        self.status.setStyleSheet(ERROR_STYLE if error else "")

    @property
    def has_error(self) -> bool:
        return bool(self.status.styleSheet())

    def show_results(self, metrics: dict[str, Any] | None = None, links: dict[str, str] | None = None,
                     image: str | None = None, note: str = "") -> None:
        parts = [f"<p>{html.escape(note)}</p>"] if note else []
        rows = _metric_rows(metrics or {})
        if rows:
            parts.append('<table cellspacing="0" cellpadding="1">'
                         + "".join(f"<tr><td>{html.escape(k)}&nbsp;&nbsp;</td><td><b>{html.escape(v)}</b></td></tr>"
                                   for k, v in rows) + "</table>")
        for label, path in (links or {}).items():
            url = QUrl.fromLocalFile(str(path)).toString()
            parts.append(f'<p><a href="{html.escape(url)}">{html.escape(label)}</a></p>')
        self.results.setText("".join(parts))
        if image and Path(image).is_file():
            pixmap = QPixmap(str(image))
            if not pixmap.isNull():
                self.image.setPixmap(pixmap.scaledToWidth(min(260, pixmap.width()),
                                                          Qt.TransformationMode.SmoothTransformation))
                self.image.setToolTip(str(image))
                self.image.show()
                return
        self.image.hide()


    def show_areas(self, rows: list, note: str = "") -> None:
        """The area table of a classification (layers.ClassArea rows) and a note below it;
        each hidden when empty."""
        self.areas.set_rows(rows)
        self.areas.setVisible(bool(rows))
        self.areas_note.setText(note)
        self.areas_note.setVisible(bool(note))


class AreaTable(QTableWidget):
    """Class, tiles, hectares, share and mean confidence of a classification, in a compact
    table that fits the dock. When a class name does not fit beside the numbers (a narrow
    dock), each class takes two lines: its name across the table, then its numbers."""

    HEADERS = ("Class", "Tiles", "ha", "%", "Conf")
    PADDING = 10  # pixels around a cell's text

    def __init__(self, parent: QWidget | None = None):
        super().__init__(0, len(self.HEADERS), parent)
        self.rows: list = []
        self.stacked = False
        self.setHorizontalHeaderLabels(list(self.HEADERS))
        tips = ("", "tiles of the class", "hectares", "share of the classified area, %", "mean confidence")
        for column, tip in enumerate(tips):
            self.horizontalHeaderItem(column).setToolTip(tip)
        self.verticalHeader().hide()
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.setWordWrap(False)
        self.setShowGrid(False)
        header = self.horizontalHeader()
        header.setMinimumSectionSize(24)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column in range(1, len(self.HEADERS)):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.Fixed)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)

    @staticmethod
    def texts(row) -> tuple[str, ...]:
        """One class's cells: name, tiles, hectares, share %, mean confidence."""
        confidence = "" if row.mean_confidence is None else f"{row.mean_confidence:.2f}"
        return (row.class_name, f"{row.tiles:,}", _hectares(row.hectares), f"{100 * row.share:.1f}", confidence)

    def set_rows(self, rows: list) -> None:
        self.rows = list(rows)
        self._fill(self._needs_stacking())

    def _needs_stacking(self) -> bool:
        widths = self._number_widths()
        names = [self.fontMetrics().horizontalAdvance(row.class_name) + self.PADDING for row in self.rows]
        return bool(names) and max(names) > self.viewport().width() - sum(widths)

    def _number_widths(self) -> list[int]:
        """Number columns as wide as their widest text; the class column takes the rest."""
        metrics = self.fontMetrics()
        cells = [self.texts(row) for row in self.rows]
        return [max(metrics.horizontalAdvance(t) for t in [self.HEADERS[c]] + [cell[c] for cell in cells])
                + self.PADDING for c in range(1, len(self.HEADERS))]

    def _fill(self, stacked: bool) -> None:
        self.stacked = stacked
        self.clearSpans()
        self.setRowCount(len(self.rows) * (2 if stacked else 1))
        right = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
        for index, row in enumerate(self.rows):
            texts = self.texts(row)
            r = 2 * index if stacked else index
            name = QTableWidgetItem(texts[0])
            name.setToolTip(texts[0])
            self.setItem(r, 0, name)
            if stacked:
                self.setSpan(r, 0, 1, len(self.HEADERS))
                r += 1
                self.setItem(r, 0, QTableWidgetItem(""))
            for c, text in enumerate(texts[1:], start=1):
                item = QTableWidgetItem(text)
                item.setTextAlignment(right)
                self.setItem(r, c, item)
        for column, width in enumerate(self._number_widths(), start=1):
            self.setColumnWidth(column, width)
        self.resizeRowsToContents()
        height = self.horizontalHeader().height() + sum(self.rowHeight(r) for r in range(self.rowCount()))
        self.setFixedHeight(height + 2 * self.frameWidth())

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        if self.rows and self._needs_stacking() != self.stacked:
            self._fill(not self.stacked)

    def cell_texts(self) -> list[list[str]]:
        """The shown cells, one list per class (what the tests read)."""
        step = 2 if self.stacked else 1
        return [[self.item(r, 0).text()] + [self.item(r + step - 1, c).text() for c in range(1, self.columnCount())]
                for r in range(0, self.rowCount(), step)]


def _hectares(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _metric_rows(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Scalar metrics (nested dicts flattened one level) as (name, formatted value)."""
    rows: list[tuple[str, str]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            rows.append((name, f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"))
        elif isinstance(value, (int, str)):
            rows.append((name, str(value)))
        elif isinstance(value, dict) and not prefix:
            rows.extend(_metric_rows(value, prefix=f"{key} "))
    return rows[:24]


class SourcePicker(QWidget):
    """A raster layer or a folder dataset (optionally: nothing)."""

    LAYER, FOLDER, NONE = "Raster layer", "Folder", "None"

    def __init__(self, optional: bool = False, parent: QWidget | None = None):
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.mode = QComboBox()
        modes = [self.LAYER, self.FOLDER] + ([self.NONE] if optional else [])
        self.mode.addItems(modes)
        self.mode.setProperty("keep_width", True)
        self.mode.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.stack = QStackedWidget()
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.layer_combo.setAllowEmptyLayer(True)
        self.layer_combo.setLayer(None)
        self.folder_widget = QgsFileWidget()
        self.folder_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.stack.addWidget(self.layer_combo)
        self.stack.addWidget(self.folder_widget)
        self.stack.addWidget(QLabel("not used"))
        layout.addWidget(self.mode)
        layout.addWidget(self.stack, 1)
        self.mode.currentIndexChanged.connect(self.stack.setCurrentIndex)
        if optional:
            self.mode.setCurrentText(self.NONE)

    def kind(self) -> str:
        return self.mode.currentText()

    def layer(self):
        return self.layer_combo.currentLayer() if self.kind() == self.LAYER else None

    def folder(self) -> str:
        return self.folder_widget.filePath().strip() if self.kind() == self.FOLDER else ""

    def set_layer(self, layer) -> None:
        self.mode.setCurrentText(self.LAYER)
        self.layer_combo.setLayer(layer)

    def set_folder(self, folder: str) -> None:
        self.mode.setCurrentText(self.FOLDER)
        self.folder_widget.setFilePath(str(folder))


class LabelPicker(QWidget):
    """A vector layer of labeled polygons or points and its class field."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(QgsMapLayerProxyModel.Filter.PolygonLayer | QgsMapLayerProxyModel.Filter.PointLayer)
        self.layer_combo.setAllowEmptyLayer(True)
        self.layer_combo.setLayer(None)
        self.field_combo = QgsFieldComboBox()
        self.field_combo.setAllowEmptyFieldName(True)
        self.layer_combo.layerChanged.connect(self._layer_changed)
        layout.addWidget(self.layer_combo, 2)
        layout.addWidget(self.field_combo, 1)

    def _layer_changed(self, layer) -> None:
        self.field_combo.setLayer(layer)
        if layer is not None and not self.field_combo.currentField():
            for name in ("class", "label", "Class", "CLASS", "category"):
                if layer.fields().indexOf(name) >= 0:
                    self.field_combo.setField(name)
                    break

    def layer(self):
        return self.layer_combo.currentLayer()

    def field(self) -> str:
        return self.field_combo.currentField()

    def set(self, layer, field: str = "") -> None:
        self.layer_combo.setLayer(layer)
        self.field_combo.setLayer(layer)
        if field:
            self.field_combo.setField(field)


class ModelPicker(QWidget):
    """A backbone (any timm name may be typed), whether it starts from ImageNet weights, and
    where its weights come from, as the engine's `asymkd choices` names them."""

    def __init__(self, section: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.section = section  # "teacher" or "distill": the engine's config section
        self.choices: EngineChoices = FALLBACK
        self.weights_file = False  # a weights file is given (More settings)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        self.backbone = QComboBox()
        self.backbone.setEditable(True)
        self.backbone.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.pretrained = QCheckBox("Pretrained")  # short: the dock is narrow
        self.pretrained.setToolTip("Start from ImageNet weights (bundled, or downloaded once from the timm hub); "
                                   "unchecked: random weights")
        self.pretrained.setChecked(True)
        self.source = plain_label()
        for widget in (self.backbone, self.pretrained, self.source):
            box.addWidget(widget)
        self.backbone.currentTextChanged.connect(lambda *_: self._show_source())
        self.pretrained.toggled.connect(lambda *_: self._show_source())
        self.set_choices(FALLBACK)

    def name(self) -> str:
        """The backbone typed or picked; empty = the engine's default."""
        return self.backbone.currentText().strip()

    def set_choices(self, choices: EngineChoices) -> None:
        current = self.name()
        self.choices = choices
        self.backbone.blockSignals(True)
        self.backbone.clear()
        for name, spec in choices.backbones.items():
            self.backbone.addItem(name)
            if spec.get("about"):
                self.backbone.setItemData(self.backbone.count() - 1, spec["about"], Qt.ItemDataRole.ToolTipRole)
        self.backbone.setCurrentText(current)
        self.backbone.blockSignals(False)
        default = choices.default(self.section, "backbone")
        self.backbone.lineEdit().setPlaceholderText(f"default: {default}" if default else "the engine's default")
        tip = choices.note or "any timm model name works too (weights from the hub)"
        self.backbone.setToolTip(f"Named backbones of the engine; {tip}")
        self._show_source()

    def set_weights_file(self, given: bool) -> None:
        self.weights_file = given
        self._show_source()

    def _show_source(self) -> None:
        name = self.name() or self.choices.default(self.section, "backbone", "")
        text = self.choices.describe(name, self.pretrained.isChecked(), self.weights_file) if name else ""
        if self.choices.fallback:
            text = "built-in list of names (the engine could not be asked)" + (f"; {text}" if text else "")
        self.source.setText(f"Weights: {text}" if text else "")
