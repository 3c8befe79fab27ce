"""Step 3, Matcher and pairing: the MS/RGB matcher, then every RGB sample paired with an MS one."""

from __future__ import annotations

from qgis.PyQt.QtWidgets import QFormLayout, QLabel

from .. import choices, steps
from ..layout import RunLayout
from ..persist import Persist
from ..runner import Prepared
from ..widgets import StepPanel
from .base import StepForm, combo, refill, settings_edit, settings_list, spin
from .data import DataForm
from .teacher import TeacherForm


class MatcherForm(StepForm):
    step = "matcher"

    def __init__(self, persist: Persist, panel: StepPanel, data: DataForm, teacher: TeacherForm):
        super().__init__(persist, panel)
        self.data = data
        self.teacher = teacher  # its device

    def build(self, form: QFormLayout) -> None:
        self.epochs = self.persist.bind("matcher/epochs", spin(0, 1000, 0, special="default"))
        self.pair_method = self.persist.bind("matcher/method", combo(steps.PAIR_METHODS))
        self.settings = settings_edit(self.persist, "matcher/settings", "e.g. matcher.embed_dim=128")
        form.addRow("Matcher epochs", self.epochs)
        form.addRow("Pairing", self.pair_method)
        form.addRow("More settings", self.settings)
        note = QLabel("Same-target pairs come from the co-registered RGB raster of the Data "
                      "step; without one, pseudo-RGB is rendered from the MS bands.")
        note.setWordWrap(True)
        form.addRow(note)

    def apply_choices(self, found: choices.EngineChoices) -> None:
        refill(self.pair_method, found.names("pairing.method", steps.PAIR_METHODS), found.config.get("pairing.method"))

    def prepare(self, run: RunLayout) -> Prepared:
        steps.require_previous(run, "matcher")
        paired = run.rgb_paired if run.rgb_paired.is_dir() else None
        options = steps.MatcherOptions(epochs=self.epochs.value(), method=self.pair_method.currentText(),
                                       device=self.teacher.device.currentText(),
                                       settings=settings_list(self.settings))
        return Prepared(steps.SPECS["matcher"].title,
                        steps.matcher_commands(run.root, self.data.rgb_dir(run), options, paired))
