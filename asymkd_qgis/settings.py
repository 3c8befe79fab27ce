"""Plugin settings kept in QgsSettings under `asymkd/`.

The engine's Python can also be given by the environment variable ASYMKD_ENGINE_PYTHON
(tests, scripts, qgis_process on a server); it wins over the stored setting.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from qgis.core import QgsApplication, QgsSettings

PREFIX = "asymkd"
ENGINE_PYTHON_ENV = "ASYMKD_ENGINE_PYTHON"


def _key(name: str) -> str:
    return f"{PREFIX}/{name}"


def get(name: str, default: Any = None, type_: type | None = None) -> Any:
    settings = QgsSettings()
    if type_ is None:
        return settings.value(_key(name), default)
    value = settings.value(_key(name), default)
    try:
        if type_ is bool:
            return value in (True, "true", "True", "1", 1)
        return type_(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def put(name: str, value: Any) -> None:
    QgsSettings().setValue(_key(name), value)


def remove(name: str) -> None:
    QgsSettings().remove(_key(name))


def default_engine_dir() -> Path:
    """The engine environment the plugin creates: inside the QGIS profile folder."""
    return Path(QgsApplication.qgisSettingsDirPath()) / "asymkd" / "engine-env"


def venv_python(venv: Path) -> Path:
    if sys.platform == "win32":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def engine_python() -> Path:
    """The Python of the engine environment: env variable, then setting, then default venv."""
    from_env = os.environ.get(ENGINE_PYTHON_ENV, "").strip()
    if from_env:
        return Path(from_env)
    stored = get("engine/python", "", str)
    if stored:
        return Path(stored)
    return venv_python(default_engine_dir())


def set_engine_python(path: Path | str) -> None:
    put("engine/python", str(path))


def runs_dir() -> Path:
    stored = get("runs_dir", "", str)
    if stored:
        return Path(stored)
    return Path(QgsApplication.qgisSettingsDirPath()) / "asymkd" / "runs"
