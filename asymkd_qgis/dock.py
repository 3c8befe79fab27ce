"""The AsymKD dock: the whole loop in five steps (Data, Teacher, Matcher and pairing,
Distill, Classify), each with Run, Cancel, a progress bar and its results.

Each Run turns the step's widgets into the options and inputs of its spec (steps.py, which the
Processing algorithms share), and starts one background EngineJob: exports first, in the
job's worker thread, then the engine. The classified layer is loaded with its style.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from qgis.core import QgsMapLayerProxyModel, QgsProject, QgsRasterLayer, QgsRectangle
from qgis.gui import QgsCollapsibleGroupBox, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import QSize, Qt, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDockWidget,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from . import choices, layers, results, review, settings, steps
from .engine import WORKING, Engine, EngineState, EngineUnavailable
from .layout import RunLayout
from .modelinfo import ModelInfoError, read_model_info
from .notify import Notifier
from .review import ReviewPanel
from .steps import Prepared
from .tasks import EngineJob
from .validation import InputError, check_ms_raster, check_rgb_raster, require_folder, require_layer
from .widgets import (
    EngineBanner,
    LabelPicker,
    ModelPicker,
    Persist,
    SourcePicker,
    StepPanel,
    guard_form,
    heading,
    wrap_labels,
)

STEPS = tuple(steps.SPECS)  # data, teacher, matcher, distill, classify
STEP_TITLES = {step: f"{number}. {steps.SPECS[step].title}" for number, step in enumerate(STEPS, 1)}
# Short enough for a narrow dock: "Run matcher", not "Run matcher and pairing".
RUN_LABELS = {"data": "Prepare data", "teacher": "Run teacher", "matcher": "Run matcher",
              "distill": "Run distill", "classify": "Run classify"}
AREAS = ("Whole layer", "Canvas extent", "Selected polygons")
GRID_LABELS = ("Pixels (tile and stride)", "XYZ tiles (zoom level)")
# The width QGIS gives a new dock beside the map: the whole form fits it without a scrollbar.
DOCK_WIDTH = 300


def _spin(low: int, high: int, value: int, suffix: str = "") -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(low, high)
    spin.setValue(value)
    if suffix:
        spin.setSuffix(suffix)
    return spin


def _dspin(low: float, high: float, value: float, decimals: int = 2, step: float = 0.1) -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setRange(low, high)
    spin.setDecimals(decimals)
    spin.setSingleStep(step)
    spin.setValue(value)
    return spin


def _combo(items, editable: bool = False) -> QComboBox:
    combo = QComboBox()
    combo.addItems(list(items))
    combo.setEditable(editable)
    return combo


def _input_size(default_text: str = "default") -> QSpinBox:
    """Input size in pixels; at the minimum (-1) the engine's default."""
    spin = _spin(-1, 1024, -1, " px")
    spin.setSpecialValueText(default_text)
    spin.setToolTip("Resize patches to this size inside the model (0 = as the patches are); "
                    "pretrained networks often gain from larger inputs, at more compute per patch")
    return spin


class AsymKDDock(QDockWidget):
    """The dock widget. `run_step(name)` is what each Run button calls (tests call it too)."""

    jobFinished = pyqtSignal(str, object)  # step name, EngineJob

    def __init__(self, iface, notifier: Notifier | None = None, parent: QWidget | None = None):
        super().__init__("AsymKD", parent)
        self.setObjectName("AsymKDDock")
        self.iface = iface
        self.notifier = notifier or Notifier(iface)
        self.persist = Persist("dock")
        self.panels: dict[str, StepPanel] = {}
        self.jobs: dict[str, EngineJob] = {}
        self.loaded_layers: list = []  # the classified tile layers
        self.region_layers: list = []  # their merged regions, when the engine wrote them
        self._chain: list[str] = []
        self.engine_factory: Callable[[], Engine] = Engine.from_settings
        self.engine_state: EngineState | None = None
        self.builder = None  # the engine environment being created, if any
        self.review: ReviewPanel | None = None  # opened by "Review uncertain tiles"
        self._build()
        self.visibilityChanged.connect(lambda visible: visible and self.refresh_engine_state())

    # -- building ------------------------------------------------------------------------
    def _build(self) -> None:
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        # The form wraps to the dock's width instead: never a horizontal scrollbar.
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        body = QWidget()
        outer = QVBoxLayout(body)
        self.engine_banner = EngineBanner()
        self.engine_banner.actionRequested.connect(self._engine_action)
        self.engine_banner.hide()
        outer.addWidget(self.engine_banner)
        top = QFormLayout()
        top.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.run_dir = QgsFileWidget()
        self.run_dir.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.run_dir.setFilePath(str(settings.runs_dir() / "default"))
        self.persist.bind("run_dir", self.run_dir)
        top.addRow("Run folder", self.run_dir)
        self.run_all_button = QPushButton("Run all steps")
        self.run_all_button.clicked.connect(self.run_all)
        top.addRow(self.run_all_button)
        wrap_labels(top)
        outer.addLayout(top)
        # One collapsible section per step, in order; the whole dock scrolls, so a step's
        # results are never squeezed into a fixed-height page.
        self.sections: dict[str, QgsCollapsibleGroupBox] = {}
        for step, build in (("data", self._build_data), ("teacher", self._build_teacher),
                            ("matcher", self._build_matcher), ("distill", self._build_distill),
                            ("classify", self._build_classify)):
            section = QgsCollapsibleGroupBox(STEP_TITLES[step])
            section.setObjectName(f"asymkd_step_{step}")
            form = QFormLayout(section)
            form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
            form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
            build(form)
            wrap_labels(form)
            panel = StepPanel(RUN_LABELS[step])
            panel.run_button.clicked.connect(lambda _=False, s=step: self.run_step(s))
            panel.cancel_button.clicked.connect(lambda _=False, s=step: self.cancel_step(s))
            form.addRow(panel)
            if step == "classify":
                self.review_button = QPushButton("Review uncertain tiles")
                self.review_button.setToolTip("The least confident tiles of a classified layer, to accept or "
                                              "correct, and to export as labels for the next training round")
                self.review_button.clicked.connect(lambda _=False: self.open_review())
                form.addRow(self.review_button)
            self.panels[step] = panel
            self.sections[step] = section
            outer.addWidget(section)
        outer.addStretch(1)
        self.show_step("data")
        guard_form(body)
        scroll.setWidget(body)
        self.setWidget(scroll)
        self._connect_applicability()
        self.update_applicable()

    def sizeHint(self) -> QSize:
        return QSize(DOCK_WIDTH, super().sizeHint().height())

    def _connect_applicability(self) -> None:
        for combo in (self.ms_source.mode, self.rgb_source.mode, self.test_source.mode, self.area, self.grid):
            combo.currentIndexChanged.connect(lambda *_: self.update_applicable())
        self.pair_raster.layerChanged.connect(lambda *_: self.update_applicable())
        self.uncertain_below.valueChanged.connect(lambda *_: self.update_applicable())
        self.regions.toggled.connect(lambda *_: self.update_applicable())

    def update_applicable(self) -> None:
        """Rows that do not apply to the current choices are disabled (their values are kept)."""
        layer = SourcePicker.LAYER
        ms_layer = self.ms_source.kind() == layer
        sources = (self.ms_source.kind(), self.rgb_source.kind(), self.test_source.kind())
        self.ms_labels.setEnabled(ms_layer)
        self.pair_raster.setEnabled(ms_layer)
        self.rgb_labels.setEnabled(self.rgb_source.kind() == layer)
        self.test_labels.setEnabled(self.test_source.kind() == layer)
        self.chip_size.setEnabled(layer in sources)
        self.chip_resolution.setEnabled(layer in sources)
        self.mask_layer.setEnabled(self.area.currentText() == "Selected polygons")
        self.uncertain_by.setEnabled(self.uncertain_below.value() > 0)
        self.min_region.setEnabled(self.regions.isChecked())
        xyz = self.grid.currentIndex() == 1
        for widget in (self.tile, self.stride):
            widget.setEnabled(not xyz)
        self.zoom.setEnabled(xyz)
        for label, widget in self._grid_labels.items():
            label.setEnabled(widget.isEnabled())

    # -- the engine ------------------------------------------------------------------------
    def refresh_engine_state(self) -> EngineState:
        """Check the engine (its modules are looked up, not imported: fast) and show the state."""
        if self.builder is not None and not self.builder.done:
            return self.engine_state
        engine = self.engine_factory()
        self.engine_state = engine.state()
        self._show_engine_state()
        self._offer_engine_choices(engine)
        return self.engine_state

    def _offer_engine_choices(self, engine: Engine, refresh: bool = False) -> None:
        """The forms offer what a working engine names (asked once per session, cached)."""
        if self.engine_state is not None and self.engine_state.working:
            self.apply_choices(choices.engine_choices(engine, refresh=refresh))

    def _show_engine_state(self, failure: str = "") -> None:
        self.engine_banner.show_state(self.engine_state, failure)
        self.engine_banner.setVisible(self.engine_state.kind != WORKING or bool(failure))

    def _engine_action(self, action: str) -> None:
        if action == EngineBanner.CANCEL:
            if self.builder is not None:
                self.builder.cancel()
            return
        if self.notifier.create_environment is not None:
            self.notifier.create_environment()

    def track_builder(self, builder) -> None:
        """Show an engine environment being created (progress, cancel) until it ends."""
        self.builder = builder
        builder.progressChanged.connect(self.engine_banner.show_creating)
        builder.builderFinished.connect(self._builder_finished)
        self.engine_banner.show_creating(0.0, "starting")
        self.engine_banner.show()

    def _builder_finished(self, builder) -> None:
        self.builder = None
        engine = self.engine_factory()
        self.engine_state = engine.state()
        self._show_engine_state("" if builder.ok else builder.message)
        self._offer_engine_choices(engine, refresh=True)
        if builder.ok:
            self.notifier.clear("engine")

    def _build_data(self, form: QFormLayout) -> None:
        self.ms_source = self.persist.bind("data/ms_mode", SourcePicker())
        self.persist.bind("data/ms_layer", self.ms_source.layer_combo)
        self.persist.bind("data/ms_folder", self.ms_source.folder_widget)
        self.ms_labels = LabelPicker()
        self.persist.bind("data/ms_labels", self.ms_labels.layer_combo)
        self.persist.bind("data/ms_field", self.ms_labels.field_combo)
        self.pair_raster = QgsMapLayerComboBox()
        self.pair_raster.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.pair_raster.setAllowEmptyLayer(True)
        self.pair_raster.setLayer(None)
        self.persist.bind("data/pair_raster", self.pair_raster)
        self.rgb_source = self.persist.bind("data/rgb_mode", SourcePicker())
        self.persist.bind("data/rgb_layer", self.rgb_source.layer_combo)
        self.persist.bind("data/rgb_folder", self.rgb_source.folder_widget)
        self.rgb_labels = LabelPicker()
        self.persist.bind("data/rgb_labels", self.rgb_labels.layer_combo)
        self.persist.bind("data/rgb_field", self.rgb_labels.field_combo)
        self.test_source = self.persist.bind("data/test_mode", SourcePicker(optional=True))
        self.persist.bind("data/test_layer", self.test_source.layer_combo)
        self.persist.bind("data/test_folder", self.test_source.folder_widget)
        self.test_labels = LabelPicker()
        self.persist.bind("data/test_labels", self.test_labels.layer_combo)
        self.persist.bind("data/test_field", self.test_labels.field_combo)
        self.chip_size = self.persist.bind("data/chip_size", _spin(8, 1024, 64, " px"))
        self.chip_resolution = self.persist.bind("data/resolution", _dspin(0.0, 10000.0, 0.0, 3, 1.0))
        self.chip_resolution.setSpecialValueText("native")
        form.addRow(heading("<b>Multispectral (MS) samples</b>, labeled"))
        form.addRow("MS source", self.ms_source)
        form.addRow("MS labels, class field", self.ms_labels)
        form.addRow("RGB co-registered with MS (optional)", self.pair_raster)
        form.addRow(heading("<b>RGB samples</b> (other places may be used)"))
        form.addRow("RGB source", self.rgb_source)
        form.addRow("RGB labels, class field", self.rgb_labels)
        form.addRow(heading("<b>RGB test samples</b> (optional)"))
        form.addRow("Test source", self.test_source)
        form.addRow("Test labels, class field", self.test_labels)
        form.addRow("Chip size", self.chip_size)
        form.addRow("Ground resolution (m)", self.chip_resolution)

    def _build_teacher(self, form: QFormLayout) -> None:
        self.teacher_bands = self.persist.bind("teacher/bands",
                                               _combo(["sentinel2", "sentinel2-ordered", ""], editable=True))
        self.teacher_model = self._model_picker("teacher")
        self.teacher_input_size = self.persist.bind("teacher/input_size", _input_size())
        self.teacher_epochs = self.persist.bind("teacher/epochs", _spin(0, 1000, 0))
        self.teacher_epochs.setSpecialValueText("default")
        self.device = self.persist.bind("device", _combo(steps.DEVICES))
        self.seed = self.persist.bind("seed", _spin(0, 2**31 - 1, 0))
        form.addRow("MS band names", self.teacher_bands)
        form.addRow("Backbone", self.teacher_model)
        form.addRow("Input size", self.teacher_input_size)
        form.addRow("Epochs", self.teacher_epochs)
        self.teacher_settings = self._settings_edit("teacher/settings", "e.g. teacher.folds=0 teacher.lr=0.001")
        self._watch_weights(self.teacher_settings, self.teacher_model)
        form.addRow("Device", self.device)
        form.addRow("Seed", self.seed)
        form.addRow("More settings", self.teacher_settings)

    def _build_matcher(self, form: QFormLayout) -> None:
        self.matcher_epochs = self.persist.bind("matcher/epochs", _spin(0, 1000, 0))
        self.matcher_epochs.setSpecialValueText("default")
        self.pair_method = self.persist.bind("matcher/method", _combo(steps.PAIR_METHODS))
        self.matcher_settings = self._settings_edit("matcher/settings", "e.g. matcher.embed_dim=128")
        form.addRow("Matcher epochs", self.matcher_epochs)
        form.addRow("Pairing", self.pair_method)
        form.addRow("More settings", self.matcher_settings)
        note = QLabel("Same-target pairs come from the co-registered RGB raster of the Data "
                      "step; without one, pseudo-RGB is rendered from the MS bands.")
        note.setWordWrap(True)
        form.addRow(note)

    def _build_distill(self, form: QFormLayout) -> None:
        self.distill_epochs = self.persist.bind("distill/epochs", _spin(0, 1000, 0))
        self.distill_epochs.setSpecialValueText("default")
        self.repair_every = self.persist.bind("distill/repair_every", _spin(0, 100000, 0, " steps"))
        self.repair_every.setSpecialValueText("default")
        # At the minimum (-1) a weight shows "default" and is left to the engine's configuration.
        self.w_feat = self.persist.bind("distill/w_feat", _dspin(-1.0, 100.0, -1.0, 3, 0.05))
        self.w_pseudo = self.persist.bind("distill/w_pseudo", _dspin(-1.0, 100.0, -1.0, 3, 0.1))
        self.w_gt = self.persist.bind("distill/w_gt", _dspin(-1.0, 100.0, -1.0, 3, 0.1))
        for spin in (self.w_feat, self.w_pseudo, self.w_gt):
            spin.setSpecialValueText("default")
        self.baseline = self.persist.bind("distill/baseline", QCheckBox("Train the baseline too"))
        self.baseline.setToolTip("The same student trained without distillation, for comparison")
        self.baseline.setChecked(settings.get("dock/distill/baseline", True, bool))
        self.distill_device = self.persist.bind("distill/device", _combo(steps.DEVICES))
        self.distill_model = self._model_picker("distill")
        self.distill_input_size = self.persist.bind("distill/input_size", _input_size())
        self.domain_loss = QComboBox()
        self._refill(self.domain_loss, ("",) + steps.DOMAIN_LOSSES, None)
        self.persist.bind("distill/domain_loss", self.domain_loss)
        form.addRow("Student backbone", self.distill_model)
        form.addRow("Input size", self.distill_input_size)
        form.addRow("Epochs", self.distill_epochs)
        form.addRow("Re-pair every", self.repair_every)
        form.addRow("Weight: feature alignment", self.w_feat)
        form.addRow("Weight: teacher pseudo-labels", self.w_pseudo)
        form.addRow("Weight: ground truth", self.w_gt)
        form.addRow("Domain-shift loss", self.domain_loss)
        self.distill_settings = self._settings_edit("distill/settings", "e.g. distill.temperature=4 distill.lr=0.001")
        self._watch_weights(self.distill_settings, self.distill_model)
        form.addRow("Device", self.distill_device)
        form.addRow("More settings", self.distill_settings)
        form.addRow(self.baseline)

    def _build_classify(self, form: QFormLayout) -> None:
        self.classify_layer = QgsMapLayerComboBox()
        self.classify_layer.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.classify_layer.setAllowEmptyLayer(True)
        self.classify_layer.setLayer(None)
        self.persist.bind("classify/layer", self.classify_layer)
        self.classify_bands = self.persist.bind("classify/bands", QLineEdit())
        self.classify_bands.setPlaceholderText("all, or e.g. 1,2,3")
        self.model_file = QgsFileWidget()
        self.model_file.setFilter("ONNX model (*.onnx)")
        self.model_file.setToolTip("Empty: the student of the run folder (exported when needed)")
        self.persist.bind("classify/model", self.model_file)
        self.area = self.persist.bind("classify/area", _combo(AREAS))
        self.mask_layer = QgsMapLayerComboBox()
        self.mask_layer.setFilters(QgsMapLayerProxyModel.Filter.PolygonLayer)
        self.mask_layer.setAllowEmptyLayer(True)
        self.mask_layer.setLayer(None)
        self.persist.bind("classify/mask_layer", self.mask_layer)
        self.grid = self.persist.bind("classify/grid", _combo(GRID_LABELS))
        self.tile = self.persist.bind("classify/tile", _spin(0, 4096, 0, " px"))
        self.tile.setSpecialValueText("model's")
        self.stride = self.persist.bind("classify/stride", _spin(0, 4096, 0, " px"))
        self.stride.setSpecialValueText("= tile")
        self.zoom = self.persist.bind("classify/zoom", _spin(0, 24, 16))
        self.batch_size = self.persist.bind("classify/batch_size", _spin(1, 4096, 64))
        self.classify_device = self.persist.bind("classify/device", _combo(steps.DEVICES))
        self.uncertain_below = self.persist.bind("classify/uncertain_below", _dspin(0.0, 1.0, 0.0, 2, 0.05))
        self.uncertain_below.setSpecialValueText("off")
        self.uncertain_below.setPrefix("below ")
        self.uncertain_below.setToolTip("Mark the tiles whose certainty is below this value as uncertain "
                                        "(they keep their class; the map shows them faded and hatched)")
        self.uncertain_by = QComboBox()
        self._refill(self.uncertain_by, steps.UNCERTAINTY_MEASURES, None)
        self.persist.bind("classify/uncertain_by", self.uncertain_by)
        self.regions = self.persist.bind("classify/regions", QCheckBox("Merge tiles into regions"))
        self.regions.setToolTip("Also write the layer 'regions': neighbouring tiles of a class dissolved into "
                                "polygons with their area")
        self.min_region = self.persist.bind("classify/min_region_ha", _dspin(0.0, 1e6, 0.0, 2, 1.0))
        self.min_region.setSpecialValueText("default")
        self.min_region.setSuffix(" ha")
        self.min_region.setToolTip("Drop regions smaller than this")
        self._grid_labels: dict[QLabel, QWidget] = {}
        form.addRow("Raster layer", self.classify_layer)
        form.addRow("Bands", self.classify_bands)
        form.addRow("Model (.onnx)", self.model_file)
        form.addRow("Area", self.area)
        form.addRow("Polygon layer (selection)", self.mask_layer)
        form.addRow("Grid", self.grid)
        for text, widget in (("Tile", self.tile), ("Stride", self.stride), ("Zoom level", self.zoom)):
            label = QLabel(text)
            self._grid_labels[label] = widget
            form.addRow(label, widget)
        form.addRow("Batch size", self.batch_size)
        form.addRow("Device", self.classify_device)
        # short labels: the form's label column must stay narrow at the default dock width
        form.addRow("Uncertainty", self.uncertain_below)
        form.addRow("Measured by", self.uncertain_by)
        form.addRow(self.regions)
        form.addRow("Smallest region", self.min_region)

    def _settings_edit(self, key: str, placeholder: str) -> QLineEdit:
        edit = self.persist.bind(key, QLineEdit())
        edit.setPlaceholderText(placeholder)
        edit.setToolTip("Engine configuration keys as KEY=VALUE, separated by spaces (passed as --set)")
        return edit

    def _model_picker(self, section: str) -> ModelPicker:
        picker = ModelPicker(section)
        self.persist.bind(f"{section}/backbone", picker.backbone)
        self.persist.bind(f"{section}/pretrained", picker.pretrained)
        picker.set_choices(choices.cached())
        return picker

    @staticmethod
    def _watch_weights(edit: QLineEdit, picker: ModelPicker) -> None:
        """A weights file given in More settings shows as the backbone's source."""
        key = f"{picker.section}.weights="
        edit.textChanged.connect(lambda text: picker.set_weights_file(key in text))
        picker.set_weights_file(key in edit.text())

    def apply_choices(self, found: choices.EngineChoices) -> None:
        """Offer the engine's backbones, pairing methods and losses, with its defaults."""
        for picker in (self.teacher_model, self.distill_model):
            picker.set_choices(found)
        for spin, section in ((self.teacher_input_size, "teacher"), (self.distill_input_size, "distill")):
            size = found.default(section, "input_size")
            spin.setSpecialValueText("default" if size is None else
                                     f"default ({size} px)" if size else "default (as they are)")
        self._refill(self.pair_method, found.names("pairing.method", steps.PAIR_METHODS),
                     found.config.get("pairing.method"))
        self._refill(self.domain_loss, ("",) + found.names("distill.domain_loss", steps.DOMAIN_LOSSES),
                     found.config.get("distill.domain_loss"))
        self._refill(self.uncertain_by, found.names("classify.uncertain_by", steps.UNCERTAINTY_MEASURES),
                     found.config.get("classify.uncertain_by"))

    @staticmethod
    def _refill(combo: QComboBox, names: tuple[str, ...], about: dict[str, str] | None) -> None:
        """Replace a combo's items, keeping the current choice where it still exists."""
        current = combo.currentIndex()
        text = (combo.itemData(current) or combo.currentText()) if current >= 0 else ""
        combo.blockSignals(True)
        combo.clear()
        for name in names:
            combo.addItem(name or "default", name)  # "": the engine's default
            if about and about.get(name):
                combo.setItemData(combo.count() - 1, about[name], Qt.ItemDataRole.ToolTipRole)
        index = combo.findData(text)
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(False)

    @staticmethod
    def _settings(edit: QLineEdit) -> list[str]:
        try:
            return steps.parse_settings(edit.text())
        except ValueError as exc:
            raise InputError(f"More settings: {exc}") from exc

    def show_step(self, step: str) -> None:
        """Expand one step's section and collapse the others."""
        for name, section in self.sections.items():
            section.setCollapsed(name != step)

    # -- helpers -------------------------------------------------------------------------
    @property
    def layout_(self) -> RunLayout:
        path = self.run_dir.filePath().strip()
        if not path:
            raise InputError("No run folder chosen: pick a folder for this run's data and models.")
        return RunLayout(Path(path))

    def _ms_dir(self, run: RunLayout) -> Path:
        if self.ms_source.kind() == SourcePicker.FOLDER:
            return require_folder(self.ms_source.folder(), "MS folder")
        if not run.ms.is_dir():
            raise InputError("The MS chips do not exist yet: run the Data step first (or choose an MS folder).")
        return run.ms

    def _rgb_dir(self, run: RunLayout) -> Path:
        if self.rgb_source.kind() == SourcePicker.FOLDER:
            return require_folder(self.rgb_source.folder(), "RGB folder")
        if not run.rgb.is_dir():
            raise InputError("The RGB chips do not exist yet: run the Data step first (or choose an RGB folder).")
        return run.rgb

    def _test_dir(self, run: RunLayout) -> Path | None:
        kind = self.test_source.kind()
        if kind == SourcePicker.FOLDER:
            return require_folder(self.test_source.folder(), "RGB test folder")
        if kind == SourcePicker.LAYER and run.rgb_test.is_dir():
            return run.rgb_test
        return None

    @staticmethod
    def _model(picker: ModelPicker, input_size: QSpinBox) -> steps.ModelOptions:
        size = input_size.value()
        return steps.ModelOptions(backbone=picker.name(), input_size=size if size >= 0 else None,
                                  pretrained=picker.pretrained.isChecked())

    # -- preparing each step's job (steps.py holds what the Processing algorithms share) ----
    def prepare_data(self) -> Prepared:
        run = self.layout_
        prepared = Prepared(steps.SPECS["data"].title)
        chips = steps.ChipOptions(self.chip_size.value(), self.chip_resolution.value() or None)
        if self.ms_source.kind() == SourcePicker.LAYER:
            ms = steps.MapSource(self.ms_source.layer(), self.ms_labels.layer(), self.ms_labels.field())
            prepared.add(steps.map_chips(ms, "MS", run.ms, run, chips, check_ms_raster,
                                         self.pair_raster.currentLayer(), run.rgb_paired))
        else:
            require_folder(self.ms_source.folder(), "MS folder")
        if self.rgb_source.kind() == SourcePicker.LAYER:
            rgb = steps.MapSource(self.rgb_source.layer(), self.rgb_labels.layer(), self.rgb_labels.field())
            prepared.add(steps.map_chips(rgb, "RGB", run.rgb, run, chips, check_rgb_raster))
        else:
            require_folder(self.rgb_source.folder(), "RGB folder")
        if self.test_source.kind() == SourcePicker.LAYER:
            test = steps.MapSource(self.test_source.layer(), self.test_labels.layer(), self.test_labels.field())
            prepared.add(steps.map_chips(test, "RGB test", run.rgb_test, run, chips,
                                         lambda layer: check_rgb_raster(layer, "RGB test layer")))
        elif self.test_source.kind() == SourcePicker.FOLDER:
            require_folder(self.test_source.folder(), "RGB test folder")
        return prepared

    def prepare_teacher(self) -> Prepared:
        run = self.layout_
        options = steps.TeacherOptions(bands=self.teacher_bands.currentText().strip(),
                                       model=self._model(self.teacher_model, self.teacher_input_size),
                                       epochs=self.teacher_epochs.value(), device=self.device.currentText(),
                                       seed=self.seed.value(), settings=self._settings(self.teacher_settings))
        return Prepared(steps.SPECS["teacher"].title, [steps.teacher_command(run.root, self._ms_dir(run), options)])

    def prepare_matcher(self) -> Prepared:
        run = self.layout_
        steps.require_previous(run, "matcher")
        paired = run.rgb_paired if run.rgb_paired.is_dir() else None
        options = steps.MatcherOptions(epochs=self.matcher_epochs.value(), method=self.pair_method.currentText(),
                                       device=self.device.currentText(), settings=self._settings(self.matcher_settings))
        return Prepared(steps.SPECS["matcher"].title,
                        steps.matcher_commands(run.root, self._rgb_dir(run), options, paired))

    def prepare_distill(self) -> Prepared:
        run = self.layout_
        steps.require_previous(run, "distill")
        options = steps.DistillOptions(model=self._model(self.distill_model, self.distill_input_size),
                                       domain_loss=self.domain_loss.currentData() or "",
                                       epochs=self.distill_epochs.value(), repair_every=self.repair_every.value(),
                                       w_feat=self.w_feat.value(), w_pseudo=self.w_pseudo.value(),
                                       w_gt=self.w_gt.value(), baseline=self.baseline.isChecked(),
                                       device=self.distill_device.currentText(),
                                       settings=self._settings(self.distill_settings))
        return Prepared(steps.SPECS["distill"].title, [steps.distill_command(run.root, options, self._test_dir(run))])

    def prepare_classify(self) -> Prepared:
        run = self.layout_
        raster = check_rgb_raster(self.classify_layer.currentLayer(), "raster layer to classify")
        prepared = Prepared(steps.SPECS["classify"].title)
        model = Path(self.model_file.filePath().strip()) if self.model_file.filePath().strip() else None
        if model is None:
            model = run.student_onnx
            weights = run.student_weights
            if not weights.is_file() and not model.is_file():
                raise InputError("There is no student model in this run folder: run the Distill step first, "
                                 "or choose an .onnx model.")
            if weights.is_file() and (not model.is_file() or model.stat().st_mtime < weights.stat().st_mtime):
                prepared.commands.append(steps.export_command(run.student, model))
        elif not model.is_file():
            raise InputError(f"The model file {model} does not exist: choose an exported .onnx model.")
        info = self._model_info(model, run)
        options = steps.ClassifyOptions(bands=self.classify_bands.text().strip(), batch_size=self.batch_size.value(),
                                        device=self.classify_device.currentText(),
                                        uncertain_below=self.uncertain_below.value(),
                                        uncertain_by=self.uncertain_by.currentData() or "",
                                        regions=self.regions.isChecked(), min_region_ha=self.min_region.value())
        if self.grid.currentIndex() == 1:
            options.xyz_zoom = self.zoom.value()
        else:
            options.tile, options.stride = self.tile.value(), self.stride.value()
        extent, extent_crs = self._area(raster, options, run, prepared)
        raster_file = steps.raster_file(raster, run.exports, extent, extent_crs, info.gsd if info else None, prepared)
        prepared.output = run.classified / f"{layers._safe_name(raster.name())}.gpkg"
        prepared.commands.append(steps.classify_command(model, raster_file, prepared.output, options))
        return prepared

    def _model_info(self, model: Path, run: RunLayout):
        for candidate in (model, run.student):
            try:
                return read_model_info(candidate)
            except ModelInfoError:
                continue
        return None

    def _area(self, raster: QgsRasterLayer, options: steps.ClassifyOptions, run: RunLayout, prepared: Prepared):
        """Fill bbox/mask options from the chosen area; return (extent, crs) for exports."""
        area = self.area.currentText()
        if area == "Canvas extent":
            canvas = self.iface.mapCanvas()
            extent: QgsRectangle = canvas.extent()
            crs = canvas.mapSettings().destinationCrs()
            options.bbox = (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())
            options.bbox_crs = crs.authid()
            return extent, crs
        if area == "Selected polygons":
            mask = require_layer(self.mask_layer.currentLayer(), "polygon layer for the area")
            if mask.selectedFeatureCount() == 0:
                raise InputError(f"No polygons are selected in '{mask.name()}': select the area's polygons first.")
            options.mask = steps.vector_file(mask, run.exports, prepared, only_selected=True).path
            return mask.boundingBoxOfSelected(), mask.crs()
        return raster.extent(), raster.crs()

    # -- running ---------------------------------------------------------------------------
    def run_step(self, step: str) -> EngineJob | None:
        """Check the step's inputs and start its job; None (and a message) on bad input."""
        if step in self.jobs and not self.jobs[step].done:
            self.notifier.warning("AsymKD", f"{STEP_TITLES[step]} is already running.")
            return None
        panel = self.panels[step]
        self.persist.save_all()
        try:
            prepared = getattr(self, f"prepare_{step}")()
            if not prepared.commands:
                panel.set_status("")
                panel.show_results(note="Nothing to prepare: the folders are used as they are.")
                self._continue_chain(step, True)
                return None
            engine = self.engine_factory()
            engine.check()
        except InputError as exc:
            self._chain.clear()
            panel.set_status(str(exc), error=True)
            self.notifier.error(f"AsymKD {STEP_TITLES[step]}", str(exc), show_log=False, key=step)
            return None
        except EngineUnavailable as exc:
            self._chain.clear()
            panel.set_status(exc.message, error=True)
            self.notifier.error("AsymKD engine", str(exc), offer_environment=True, key="engine")
            self.refresh_engine_state()
            return None
        job = EngineJob(prepared.name, prepared.commands, engine, parent=self, pre_steps=prepared.pre_steps)
        job.progressChanged.connect(panel.set_progress)
        job.jobFinished.connect(lambda j, s=step, p=prepared: self._job_finished(s, j, p))
        self.jobs[step] = job
        panel.set_running(True, f"{prepared.name}: starting")
        return job.start()

    def cancel_step(self, step: str) -> None:
        self._chain.clear()
        job = self.jobs.get(step)
        if job is not None:
            job.cancel()
            self.panels[step].set_status("Cancelling...")

    def run_all(self) -> None:
        """Data, teacher, matcher, distill and classify, each started when the one before succeeds."""
        self._chain = list(STEPS[1:])
        self.run_step(STEPS[0])

    def _continue_chain(self, step: str, ok: bool) -> None:
        if not ok:
            self._chain.clear()
            return
        if self._chain:
            self.run_step(self._chain.pop(0))

    def _job_finished(self, step: str, job: EngineJob, prepared: Prepared) -> None:
        panel = self.panels[step]
        panel.set_running(False)
        ok = job.state == EngineJob.OK
        if ok:
            panel.progress.setValue(100)
            panel.set_status(f"{job.name} finished.")
            self.notifier.clear(step)  # an old error of this step no longer applies
            try:
                self._show_results(step, job, prepared)
            except InputError as exc:
                ok = False
                panel.set_status(str(exc), error=True)
                self.notifier.error(f"AsymKD {STEP_TITLES[step]}", str(exc), key=step)
        elif job.state == EngineJob.CANCELLED:
            panel.set_status(job.message())
            self.notifier.info(f"AsymKD {STEP_TITLES[step]}", job.message())
        else:
            message = job.message()
            panel.set_status(message, error=True)
            broken = job.engine_unavailable or self._env_broken(job)
            self.notifier.error(f"AsymKD {STEP_TITLES[step]} failed", message, offer_environment=broken, key=step)
            if broken:
                self.refresh_engine_state()
        self.jobFinished.emit(step, job)
        self._continue_chain(step, ok)

    @staticmethod
    def _env_broken(job: EngineJob) -> bool:
        """Whether a crash came from the environment (a module missing or failing to import)
        rather than from the engine: the user is then offered to repair it."""
        crashed = [o for o in job.outcomes if o.returncode == 1]
        for outcome in crashed:
            text = "\n".join(outcome.stderr_tail) + (outcome.error.message if outcome.error else "")
            modules = re.findall(r"No module named '([^']+)'", text)
            if any(name.split(".")[0] != "asymkd" for name in modules) or "_ARRAY_API not found" in text:
                return True
        # Judge by what the engine needs, never by the wording of the error.
        return bool(crashed) and not job.engine.state().working

    # -- results ---------------------------------------------------------------------------
    def _show(self, step: str, shown: results.StepResults) -> None:
        self.panels[step].show_results(metrics=shown.rows, links=shown.links, image=shown.image, note=shown.note)

    def _show_results(self, step: str, job: EngineJob, prepared: Prepared) -> None:
        """A finished step's results: read from the run folder by its spec, or the classified layer."""
        if step == "classify":
            self._classify_done(job, prepared.output)
            return
        self._show(step, steps.SPECS[step].read_results(self.layout_))

    def _classify_done(self, job: EngineJob, out: Path) -> None:
        path = next((v for v in job.results.values() if isinstance(v, str) and v.endswith(".gpkg")), str(out))
        layer = layers.load_vector_result(path)
        self.loaded_layers.append(layer)
        self._show("classify", results.classify_results(job.metrics, layer.name(), layer.featureCount(), path))
        self.show_classified(path)

    def show_classified(self, path: str | Path) -> None:
        """The area table of a classification and its merged regions (outputs of older engines
        have neither: nothing is shown for them)."""
        regions = layers.load_regions(path)
        if regions is not None:
            self.region_layers.append(regions)
        rows = layers.read_class_areas(path)
        note = f"Regions loaded: '{regions.name()}'." if regions is not None else ""
        self.panels["classify"].show_areas(rows, note)

    def open_review(self, layer=None) -> ReviewPanel | None:
        """The review panel for `layer`, the active layer, the last classified one or any tile
        layer of the project."""
        candidates = [layer, self.iface.activeLayer() if self.iface is not None else None,
                      *reversed(self.loaded_layers), *QgsProject.instance().mapLayers().values()]
        target = next((c for c in candidates if review.is_tile_layer(c)), None)
        if target is None:
            self.panels["classify"].set_status("No AsymKD tile layer to review: classify a raster first, or "
                                               "load (and select) a classified GeoPackage.", error=True)
            return None
        if self.review is None:
            self.review = ReviewPanel(self.iface.mapCanvas() if self.iface is not None else None, self.parent())
            if self.iface is not None:
                self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.review)
        self.review.set_layer(target)
        self.review.show()
        self.review.raise_()
        return self.review
