#!/usr/bin/env python3
"""Build the QGIS plugin zip and install it into a QGIS profile.

  tools/plugin_package.py zip [--out asymkd_qgis.zip]
  tools/plugin_package.py deploy [--zip asymkd_qgis.zip] [--profile default] [--profiles-dir DIR]

The zip holds one folder, asymkd_qgis/, as QGIS's "Install from ZIP" expects: the plugin
with metadata.txt, resources/ (icons, styles) and backend/ (the engine source and its pinned
requirements, which the plugin's "Create engine environment" installs). No tests, no caches.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "asymkd_qgis"
SKIP_DIRS = {"__pycache__", "tests", "build", "dist"}
SKIP_SUFFIXES = {".pyc", ".pyo", ".tmp", ".orig", ".rej"}


def _files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                             and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.suffix not in SKIP_SUFFIXES:
                yield path


def build_zip(out: Path) -> Path:
    sources = [(REPO / PLUGIN, Path(PLUGIN)), (REPO / "resources", Path(PLUGIN) / "resources"),
               (REPO / "backend" / "asymkd", Path(PLUGIN) / "backend" / "asymkd")]
    singles = [(REPO / "backend" / name, Path(PLUGIN) / "backend" / name)
               for name in ("requirements.txt", "pyproject.toml")]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for source, target in sources:
            if not source.is_dir():
                raise SystemExit(f"missing {source}")
            for path in _files(source):
                archive.write(path, (target / path.relative_to(source)).as_posix())
        for source, target in singles:
            if source.is_file():
                archive.write(source, target.as_posix())
    os.replace(tmp, out)
    return out


def default_profiles_dir() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home())) / "QGIS" / "QGIS3" / "profiles"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "QGIS" / "QGIS3" / "profiles"
    return Path.home() / ".local" / "share" / "QGIS" / "QGIS3" / "profiles"


def _enable(ini: Path) -> None:
    """Mark the plugin enabled in the profile's QGIS3.ini (QSettings format)."""
    ini.parent.mkdir(parents=True, exist_ok=True)
    try:
        from PyQt5.QtCore import QSettings
    except ImportError:  # no Qt here: append the key if the file has no such section yet
        text = ini.read_text(encoding="utf-8") if ini.is_file() else ""
        if f"{PLUGIN}=" not in text:
            ini.write_text(text + f"\n[PythonPlugins]\n{PLUGIN}=true\n", encoding="utf-8")
        return
    qsettings = QSettings(str(ini), QSettings.IniFormat)
    qsettings.setValue(f"PythonPlugins/{PLUGIN}", True)
    qsettings.sync()


def deploy(zip_path: Path, profiles_dir: Path, profile: str) -> Path:
    plugins = profiles_dir / profile / "python" / "plugins"
    target = plugins / PLUGIN
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    plugins.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(plugins)
    _enable(profiles_dir / profile / "QGIS" / "QGIS3.ini")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    z = sub.add_parser("zip", help="build the plugin zip")
    z.add_argument("--out", default=str(REPO / f"{PLUGIN}.zip"))
    d = sub.add_parser("deploy", help="install the zip into a QGIS profile and enable it")
    d.add_argument("--zip", default=str(REPO / f"{PLUGIN}.zip"))
    d.add_argument("--profiles-dir", default=str(default_profiles_dir()))
    d.add_argument("--profile", default="default")
    args = parser.parse_args(argv)
    if args.command == "zip":
        print(build_zip(Path(args.out)))
    else:
        if not Path(args.zip).is_file():
            raise SystemExit(f"{args.zip} does not exist: run `make package` first")
        print(deploy(Path(args.zip), Path(args.profiles_dir), args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
