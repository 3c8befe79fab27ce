"""Step 1, Data: where the MS, RGB and RGB test samples come from. Raster layers with labels
are cut into chips under the run folder; folder datasets are used as they are."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsMapLayerProxyModel
from qgis.PyQt.QtWidgets import QFormLayout

from .. import steps
from ..errors import InputError
from ..layout import RunLayout
from ..runner import Prepared
from ..validation import check_ms_raster, check_rgb_raster, require_folder
from ..widgets import LabelPicker, SourcePicker, heading
from .base import StepForm, dspin, layer_combo, spin


class DataForm(StepForm):
    step = "data"

    def build(self, form: QFormLayout) -> None:
        self.ms_source, self.ms_labels = self._samples("ms")
        self.pair_raster = self.persist.bind("data/pair_raster", layer_combo(QgsMapLayerProxyModel.Filter.RasterLayer))
        self.rgb_source, self.rgb_labels = self._samples("rgb")
        self.test_source, self.test_labels = self._samples("test", optional=True)
        self.chip_size = self.persist.bind("data/chip_size", spin(8, 1024, 64, " px"))
        self.chip_resolution = self.persist.bind("data/resolution", dspin(0.0, 10000.0, 0.0, 3, 1.0, "native"))
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
        for source in (self.ms_source, self.rgb_source, self.test_source):
            source.mode.currentIndexChanged.connect(lambda *_: self.update_applicable())
        self.update_applicable()

    def _samples(self, key: str, optional: bool = False) -> tuple[SourcePicker, LabelPicker]:
        """A raster layer or folder, and the labels of a layer, each kept between sessions."""
        source = self.persist.bind(f"data/{key}_mode", SourcePicker(optional=optional))
        self.persist.bind(f"data/{key}_layer", source.layer_combo)
        self.persist.bind(f"data/{key}_folder", source.folder_widget)
        labels = LabelPicker()
        self.persist.bind(f"data/{key}_labels", labels.layer_combo)
        self.persist.bind(f"data/{key}_field", labels.field_combo)
        return source, labels

    def update_applicable(self) -> None:
        """Rows that do not apply to the current choices are disabled (their values are kept)."""
        layer = SourcePicker.LAYER
        kinds = (self.ms_source.kind(), self.rgb_source.kind(), self.test_source.kind())
        self.ms_labels.setEnabled(kinds[0] == layer)
        self.pair_raster.setEnabled(kinds[0] == layer)
        self.rgb_labels.setEnabled(kinds[1] == layer)
        self.test_labels.setEnabled(kinds[2] == layer)
        self.chip_size.setEnabled(layer in kinds)
        self.chip_resolution.setEnabled(layer in kinds)

    def prepare(self, run: RunLayout) -> Prepared:
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

    # -- what the training steps read ------------------------------------------------------
    def ms_dir(self, run: RunLayout) -> Path:
        return _folder_or_chips(self.ms_source, run.ms, "MS")

    def rgb_dir(self, run: RunLayout) -> Path:
        return _folder_or_chips(self.rgb_source, run.rgb, "RGB")

    def test_dir(self, run: RunLayout) -> Path | None:
        kind = self.test_source.kind()
        if kind == SourcePicker.FOLDER:
            return require_folder(self.test_source.folder(), "RGB test folder")
        if kind == SourcePicker.LAYER and run.rgb_test.is_dir():
            return run.rgb_test
        return None


def _folder_or_chips(source: SourcePicker, chips: Path, what: str) -> Path:
    """The folder the user chose, else the chips the Data step cut from the map layer."""
    if source.kind() == SourcePicker.FOLDER:
        return require_folder(source.folder(), f"{what} folder")
    if not chips.is_dir():
        raise InputError(f"The {what} chips do not exist yet: run the Data step first (or choose an {what} folder).")
    return chips
