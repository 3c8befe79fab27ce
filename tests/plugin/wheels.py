"""Tiny stand-in wheels for installation tests: one per engine requirement (the same name and
version, a module that imports), so that creating an environment from a folder runs the real
pip and venv code paths in seconds and without network."""

from __future__ import annotations

import re
import subprocess
import zipfile
from pathlib import Path

from asymkd_qgis.requirements import pins
from conftest import REPO

TORCH_CODE = "__version__ = {version!r}\n\n\nclass version:\n    cuda = {cuda!r}\n"


def stub_wheel(folder: Path, name: str, version: str, code: str = "", tag: str = "py3-none-any",
               module: str | None = None) -> Path:
    """A wheel of `name` `version` whose package `module` (default: the name) holds `code`."""
    dist = re.sub(r"[-_.]+", "_", name)
    module = module or dist.lower()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-{tag}.whl"
    info = f"{dist}-{version}.dist-info"
    files = {f"{module}/__init__.py": code or f"__version__ = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: asymkd-tests\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for arcname, text in files.items():
            archive.writestr(arcname, text)
    return path


def stub_bundle_wheels(folder: Path) -> Path:
    """common/ (every requirement but torch), torch-cpu/ and torch-cuda/: an offline bundle's layout."""
    for name, version in pins(REPO / "backend" / "requirements.txt"):
        if name == "torch":
            stub_wheel(folder / "torch-cpu", name, f"{version}+cpu",
                       TORCH_CODE.format(version=f"{version}+cpu", cuda=None))
            stub_wheel(folder / "torch-cuda", name, version, TORCH_CODE.format(version=version, cuda="12.8"))
        elif name == "torchvision":
            stub_wheel(folder / "torch-cpu", name, f"{version}+cpu")
            stub_wheel(folder / "torch-cuda", name, version)
        else:
            stub_wheel(folder / "common", name, version)
    return folder


def engine_wheel(folder: Path) -> Path:
    """The real engine package as a wheel (as `make bundle` builds it)."""
    import sys
    sys.path.insert(0, str(REPO / "tools"))
    import bundle
    folder.mkdir(parents=True, exist_ok=True)
    return bundle.engine_wheel(folder, python=str(REPO / ".venv" / "bin" / "python"))


def offline_env() -> dict[str, str]:
    """Environment variables that make any network access of pip fail at once."""
    dead = "http://127.0.0.1:9"
    return {"PIP_INDEX_URL": f"{dead}/simple", "PIP_EXTRA_INDEX_URL": "", "http_proxy": dead, "https_proxy": dead,
            "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)
