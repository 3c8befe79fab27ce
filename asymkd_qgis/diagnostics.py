"""The diagnostics view: which engine Python the plugin uses, and what `asymkd doctor` says
about it (Python, torch, CUDA device used or why not, onnxruntime providers, versions, paths).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from qgis.core import Qgis
from qgis.PyQt.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QGridLayout,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from . import paths, settings
from .engine import Engine
from .runner import EngineCommand
from .tasks import EngineJob
from .widgets import plain_label


def plugin_rows() -> list[tuple[str, str]]:
    engine = Engine.from_settings()
    return [("plugin version", paths.plugin_version()), ("plugin folder", str(paths.PLUGIN_DIR)),
            ("QGIS", Qgis.QGIS_VERSION), ("QGIS Python (never used by the engine)", sys.version.split()[0]),
            ("engine Python", str(engine.python)), ("engine source", str(engine.source or "not bundled")),
            ("engine environment folder (default)", str(settings.default_engine_dir())),
            ("base Python (to create the environment)",
             settings.get("engine/base_python", "", str) or "found on the PATH")]


def doctor_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Flatten a doctor report into (name, value) rows, the important ones first."""
    rows: list[tuple[str, str]] = []
    device = report.get("device")
    if device:
        reason = report.get("cuda_reason")
        devices = ", ".join(report.get("cuda_devices") or [])
        rows.append(("device used",
                     f"{device}" + (f" ({devices})" if devices else "") + (f" - {reason}" if reason else "")))
    for key in ("python", "executable", "platform", "torch_cuda_build", "cuda_available", "cpu_threads",
                "onnxruntime_providers", "asymkd_path", "torch_error", "onnxruntime_error"):
        if key in report:
            value = report[key]
            rows.append((key, ", ".join(map(str, value)) if isinstance(value, list) else str(value)))
    for name, version in (report.get("packages") or {}).items():
        rows.append((f"package {name}", version or "missing"))
    shown = {k for k, _ in rows} | {"packages", "device", "cuda_reason", "cuda_devices"}
    for key, value in report.items():
        if key not in shown:
            rows.append((key, json.dumps(value) if isinstance(value, (dict, list)) else str(value)))
    return rows


class DiagnosticsDialog(QDialog):
    def __init__(self, create_environment: Callable[[], None] | None = None, parent=None):
        super().__init__(parent)
        self.setWindowTitle("AsymKD diagnostics")
        self.resize(720, 520)
        self.create_environment = create_environment
        self.job: EngineJob | None = None
        self.report: dict[str, Any] | None = None
        self.state = None  # the engine's EngineState at the last refresh
        layout = QVBoxLayout(self)
        self.status = plain_label()
        layout.addWidget(self.status)
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["", "value"])
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.verticalHeader().hide()
        layout.addWidget(self.table)
        buttons = QGridLayout()
        self.refresh_button = QPushButton("Run doctor")
        self.refresh_button.clicked.connect(self.refresh)
        self.choose_button = QPushButton("Choose engine Python...")
        self.choose_button.clicked.connect(self.choose_python)
        self.base_button = QPushButton("Choose base Python...")
        self.base_button.setToolTip("The system Python 3.11+ that Create engine environment builds the "
                                    "environment from")
        self.base_button.clicked.connect(self.choose_base_python)
        self.create_button = QPushButton("Create engine environment")
        self.create_button.clicked.connect(self._create)
        for i, button in enumerate((self.refresh_button, self.choose_button, self.base_button, self.create_button)):
            buttons.addWidget(button, i // 2, i % 2)
        layout.addLayout(buttons)
        close = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        close.rejected.connect(self.reject)
        layout.addWidget(close)
        self._show_rows(plugin_rows())

    def _show_rows(self, rows: list[tuple[str, str]]) -> None:
        self.table.setRowCount(len(rows))
        for i, (key, value) in enumerate(rows):
            self.table.setItem(i, 0, QTableWidgetItem(key))
            self.table.setItem(i, 1, QTableWidgetItem(value))
        self.table.resizeColumnToContents(0)

    def rows(self) -> dict[str, str]:
        return {self.table.item(i, 0).text(): self.table.item(i, 1).text() for i in range(self.table.rowCount())}

    def refresh(self) -> EngineJob | None:
        self._show_rows(plugin_rows())
        engine = Engine.from_settings()
        self.state = engine.state()
        if not self.state.working and not engine.python.exists():
            self.status.setText(f"{self.state.message}\n{self.state.hint}")
            return None
        self.status.setText("Running asymkd doctor (importing torch takes a few seconds)...")
        self.refresh_button.setEnabled(False)
        self.job = EngineJob("Diagnostics", [EngineCommand(["doctor"], "doctor")], engine, parent=self)
        self.job.jobFinished.connect(self._doctor_done)
        return self.job.start()

    def _doctor_done(self, job: EngineJob) -> None:
        self.refresh_button.setEnabled(True)
        report = next((e.get("report") for o in job.outcomes for e in o.events if e.get("event") == "doctor"), None)
        if job.state != EngineJob.OK or not isinstance(report, dict):
            self.status.setText(f"The engine did not answer: {job.message()}\n{self.state.message}")
            return
        self.report = report
        self._show_rows(plugin_rows() + doctor_rows(report))
        # Works = has what the engine needs (a doctor that answers is not enough).
        errors = [str(report[key]) for key in ("torch_error", "onnxruntime_error") if report.get(key)]
        if not self.state.working:
            self.status.setText(f"{self.state.message}\n{self.state.hint}")
        elif errors:
            self.status.setText(f"The engine environment is broken: {'; '.join(errors)}\n{self.state.hint}")
        else:
            self.status.setText("The engine environment works.")

    def choose_python(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Python of the engine environment", str(settings.engine_python()))
        if path:
            settings.set_engine_python(path)
            self.refresh()

    def choose_base_python(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "System Python 3.11+ to create the engine environment from",
                                              settings.get("engine/base_python", "", str))
        if path:
            settings.put("engine/base_python", path)
            self._show_rows(plugin_rows() + (doctor_rows(self.report) if self.report else []))

    def _create(self) -> None:
        if self.create_environment is not None:
            self.create_environment()
