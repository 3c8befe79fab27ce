"""Fixtures for the plugin tests: real QGIS offscreen (pytest-qgis), the plugin loaded into
the test iface, small map layers, a fake engine for job control tests and the real engine
for the end-to-end tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FAKE_ENGINE_SOURCE = HERE / "fake_engine"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
for folder in (HERE, REPO / "tools"):  # the test helpers, and the offscreen QGIS helpers of the tools
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
# The engine environment used by the tests: the repository's engine venv unless given.
os.environ.setdefault("ASYMKD_ENGINE_PYTHON", str(REPO / ".venv" / "bin" / "python"))

from qgis.core import QgsProject, QgsRasterLayer, QgsSettings, QgsVectorLayer  # noqa: E402
from qgis.PyQt.QtCore import QCoreApplication  # noqa: E402

import mapdata  # noqa: E402
from asymkd_qgis.engine import Engine  # noqa: E402
from qgis_headless import wait_until  # noqa: E402


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> float:
    """Process Qt events until predicate() holds; returns the seconds it took."""
    return wait_until(predicate, timeout, what, pause=0.02)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as stopped
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(autouse=True)
def clean_settings():
    QgsSettings().remove("asymkd")
    yield
    QgsSettings().remove("asymkd")


@pytest.fixture
def fake_engine(monkeypatch) -> Callable[[str], Engine]:
    """fake_engine(mode) -> an Engine that runs the fake CLI in that mode."""
    def make(mode: str = "ok") -> Engine:
        monkeypatch.setenv("FAKE_ENGINE_MODE", mode)
        # QGIS's Python has no torch: the fake engine needs only its own package.
        return Engine(python=Path(sys.executable), source=FAKE_ENGINE_SOURCE, required=("asymkd",))
    return make


@pytest.fixture
def plugin(qgis_iface, qgis_new_project):
    from asymkd_qgis.plugin import AsymKDPlugin
    instance = AsymKDPlugin(qgis_iface)
    instance.initGui()
    qgis_iface.messageBar().clear_messages()
    yield instance
    instance.unload()
    QCoreApplication.processEvents()


@pytest.fixture
def dock(plugin):
    return plugin.dock


@pytest.fixture
def layers(tmp_path):
    """Small layers added to the project: ms (13 bands), rgb (3), gray (1), and label layers."""
    cells = [(r, c, "Forest" if (r + c) % 2 else "River") for r in range(2) for c in range(2)]
    paths = {
        "ms": mapdata.write_raster(tmp_path / "ms.tif", 13, dtype=mapdata.np.uint16),
        "rgb": mapdata.write_raster(tmp_path / "rgb.tif", 3),
        "gray": mapdata.write_raster(tmp_path / "gray.tif", 1),
        "labels": mapdata.write_labels(tmp_path / "labels.gpkg", cells),
        "one_class": mapdata.write_labels(tmp_path / "one_class.gpkg", [(r, c, "Forest") for r, c, _ in cells]),
        "elsewhere": mapdata.write_labels(tmp_path / "elsewhere.gpkg", cells,
                                          origin=(mapdata.ORIGIN[0] + 50000, mapdata.ORIGIN[1])),
    }
    out = {}
    for name, path in paths.items():
        layer = (QgsVectorLayer(str(path), name, "ogr") if path.suffix == ".gpkg"
                 else QgsRasterLayer(str(path), name, "gdal"))
        assert layer.isValid(), path
        QgsProject.instance().addMapLayer(layer)
        out[name] = layer
    return out


# -- the real engine --------------------------------------------------------------------
def engine_python() -> Path:
    return Path(os.environ["ASYMKD_ENGINE_PYTHON"])


def engine_commands_missing(*commands: str) -> list[str]:
    folder = REPO / "backend" / "asymkd" / "commands"
    return [c for c in commands if not (folder / f"{c}.py").is_file()]


@pytest.fixture(scope="session")
def real_engine() -> Engine:
    python = engine_python()
    if not python.exists():
        pytest.skip(f"the engine environment {python} does not exist (run `make env`)")
    from asymkd_qgis import paths
    return Engine(python=python, source=paths.engine_source_dir())


def require_commands(*commands: str) -> None:
    missing = engine_commands_missing(*commands)
    if missing:
        pytest.skip(f"engine command(s) not implemented yet: {', '.join(missing)}")


# A freshly initialised student: enough to check the map plumbing (accuracy is the benchmark's job).
MODEL_CLASSES = ["Forest", "River", "Urban"]
MODEL_TILE = 32
_MAKE_MODEL = """
import sys, torch
from asymkd.models.backbones import SceneClassifier
from asymkd.models.files import save_model
from asymkd.models.metadata import ModelMeta
torch.manual_seed(0)
model = SceneClassifier("resnet18_w32", 3, {n})
save_model(sys.argv[1], model, ModelMeta(backbone="resnet18_w32", class_names={classes!r}, band_names=["R", "G", "B"],
           mean=[120.0, 120.0, 120.0], std=[60.0, 60.0, 60.0], patch_size={tile}, gsd=10.0))
"""


@pytest.fixture(scope="session")
def tiny_model(real_engine, tmp_path_factory) -> Path:
    """An exported ONNX model of MODEL_CLASSES on RGB tiles of MODEL_TILE pixels."""
    import subprocess

    from asymkd_qgis.engine import run_engine
    require_commands("export")
    folder = tmp_path_factory.mktemp("model")
    student = folder / "student"
    code = _MAKE_MODEL.format(n=len(MODEL_CLASSES), classes=MODEL_CLASSES, tile=MODEL_TILE)
    subprocess.run([str(real_engine.python), "-c", code, str(student)], env=real_engine.env(), check=True,
                   capture_output=True, timeout=300)
    out = folder / "tiny model é.onnx"
    outcome = run_engine(real_engine, ["export", str(student), "--out", str(out), "--check-samples", "4"])
    assert outcome.ok, outcome.message() + "\n" + "\n".join(outcome.stderr_tail)
    return out
