"""Step 2, Teacher: the multispectral teacher trained on the MS samples of the Data step."""

from __future__ import annotations

from qgis.PyQt.QtWidgets import QFormLayout

from .. import choices, steps
from ..layout import RunLayout
from ..persist import Persist
from ..runner import Prepared
from ..widgets import StepPanel
from .base import (
    StepForm,
    combo,
    input_size,
    model_options,
    model_picker,
    offer_model_choices,
    settings_edit,
    settings_list,
    spin,
    watch_weights,
)
from .data import DataForm


class TeacherForm(StepForm):
    step = "teacher"

    def __init__(self, persist: Persist, panel: StepPanel, data: DataForm):
        super().__init__(persist, panel)
        self.data = data

    def build(self, form: QFormLayout) -> None:
        bind = self.persist.bind
        self.bands = bind("teacher/bands", combo(["sentinel2", "sentinel2-ordered", ""], editable=True))
        self.model = model_picker(self.persist, "teacher")
        self.input_size = input_size(self.persist, "teacher")
        self.epochs = bind("teacher/epochs", spin(0, 1000, 0, special="default"))
        # the matcher trains on the same device (the keys predate the per-step names)
        self.device = bind("device", combo(steps.DEVICES))
        self.seed = bind("seed", spin(0, 2**31 - 1, 0))
        self.settings = settings_edit(self.persist, "teacher/settings", "e.g. teacher.folds=0 teacher.lr=0.001")
        watch_weights(self.settings, self.model)
        form.addRow("MS band names", self.bands)
        form.addRow("Backbone", self.model)
        form.addRow("Input size", self.input_size)
        form.addRow("Epochs", self.epochs)
        form.addRow("Device", self.device)
        form.addRow("Seed", self.seed)
        form.addRow("More settings", self.settings)

    def apply_choices(self, found: choices.EngineChoices) -> None:
        offer_model_choices(self.model, self.input_size, found)

    def prepare(self, run: RunLayout) -> Prepared:
        options = steps.TeacherOptions(bands=self.bands.currentText().strip(),
                                       model=model_options(self.model, self.input_size),
                                       epochs=self.epochs.value(), device=self.device.currentText(),
                                       seed=self.seed.value(), settings=settings_list(self.settings))
        return Prepared(steps.SPECS["teacher"].title,
                        [steps.teacher_command(run.root, self.data.ms_dir(run), options)])
