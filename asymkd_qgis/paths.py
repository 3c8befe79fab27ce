"""Where the plugin's own files are: icons, styles, and the engine source it runs.

In the repository the plugin folder sits beside `resources/` and `backend/`; in the
installed zip both are copied inside the plugin folder. Look inside first, then beside.
"""

from __future__ import annotations

from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent


def _inside_or_beside(name: str) -> Path:
    inside = PLUGIN_DIR / name
    return inside if inside.is_dir() else PLUGIN_DIR.parent / name


def resources_dir() -> Path:
    return _inside_or_beside("resources")


def engine_source_dir() -> Path | None:
    """The folder that holds the `asymkd` package (bundled `backend/`), or None."""
    folder = _inside_or_beside("backend")
    return folder if (folder / "asymkd" / "cli.py").is_file() else None


def requirements_file() -> Path | None:
    source = engine_source_dir()
    if source is None:
        return None
    path = source / "requirements.txt"
    return path if path.is_file() else None


def icon_path(name: str = "asymkd.svg") -> str:
    return str(resources_dir() / "icons" / name)


def plugin_version() -> str:
    for line in (PLUGIN_DIR / "metadata.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("version="):
            return line.split("=", 1)[1].strip()
    return "unknown"
