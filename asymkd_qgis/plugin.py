"""The plugin object QGIS loads: toolbar action and menu, the dock, the Processing provider,
engine environment creation and diagnostics. `unload()` removes every one of them."""

from __future__ import annotations

import time

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QCoreApplication, Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QFileDialog, QMessageBox

try:  # Qt6 (QGIS 4) has QAction in QtGui, Qt5 in QtWidgets
    from qgis.PyQt.QtGui import QAction
except ImportError:
    from qgis.PyQt.QtWidgets import QAction

from . import envbuilder, envsetup, paths
from .engine import EngineUnavailable
from .notify import Notifier

MENU = "&AsymKD"


class AsymKDPlugin:
    def __init__(self, iface):
        self.iface = iface
        self.provider = None
        self.dock = None
        self.actions: list[QAction] = []
        self.builder: envbuilder.EnvironmentBuilder | None = None
        self.diagnostics = None
        self.notifier = Notifier(iface, create_environment=self.create_environment)

    # -- Processing (also called alone by qgis_process) -----------------------------------
    def initProcessing(self) -> None:
        if self.provider is None:
            from .processing_provider import AsymKDProvider
            self.provider = AsymKDProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    # -- GUI -----------------------------------------------------------------------------
    def initGui(self) -> None:
        self.initProcessing()
        from .dock import AsymKDDock
        self.dock = AsymKDDock(self.iface, self.notifier, self.iface.mainWindow())
        self.dock.hide()
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        icon = QIcon(paths.icon_path())
        self.dock_action = self._action(icon, "AsymKD", self.toggle_dock, toolbar=True, checkable=True)
        self.dock.visibilityChanged.connect(self.dock_action.setChecked)
        self._action(QIcon(paths.icon_path("environment.svg")), "Create engine environment...",
                     lambda _checked=False: self.create_environment())
        self._action(QIcon(paths.icon_path("environment.svg")), "Create engine environment from a folder...",
                     lambda _checked=False: self.create_environment_from_folder())
        self._action(QIcon(paths.icon_path("diagnostics.svg")), "Diagnostics...",
                     lambda _checked=False: self.show_diagnostics())
        self._action(QIcon(paths.icon_path()), "Review uncertain tiles...",
                     lambda _checked=False: self.review_uncertain())

    def _action(self, icon: QIcon, text: str, slot, toolbar: bool = False, checkable: bool = False) -> QAction:
        action = QAction(icon, text, self.iface.mainWindow())
        action.setObjectName(f"asymkd_{text.split('...')[0].strip().lower().replace(' ', '_')}")
        action.setCheckable(checkable)
        action.triggered.connect(slot)
        self.iface.addPluginToMenu(MENU, action)
        if toolbar:
            self.iface.addToolBarIcon(action)
        self.actions.append(action)
        return action

    def review_uncertain(self):
        """The review panel for the active (or last classified) AsymKD tile layer."""
        if self.dock is None:
            return None
        panel = self.dock.forms["classify"].open_review()
        if panel is None:
            self.notifier.warning("AsymKD", "No AsymKD tile layer to review: classify a raster first, or load "
                                  "a classified GeoPackage and select its tile layer in the Layers panel.")
        return panel

    def toggle_dock(self, checked: bool | None = None) -> None:
        if self.dock is None:
            return
        visible = not self.dock.isVisible() if checked is None else bool(checked)
        self.dock.setVisible(visible)
        if visible:
            self.dock.raise_()

    def unload(self) -> None:
        if self.dock is not None:
            self._stop_jobs(list(self.dock.jobs.values()))
            classify = self.dock.forms["classify"]
            if classify.review is not None:
                self.iface.removeDockWidget(classify.review)
                classify.review.release()
                classify.review = None
            self.iface.removeDockWidget(self.dock)
            self.dock.setParent(None)
            self.dock.deleteLater()
            self.dock = None
        if self.builder is not None:
            self.builder.cancel()
        for action in self.actions:
            self.iface.removePluginMenu(MENU, action)
            self.iface.removeToolBarIcon(action)
            action.setParent(None)
            action.deleteLater()
        self.actions.clear()
        if self.diagnostics is not None:
            if self.diagnostics.job is not None:  # the doctor's task reports to the dialog
                self._stop_jobs([self.diagnostics.job])
            self.diagnostics.close()
            self.diagnostics.deleteLater()
            self.diagnostics = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

    @staticmethod
    def _stop_jobs(jobs, timeout_s: float = 6.0) -> None:
        """Cancel running jobs and let their tasks end before the widgets they report to go."""
        running = [job for job in jobs if not job.done]
        for job in running:
            job.cancel()
        deadline = time.monotonic() + timeout_s
        while any(not job.done for job in running) and time.monotonic() < deadline:
            QCoreApplication.processEvents()
            time.sleep(0.02)

    # -- engine environment ------------------------------------------------------------------
    def create_environment(self, confirm: bool = True,
                           wheels: str | None = None) -> envbuilder.EnvironmentBuilder | None:
        """Create (or repair) the engine environment, from the package registry or, with
        `wheels`, from a folder of wheels / an unpacked offline bundle without downloading."""
        if self.builder is not None and not self.builder.done:
            self.notifier.info("AsymKD engine", "The engine environment is already being created.")
            return None
        try:
            plan = envsetup.default_plan(wheels=wheels)
        except EngineUnavailable as exc:
            self.notifier.error("AsymKD engine", str(exc), key="engine")
            return None
        if confirm:
            replace = " It replaces the environment that is there." if (plan.venv / "pyvenv.cfg").is_file() else ""
            size = "" if plan.offline else " This downloads several hundred MB to a few GB."
            answer = QMessageBox.question(
                self.iface.mainWindow(), "Create the AsymKD engine environment",
                f"Create a Python environment for the AsymKD engine in\n{plan.venv}\n\n"
                f"from {plan.base_python}, with {plan.describe()}?{replace}{size} It runs in the background; "
                "QGIS's own Python is not changed.")
            if answer != QMessageBox.StandardButton.Yes:
                return None
        self.builder = envbuilder.EnvironmentBuilder(plan)
        self.builder.builderFinished.connect(self._environment_done)
        if self.dock is not None:
            self.dock.track_builder(self.builder)
        self.notifier.info("AsymKD engine", f"Creating the engine environment in {plan.venv} (progress at the top "
                           "of the AsymKD dock and in the task bar).")
        return self.builder.start()

    def create_environment_from_folder(self) -> envbuilder.EnvironmentBuilder | None:
        folder = QFileDialog.getExistingDirectory(self.iface.mainWindow(),
                                                  "Folder of wheels or unpacked AsymKD offline bundle")
        return self.create_environment(wheels=folder) if folder else None

    def _environment_done(self, builder: envbuilder.EnvironmentBuilder) -> None:
        if builder.ok:
            self.notifier.success("AsymKD engine", builder.message, key="engine")
        elif builder.cancelled:
            self.notifier.info("AsymKD engine", builder.message)
        else:
            self.notifier.error("AsymKD engine", builder.message, key="engine")

    def show_diagnostics(self) -> None:
        from .diagnostics import DiagnosticsDialog
        if self.diagnostics is None:
            self.diagnostics = DiagnosticsDialog(self.create_environment, self.iface.mainWindow())
        self.diagnostics.show()
        self.diagnostics.raise_()
        self.diagnostics.refresh()
