"""Form values kept in QgsSettings: each bound widget is restored when it is bound and saved
whenever it changes, so the dock opens as the user left it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from qgis.core import QgsProject
from qgis.gui import QgsFieldComboBox, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox, QWidget

from . import settings
from .widgets import SourcePicker


class Persist:
    """Keeps form values in QgsSettings (asymkd/dock/<key>): restored on build, saved on change."""

    def __init__(self, group: str = "dock"):
        self.group = group
        self.widgets: dict[str, QWidget] = {}

    def _key(self, key: str) -> str:
        return f"{self.group}/{key}"

    def bind(self, key: str, widget: QWidget) -> QWidget:
        self.widgets[key] = widget
        self.restore(key)
        signal = _change_signal(widget)
        if signal is not None:
            signal.connect(partial(self._save_on_change, key))
        return widget

    def _save_on_change(self, key: str, *_signal_args: object) -> None:
        self.save(key)

    def save(self, key: str) -> None:
        value = _value(self.widgets[key])
        if value is not None:
            settings.put(self._key(key), value)

    def save_all(self) -> None:
        for key in self.widgets:
            self.save(key)

    def restore(self, key: str) -> None:
        stored = settings.get(self._key(key), None)
        if stored is not None:
            _set_value(self.widgets[key], stored)


@dataclass(frozen=True)
class _Binding:
    """How Persist watches, reads and restores one kind of widget."""
    kind: type
    signal: Callable[[Any], Any]
    get: Callable[[Any], Any]
    set: Callable[[Any, Any], None]


def _layer_id(widget: QgsMapLayerComboBox) -> str:
    layer = widget.currentLayer()
    return layer.id() if layer is not None else ""


def _set_layer(widget: QgsMapLayerComboBox, value: Any) -> None:
    layer = QgsProject.instance().mapLayer(str(value)) if value else None
    if layer is not None:
        widget.setLayer(layer)


def _set_choice(widget: QComboBox, value: Any) -> None:
    if widget.isEditable() or widget.findText(str(value)) >= 0:
        widget.setCurrentText(str(value))


# The first kind a widget is an instance of wins: the layer and field combo boxes are QComboBoxes.
_BINDINGS = (
    _Binding(QSpinBox, lambda w: w.valueChanged, lambda w: w.value(), lambda w, v: w.setValue(int(float(v)))),
    _Binding(QDoubleSpinBox, lambda w: w.valueChanged, lambda w: w.value(), lambda w, v: w.setValue(float(v))),
    _Binding(QgsMapLayerComboBox, lambda w: w.layerChanged, _layer_id, _set_layer),
    _Binding(QgsFieldComboBox, lambda w: w.fieldChanged, lambda w: w.currentField(),
             lambda w, v: w.setField(str(v))),
    _Binding(QComboBox, lambda w: w.currentTextChanged, lambda w: w.currentText(), _set_choice),
    _Binding(QLineEdit, lambda w: w.textChanged, lambda w: w.text(), lambda w, v: w.setText(str(v))),
    _Binding(QCheckBox, lambda w: w.toggled, lambda w: w.isChecked(),
             lambda w, v: w.setChecked(v in (True, "true", "True", "1", 1))),
    _Binding(QgsFileWidget, lambda w: w.fileChanged, lambda w: w.filePath(), lambda w, v: w.setFilePath(str(v))),
    _Binding(SourcePicker, lambda w: w.mode.currentTextChanged, lambda w: w.kind(),
             lambda w, v: w.mode.setCurrentText(str(v))),
)


def _binding(widget: QWidget) -> _Binding | None:
    return next((b for b in _BINDINGS if isinstance(widget, b.kind)), None)


def _change_signal(widget: QWidget):
    binding = _binding(widget)
    return binding.signal(widget) if binding is not None else None


def _value(widget: QWidget) -> Any:
    binding = _binding(widget)
    return binding.get(widget) if binding is not None else None


def _set_value(widget: QWidget, value: Any) -> None:
    binding = _binding(widget)
    if binding is not None:
        with contextlib.suppress(TypeError, ValueError):  # a stored value of another type: keep the default
            binding.set(widget, value)
