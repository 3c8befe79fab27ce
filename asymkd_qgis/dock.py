"""The AsymKD dock: the whole loop in five steps (Data, Teacher, Matcher and pairing,
Distill, Classify), each with Run, Cancel, a progress bar and its results.

The dock hosts one form per step (forms/): it lays them out, and each Run turns a form's
rows into the step's job and starts it as a background EngineJob (tasks.py: exports first,
in the job's worker thread, then the engine). The form shows the results when it ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qgis.gui import QgsCollapsibleGroupBox, QgsFileWidget
from qgis.PyQt.QtCore import QSize, Qt, pyqtSignal
from qgis.PyQt.QtWidgets import QDockWidget, QFormLayout, QPushButton, QScrollArea, QVBoxLayout, QWidget

from . import choices, settings, steps
from .engine import WORKING, Engine, EngineState, EngineUnavailable
from .errors import InputError
from .forms import ClassifyForm, DataForm, DistillForm, MatcherForm, StepForm, TeacherForm
from .layout import RunLayout
from .notify import Notifier
from .persist import Persist
from .runner import Prepared
from .tasks import EngineJob
from .widgets import EngineBanner, StepPanel, guard_form, wrap_labels

STEPS = tuple(steps.SPECS)  # data, teacher, matcher, distill, classify
STEP_TITLES = {step: f"{number}. {steps.SPECS[step].title}" for number, step in enumerate(STEPS, 1)}
# Short enough for a narrow dock: "Run matcher", not "Run matcher and pairing".
RUN_LABELS = {"data": "Prepare data", "teacher": "Run teacher", "matcher": "Run matcher",
              "distill": "Run distill", "classify": "Run classify"}
# The width QGIS gives a new dock beside the map: the whole form fits it without a scrollbar.
DOCK_WIDTH = 300


class AsymKDDock(QDockWidget):
    """The dock widget. `run_step(name)` is what each Run button calls (tests call it too)."""

    jobFinished = pyqtSignal(str, object)  # step name, EngineJob

    def __init__(self, iface, notifier: Notifier | None = None, parent: QWidget | None = None):
        super().__init__("AsymKD", parent)
        self.setObjectName("AsymKDDock")
        self.iface = iface
        self.notifier = notifier or Notifier(iface)
        self.persist = Persist("dock")
        self.panels: dict[str, StepPanel] = {step: StepPanel(RUN_LABELS[step]) for step in STEPS}
        self.forms: dict[str, StepForm] = self._make_forms()
        self.jobs: dict[str, EngineJob] = {}
        self._chain: list[str] = []
        self.engine_factory: Callable[[], Engine] = Engine.from_settings
        self.engine_state: EngineState | None = None
        self.builder = None  # the engine environment being created, if any
        self._build()
        self.visibilityChanged.connect(lambda visible: visible and self.refresh_engine_state())

    def _make_forms(self) -> dict[str, StepForm]:
        data = DataForm(self.persist, self.panels["data"])
        teacher = TeacherForm(self.persist, self.panels["teacher"], data)
        return {"data": data, "teacher": teacher,
                "matcher": MatcherForm(self.persist, self.panels["matcher"], data, teacher),
                "distill": DistillForm(self.persist, self.panels["distill"], data),
                "classify": ClassifyForm(self.persist, self.panels["classify"], self.iface)}

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
        self.sections = {step: self._section(step) for step in STEPS}
        for section in self.sections.values():
            outer.addWidget(section)
        outer.addStretch(1)
        self.show_step("data")
        guard_form(body)
        scroll.setWidget(body)
        self.setWidget(scroll)

    def _section(self, step: str) -> QgsCollapsibleGroupBox:
        section = QgsCollapsibleGroupBox(STEP_TITLES[step])
        section.setObjectName(f"asymkd_step_{step}")
        form = QFormLayout(section)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.forms[step].build(form)
        wrap_labels(form)
        panel = self.panels[step]
        panel.run_button.clicked.connect(lambda _=False, s=step: self.run_step(s))
        panel.cancel_button.clicked.connect(lambda _=False, s=step: self.cancel_step(s))
        form.addRow(panel)
        self.forms[step].add_below_panel(form)
        return section

    def sizeHint(self) -> QSize:
        return QSize(DOCK_WIDTH, super().sizeHint().height())

    def show_step(self, step: str) -> None:
        """Expand one step's section and collapse the others."""
        for name, section in self.sections.items():
            section.setCollapsed(name != step)

    def apply_choices(self, found: choices.EngineChoices) -> None:
        """Offer the engine's backbones, pairing methods, losses and measures, with its defaults."""
        for form in self.forms.values():
            form.apply_choices(found)

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

    # -- running ---------------------------------------------------------------------------
    @property
    def layout_(self) -> RunLayout:
        path = self.run_dir.filePath().strip()
        if not path:
            raise InputError("No run folder chosen: pick a folder for this run's data and models.")
        return RunLayout(Path(path))

    def prepare(self, step: str) -> Prepared:
        """The step's job from its form (InputError on bad input); writes nothing."""
        return self.forms[step].prepare(self.layout_)

    def run_step(self, step: str) -> EngineJob | None:
        """Check the step's inputs and start its job; None (and a message) on bad input."""
        if step in self.jobs and not self.jobs[step].done:
            self.notifier.warning("AsymKD", f"{STEP_TITLES[step]} is already running.")
            return None
        panel = self.panels[step]
        self.persist.save_all()
        try:
            prepared = self.prepare(step)
            if not prepared.commands:
                panel.set_status("")
                panel.show_results(note="Nothing to prepare: the folders are used as they are.")
                self._continue_chain(step, True)
                return None
            engine = self.engine_factory()
            engine.check()
        except InputError as exc:
            self._refused(step, str(exc))
            return None
        except EngineUnavailable as exc:
            self._refused(step, exc.message, str(exc))
            self.refresh_engine_state()
            return None
        job = EngineJob(prepared.name, prepared.commands, engine, parent=self, pre_steps=prepared.pre_steps)
        job.progressChanged.connect(panel.set_progress)
        job.jobFinished.connect(lambda j, s=step, p=prepared: self._job_finished(s, j, p))
        self.jobs[step] = job
        panel.set_running(True, f"{prepared.name}: starting")
        return job.start()

    def _refused(self, step: str, status: str, engine_text: str = "") -> None:
        """A step that could not start: bad input, or (with `engine_text`) no usable engine."""
        self._chain.clear()
        self.panels[step].set_status(status, error=True)
        if engine_text:
            self.notifier.error("AsymKD engine", engine_text, offer_environment=True, key="engine")
        else:
            self.notifier.error(f"AsymKD {STEP_TITLES[step]}", status, show_log=False, key=step)

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
                self.forms[step].show_results(self.layout_, job, prepared)
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
            broken = job.environment_broken()
            self.notifier.error(f"AsymKD {STEP_TITLES[step]} failed", message, offer_environment=broken, key=step)
            if broken:
                self.refresh_engine_state()
        self.jobFinished.emit(step, job)
        self._continue_chain(step, ok)
