"""Step 5, Classify: the tiles of a raster layer classified with the run's student (exported
first when needed) or a chosen .onnx model; the result is loaded with its style, its area
table and merged regions, and its uncertain tiles can be reviewed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import QgsMapLayerProxyModel, QgsProject
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QCheckBox, QComboBox, QFormLayout, QLabel, QLineEdit, QPushButton, QWidget

from .. import choices, layers, results, review, steps
from ..layout import RunLayout
from ..persist import Persist
from ..review import ReviewPanel
from ..runner import Prepared
from ..tasks import EngineJob
from ..validation import check_rgb_raster, require_layer
from ..widgets import StepPanel
from .base import StepForm, combo, dspin, layer_combo, refill, show, spin

AREAS = ("Whole layer", "Canvas extent", "Selected polygons")
GRID_LABELS = ("Pixels (tile and stride)", "XYZ tiles (zoom level)")


class ClassifyForm(StepForm):
    step = "classify"

    def __init__(self, persist: Persist, panel: StepPanel, iface):
        super().__init__(persist, panel)
        self.iface = iface
        self.loaded_layers: list = []  # the classified tile layers
        self.region_layers: list = []  # their merged regions, when the engine wrote them
        self.review: ReviewPanel | None = None  # opened by "Review uncertain tiles"
        self._grid_labels: dict[QLabel, QWidget] = {}

    # -- rows ------------------------------------------------------------------------------
    def build(self, form: QFormLayout) -> None:
        self._build_input(form)
        self._build_grid(form)
        self._build_outputs(form)
        for box in (self.area, self.grid):
            box.currentIndexChanged.connect(lambda *_: self.update_applicable())
        self.uncertain_below.valueChanged.connect(lambda *_: self.update_applicable())
        self.regions.toggled.connect(lambda *_: self.update_applicable())
        self.update_applicable()

    def _build_input(self, form: QFormLayout) -> None:
        bind = self.persist.bind
        self.layer = bind("classify/layer", layer_combo(QgsMapLayerProxyModel.Filter.RasterLayer))
        self.bands = bind("classify/bands", QLineEdit())
        self.bands.setPlaceholderText("all, or e.g. 1,2,3")
        self.model_file = QgsFileWidget()
        self.model_file.setFilter("ONNX model (*.onnx)")
        self.model_file.setToolTip("Empty: the student of the run folder (exported when needed)")
        bind("classify/model", self.model_file)
        self.area = bind("classify/area", combo(AREAS))
        self.mask_layer = bind("classify/mask_layer", layer_combo(QgsMapLayerProxyModel.Filter.PolygonLayer))
        form.addRow("Raster layer", self.layer)
        form.addRow("Bands", self.bands)
        form.addRow("Model (.onnx)", self.model_file)
        form.addRow("Area", self.area)
        form.addRow("Polygon layer (selection)", self.mask_layer)

    def _build_grid(self, form: QFormLayout) -> None:
        bind = self.persist.bind
        self.grid = bind("classify/grid", combo(GRID_LABELS))
        self.tile = bind("classify/tile", spin(0, 4096, 0, " px", "model's"))
        self.stride = bind("classify/stride", spin(0, 4096, 0, " px", "= tile"))
        self.zoom = bind("classify/zoom", spin(0, 24, 16))
        self.batch_size = bind("classify/batch_size", spin(0, 65536, 0, special="default"))
        form.addRow("Grid", self.grid)
        for text, widget in (("Tile", self.tile), ("Stride", self.stride), ("Zoom level", self.zoom)):
            label = QLabel(text)
            self._grid_labels[label] = widget
            form.addRow(label, widget)
        form.addRow("Batch size", self.batch_size)

    def _build_outputs(self, form: QFormLayout) -> None:
        bind = self.persist.bind
        self.device = bind("classify/device", combo(steps.DEVICES))
        self.uncertain_below = bind("classify/uncertain_below", dspin(0.0, 1.0, 0.0, 2, 0.05, "off"))
        self.uncertain_below.setPrefix("below ")
        self.uncertain_below.setToolTip("Mark the tiles whose certainty is below this value as uncertain "
                                        "(they keep their class; the map shows them faded and hatched)")
        self.uncertain_by = QComboBox()
        refill(self.uncertain_by, steps.UNCERTAINTY_MEASURES)
        bind("classify/uncertain_by", self.uncertain_by)
        self.regions = bind("classify/regions", QCheckBox("Merge tiles into regions"))
        self.regions.setToolTip("Also write the layer 'regions': neighbouring tiles of a class dissolved into "
                                "polygons with their area")
        self.min_region = bind("classify/min_region_ha", dspin(0.0, 1e6, 0.0, 2, 1.0, "default"))
        self.min_region.setSuffix(" ha")
        self.min_region.setToolTip("Drop regions smaller than this")
        form.addRow("Device", self.device)
        # short labels: the form's label column must stay narrow at the default dock width
        form.addRow("Uncertainty", self.uncertain_below)
        form.addRow("Measured by", self.uncertain_by)
        form.addRow(self.regions)
        form.addRow("Smallest region", self.min_region)

    def add_below_panel(self, form: QFormLayout) -> None:
        self.review_button = QPushButton("Review uncertain tiles")
        self.review_button.setToolTip("The least confident tiles of a classified layer, to accept or "
                                      "correct, and to export as labels for the next training round")
        self.review_button.clicked.connect(lambda _=False: self.open_review())
        form.addRow(self.review_button)

    def update_applicable(self) -> None:
        """Rows that do not apply to the current choices are disabled (their values are kept)."""
        self.mask_layer.setEnabled(self.area.currentText() == "Selected polygons")
        self.uncertain_by.setEnabled(self.uncertain_below.value() > 0)
        self.min_region.setEnabled(self.regions.isChecked())
        xyz = self.grid.currentIndex() == 1
        self.tile.setEnabled(not xyz)
        self.stride.setEnabled(not xyz)
        self.zoom.setEnabled(xyz)
        for label, widget in self._grid_labels.items():
            label.setEnabled(widget.isEnabled())

    def apply_choices(self, found: choices.EngineChoices) -> None:
        refill(self.uncertain_by, found.names("classify.uncertain_by", steps.UNCERTAINTY_MEASURES),
               found.config.get("classify.uncertain_by"))
        batch = found.setting_default("classify.batch_size")
        self.batch_size.setSpecialValueText("default" if batch is None else f"default ({batch})")

    # -- the job ---------------------------------------------------------------------------
    def prepare(self, run: RunLayout) -> Prepared:
        raster = check_rgb_raster(self.layer.currentLayer(), "raster layer to classify")
        prepared = Prepared(steps.SPECS["classify"].title)
        chosen = self.model_file.filePath().strip()
        missing = (f"The model file {chosen} does not exist: choose an exported .onnx model." if chosen else
                   "There is no student model in this run folder: run the Distill step first, or choose an "
                   ".onnx model.")
        model = steps.classify_model(Path(chosen) if chosen else run.student_onnx, prepared, missing)
        area = steps.classify_area(raster, run.exports, prepared, **self._area())
        raster_file = steps.raster_file(raster, run.exports, area.extent, area.crs, steps.model_gsd(model), prepared)
        prepared.output = run.classified / f"{layers._safe_name(raster.name())}.gpkg"
        prepared.commands.append(steps.classify_command(model, raster_file, prepared.output, area, self.chosen()))
        return prepared

    def _area(self) -> dict[str, Any]:
        """steps.classify_area's box or polygons for the chosen area (none: the whole layer)."""
        area = self.area.currentText()
        if area == "Canvas extent":
            canvas = self.iface.mapCanvas()
            return {"box": (canvas.extent(), canvas.mapSettings().destinationCrs())}
        if area == "Selected polygons":
            return {"mask": require_layer(self.mask_layer.currentLayer(), "polygon layer for the area"),
                    "selected": True}
        return {}

    def chosen(self) -> dict[str, Any]:
        """The options set, by the engine's names; a box at its "default" (or "off") sends nothing."""
        xyz = self.grid.currentIndex() == 1
        return {"bands": self.bands.text().strip(), "xyz_zoom": self.zoom.value() if xyz else None,
                "tile": self.tile.value() or None, "stride": self.stride.value() or None,
                "batch_size": self.batch_size.value() or None, "device": self.device.currentText(),
                "uncertain_below": self.uncertain_below.value() or None,
                "uncertain_by": self.uncertain_by.currentData() or None,
                "regions": self.regions.isChecked(), "min_region_ha": self.min_region.value() or None,
                # the step's own output in the run folder: running it again replaces it
                "overwrite": True}

    # -- results ---------------------------------------------------------------------------
    def show_results(self, run: RunLayout, job: EngineJob, prepared: Prepared) -> None:
        """The classified layer, loaded with its style, and its numbers."""
        path = next((v for v in job.results.values() if isinstance(v, str) and v.endswith(".gpkg")),
                    str(prepared.output))
        layer = layers.load_vector_result(path)
        self.loaded_layers.append(layer)
        show(self.panel, results.classify_results(job.metrics, layer.name(), layer.featureCount(), path))
        self.show_classified(path)

    def show_classified(self, path: str | Path) -> None:
        """The area table of a classification and its merged regions (outputs of older engines
        have neither: nothing is shown for them)."""
        regions = layers.load_regions(path)
        if regions is not None:
            self.region_layers.append(regions)
        rows = layers.read_class_areas(path)
        note = f"Regions loaded: '{regions.name()}'." if regions is not None else ""
        self.panel.show_areas(rows, note)

    def open_review(self, layer=None) -> ReviewPanel | None:
        """The review panel for `layer`, the active layer, the last classified one or any tile
        layer of the project."""
        iface = self.iface
        candidates = [layer, iface.activeLayer() if iface is not None else None,
                      *reversed(self.loaded_layers), *QgsProject.instance().mapLayers().values()]
        target = next((c for c in candidates if review.is_tile_layer(c)), None)
        if target is None:
            self.panel.set_status("No AsymKD tile layer to review: classify a raster first, or "
                                  "load (and select) a classified GeoPackage.", error=True)
            return None
        if self.review is None:
            self.review = ReviewPanel(iface.mapCanvas() if iface is not None else None,
                                      iface.mainWindow() if iface is not None else None)
            if iface is not None:
                iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.review)
        self.review.set_layer(target)
        self.review.show()
        self.review.raise_()
        return self.review
