"""Step 4, Distill: the RGB student distilled from the teacher over the matcher's pairs."""

from __future__ import annotations

from qgis.PyQt.QtWidgets import QCheckBox, QComboBox, QFormLayout

from .. import choices, settings, steps
from ..layout import RunLayout
from ..persist import Persist
from ..runner import Prepared
from ..widgets import StepPanel
from .base import (
    StepForm,
    combo,
    dspin,
    input_size,
    model_options,
    model_picker,
    offer_model_choices,
    refill,
    settings_edit,
    settings_list,
    spin,
    watch_weights,
)
from .data import DataForm

# Loss weights: at the minimum (-1) a weight reads "default" and is left to the engine.
WEIGHTS = (("w_feat", "Weight: feature alignment", 0.05), ("w_pseudo", "Weight: teacher pseudo-labels", 0.1),
           ("w_gt", "Weight: ground truth", 0.1))


class DistillForm(StepForm):
    step = "distill"

    def __init__(self, persist: Persist, panel: StepPanel, data: DataForm):
        super().__init__(persist, panel)
        self.data = data  # its test samples

    def build(self, form: QFormLayout) -> None:
        bind = self.persist.bind
        self.model = model_picker(self.persist, "distill")
        self.input_size = input_size(self.persist, "distill")
        self.epochs = bind("distill/epochs", spin(0, 1000, 0, special="default"))
        self.repair_every = bind("distill/repair_every", spin(0, 100000, 0, " steps", "default"))
        self.w_feat, self.w_pseudo, self.w_gt = (bind(f"distill/{key}", dspin(-1.0, 100.0, -1.0, 3, step, "default"))
                                                 for key, _, step in WEIGHTS)
        self.domain_loss = QComboBox()
        refill(self.domain_loss, ("",) + steps.DOMAIN_LOSSES)
        bind("distill/domain_loss", self.domain_loss)
        self.device = bind("distill/device", combo(steps.DEVICES))
        self.settings = settings_edit(self.persist, "distill/settings", "e.g. distill.temperature=4 distill.lr=0.001")
        watch_weights(self.settings, self.model)
        self.baseline = bind("distill/baseline", QCheckBox("Train the baseline too"))
        self.baseline.setToolTip("The same student trained without distillation, for comparison")
        self.baseline.setChecked(settings.get("dock/distill/baseline", True, bool))
        form.addRow("Student backbone", self.model)
        form.addRow("Input size", self.input_size)
        form.addRow("Epochs", self.epochs)
        form.addRow("Re-pair every", self.repair_every)
        for (_, label, _), box in zip(WEIGHTS, (self.w_feat, self.w_pseudo, self.w_gt), strict=True):
            form.addRow(label, box)
        form.addRow("Domain-shift loss", self.domain_loss)
        form.addRow("Device", self.device)
        form.addRow("More settings", self.settings)
        form.addRow(self.baseline)

    def apply_choices(self, found: choices.EngineChoices) -> None:
        offer_model_choices(self.model, self.input_size, found)
        refill(self.domain_loss, ("",) + found.names("distill.domain_loss", steps.DOMAIN_LOSSES),
               found.config.get("distill.domain_loss"))

    def prepare(self, run: RunLayout) -> Prepared:
        steps.require_previous(run, "distill")
        options = steps.DistillOptions(model=model_options(self.model, self.input_size),
                                       domain_loss=self.domain_loss.currentData() or "",
                                       epochs=self.epochs.value(), repair_every=self.repair_every.value(),
                                       w_feat=self.w_feat.value(), w_pseudo=self.w_pseudo.value(),
                                       w_gt=self.w_gt.value(), baseline=self.baseline.isChecked(),
                                       device=self.device.currentText(), settings=settings_list(self.settings))
        return Prepared(steps.SPECS["distill"].title,
                        [steps.distill_command(run.root, options, self.data.test_dir(run))])
