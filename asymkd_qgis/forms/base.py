"""What the step forms of the dock share: the StepForm each step implements, and the small
widgets their rows are made of (spin boxes with a "default" value, More settings, backbones)."""

from __future__ import annotations

from typing import Any, Iterable

from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QLineEdit, QSpinBox

from .. import choices, steps
from ..errors import InputError
from ..layout import RunLayout
from ..persist import Persist
from ..results import StepResults
from ..runner import Prepared
from ..tasks import EngineJob
from ..widgets import ModelPicker, StepPanel


class StepForm:
    """One step's section of the dock: its rows, the job they prepare, and its results.

    The dock hosts the forms: it puts each one's Run/Cancel `panel` below its rows, runs what
    `prepare` returns, and hands the finished job to `show_results`.
    """

    step = ""

    def __init__(self, persist: Persist, panel: StepPanel):
        self.persist = persist
        self.panel = panel

    def build(self, form: QFormLayout) -> None:
        raise NotImplementedError

    def add_below_panel(self, form: QFormLayout) -> None:
        """Rows under the Run/Cancel panel (none by default)."""

    def prepare(self, run: RunLayout) -> Prepared:
        """The step's job from the rows; InputError when they do not make one. Writes nothing."""
        raise NotImplementedError

    def apply_choices(self, found: choices.EngineChoices) -> None:
        """Offer what the engine names (backbones, methods, losses), with its defaults."""

    def show_results(self, run: RunLayout, job: EngineJob, prepared: Prepared) -> None:
        """A finished step's results, read from the run folder by its spec."""
        reader = steps.SPECS[self.step].read_results
        if reader is not None:
            show(self.panel, reader(run))


def show(panel: StepPanel, shown: StepResults) -> None:
    panel.show_results(metrics=shown.rows, links=shown.links, image=shown.image, note=shown.note)


# -- rows -----------------------------------------------------------------------------------
def spin(low: int, high: int, value: int, suffix: str = "", special: str = "") -> QSpinBox:
    """An integer box; `special` is shown at the minimum (e.g. "default": the engine's)."""
    box = QSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    if suffix:
        box.setSuffix(suffix)
    if special:
        box.setSpecialValueText(special)
    return box


def dspin(low: float, high: float, value: float, decimals: int = 2, step: float = 0.1,
          special: str = "") -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(low, high)
    box.setDecimals(decimals)
    box.setSingleStep(step)
    box.setValue(value)
    if special:
        box.setSpecialValueText(special)
    return box


def combo(items: Iterable[str], editable: bool = False) -> QComboBox:
    box = QComboBox()
    box.addItems(list(items))
    box.setEditable(editable)
    return box


def layer_combo(filters: Any) -> QgsMapLayerComboBox:
    """Layers of a kind, starting with none chosen."""
    box = QgsMapLayerComboBox()
    box.setFilters(filters)
    box.setAllowEmptyLayer(True)
    box.setLayer(None)
    return box


def refill(box: QComboBox, names: tuple[str, ...], about: dict[str, str] | None = None) -> None:
    """Replace a combo's items (an empty name reads "default": the engine's), keeping the
    current choice where it still exists."""
    current = box.currentIndex()
    text = (box.itemData(current) or box.currentText()) if current >= 0 else ""
    box.blockSignals(True)
    box.clear()
    for name in names:
        box.addItem(name or "default", name)
        if about and about.get(name):
            box.setItemData(box.count() - 1, about[name], Qt.ItemDataRole.ToolTipRole)
    box.setCurrentIndex(max(box.findData(text), 0))
    box.blockSignals(False)


def settings_edit(persist: Persist, key: str, placeholder: str) -> QLineEdit:
    """More settings: engine configuration keys passed as --set."""
    edit = persist.bind(key, QLineEdit())
    edit.setPlaceholderText(placeholder)
    edit.setToolTip("Engine configuration keys as KEY=VALUE, separated by spaces (passed as --set)")
    return edit


def settings_list(edit: QLineEdit) -> list[str]:
    try:
        return steps.parse_settings(edit.text())
    except ValueError as exc:
        raise InputError(f"More settings: {exc}") from exc


# -- the network a step trains ------------------------------------------------------------------
def model_picker(persist: Persist, section: str) -> ModelPicker:
    picker = ModelPicker(section)
    persist.bind(f"{section}/backbone", picker.backbone)
    persist.bind(f"{section}/pretrained", picker.pretrained)
    picker.set_choices(choices.cached())
    return picker


def input_size(persist: Persist, section: str) -> QSpinBox:
    """Input size in pixels; at the minimum (-1) the engine's default."""
    box = persist.bind(f"{section}/input_size", spin(-1, 1024, -1, " px", "default"))
    box.setToolTip("Resize patches to this size inside the model (0 = as the patches are); "
                   "pretrained networks often gain from larger inputs, at more compute per patch")
    return box


def watch_weights(edit: QLineEdit, picker: ModelPicker) -> None:
    """A weights file given in More settings shows as the backbone's source."""
    key = f"{picker.section}.weights="
    edit.textChanged.connect(lambda text: picker.set_weights_file(key in text))
    picker.set_weights_file(key in edit.text())


def model_options(picker: ModelPicker, size: QSpinBox) -> steps.ModelOptions:
    return steps.ModelOptions(backbone=picker.name(), input_size=size.value() if size.value() >= 0 else None,
                              pretrained=picker.pretrained.isChecked())


def offer_model_choices(picker: ModelPicker, size: QSpinBox, found: choices.EngineChoices) -> None:
    """The engine's backbones, and its default input size where the box reads "default"."""
    picker.set_choices(found)
    default: Any = found.default(picker.section, "input_size")
    size.setSpecialValueText("default" if default is None else
                             f"default ({default} px)" if default else "default (as they are)")
