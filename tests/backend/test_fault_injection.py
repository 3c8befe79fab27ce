"""Fault injection: tampered model files, weights and checkpoints; writes over a file-size
limit; SIGTERM and kill -9 at random (seeded) moments of synth and chips.

The promises: a user or environment fault exits 2 with a message (never 1, never 0 with a
wrong result); a kill leaves the old state or the new one, and a re-run cleans up after it.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import rasterio
import torch
from onnx import numpy_helper
from rasterio.transform import from_origin
from safetensors.torch import save_file

from asymkd import cli
from asymkd.export import export_onnx
from asymkd.models.backbones import SceneClassifier
from asymkd.models.files import save_model
from asymkd.models.metadata import ModelMeta
from asymkd.models.onnx_file import META_KEY
from tiny_data import make_dataset, write_rgb

torch.set_num_threads(1)
CLASSES = ["A", "B", "C"]
META = {"backbone": "resnet18_w16", "class_names": CLASSES, "band_names": ["R", "G", "B"],
        "mean": [100.0, 100.0, 100.0], "std": [50.0, 50.0, 50.0], "patch_size": 16, "gsd": 10.0}
WORLD = ["--size", "16", "--ms-per-class", "6", "--rgb-per-class", "6", "--test-per-class", "2",
         "--classes", "4", "--paired", "4"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    """Temporary files and folders (hidden, with a pid) anywhere under `folder`."""
    return sorted(str(p) for p in folder.rglob(".*") if any(k in p.name for k in (".tmp-", ".partial", ".old-")))


def _asymkd(args: list[str], fsize: int | None = None, **popen) -> subprocess.Popen:
    """`python -m asymkd ARGS` in a subprocess, optionally under a file-size limit."""
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "asymkd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=limit, **popen)


def _run(args: list[str], fsize: int | None = None) -> tuple[int, str]:
    proc = _asymkd(args, fsize)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny student folder, its ONNX export, a raster and a labeled RGB folder for it."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("fi_model")
    net = SceneClassifier("resnet18_w16", 3, 3)
    net.head.weight.data *= 20
    folder = save_model(root / "student", net, ModelMeta(**META))
    onnx_path = export_onnx(folder, root / "student.onnx", check_samples=4).path
    raster = root / "scene.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=48, height=48, count=3, dtype="uint8",
                       crs="EPSG:32632", transform=from_origin(500000, 5200000, 10, 10)) as dst:
        dst.write(np.random.default_rng(0).integers(0, 255, (3, 48, 48), dtype=np.uint8))
    for i, name in enumerate(CLASSES):
        write_rgb(root / "data" / name / f"{name}.png", np.full((3, 16, 16), 60 * i + 40))
    return {"folder": folder, "onnx": onnx_path, "raster": raster, "data": root / "data"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two synthetic worlds of different seeds (old and new state) and the chips of one."""
    root = tmp_path_factory.mktemp("fi_world")
    code, err = _run(["synth", "--out", str(root / "old"), "--seed", "0", *WORLD])
    assert code == 0, err
    code, err = _run(["synth", "--out", str(root / "new"), "--seed", "1", *WORLD])
    assert code == 0, err
    return root


# -- tampered model folders (meta.json, weights) -------------------------------------------------
def _nan_weights(folder: Path) -> None:
    net = SceneClassifier("resnet18_w16", 3, 3)
    net.head.bias.data[:] = math.nan
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))


def _other_architecture(folder: Path) -> None:
    net = SceneClassifier("resnet18_w16", 3, 5)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))


META_TAMPERS = {
    "short mean": {"mean": [100.0]}, "nan std": {"std": [50.0, math.nan, 50.0]}, "zero std": {"std": [0, 1, 1]},
    "negative gsd": {"gsd": -10.0}, "huge patch": {"patch_size": 10 ** 9}, "zero patch": {"patch_size": 0},
    "text patch": {"patch_size": "16"}, "more bands than names": {"in_chans": 4},
    "huge classes": {"num_classes": 10 ** 9}, "huge input size": {"input_size": 10 ** 7},
    "duplicate classes": {"class_names": ["A", "A", "C"]},
    "escape in class": {"class_names": ["A", "B", "\x1b]0;x\x07"]},
    "classes not a list": {"class_names": "ABC"}, "no backbone": {"backbone": None},
    "unknown backbone": {"backbone": "resnet9000"},
}
FILE_TAMPERS = {
    "meta not json": lambda f: (f / "meta.json").write_text("{"),
    "meta binary": lambda f: (f / "meta.json").write_bytes(os.urandom(256)),
    "meta a list": lambda f: (f / "meta.json").write_text("[]"),
    "meta missing field": lambda f: (f / "meta.json").write_text(
        json.dumps({k: v for k, v in json.loads((f / "meta.json").read_text()).items() if k != "mean"})),
    "weights garbage": lambda f: (f / "model.safetensors").write_bytes(os.urandom(512)),
    "weights truncated": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
    "weights empty": lambda f: (f / "model.safetensors").write_bytes(b""),
    "weights missing": lambda f: (f / "model.safetensors").unlink(),
    "weights nan": _nan_weights,
    "weights of another model": _other_architecture,
}


def _tampered_folder(model, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / "student"
    shutil.copytree(model["folder"], folder)
    if name in META_TAMPERS:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, **META_TAMPERS[name]}))
    else:
        FILE_TAMPERS[name](folder)
    return folder


@pytest.mark.parametrize("name", list(META_TAMPERS) + list(FILE_TAMPERS))
def test_tampered_model_folder_is_exit_2(model, tmp_path, capsys, name):
    folder = _tampered_folder(model, tmp_path, name)
    assert cli.main(["evaluate", "--model", str(folder), "--data", str(model["data"]),
                     "--out", str(tmp_path / "eval")]) == 2
    assert cli.main(["export", str(folder), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("hint:") == 2 and "\x1b" not in err, err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "eval").exists() and not _leftovers(tmp_path)


# -- tampered ONNX files --------------------------------------------------------------------------
def _with_meta(proto, **change):
    prop = next(p for p in proto.metadata_props if p.key == META_KEY)
    meta = json.loads(prop.value)
    meta.update(change)
    for key in [k for k, v in change.items() if v is None]:
        del meta[key]
    prop.value = json.dumps(meta)


def _nan_initializer(proto) -> None:
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(init).copy()
    arr[...] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))


ONNX_TAMPERS = {
    "short mean": lambda p: _with_meta(p, mean=[100.0]),
    "more classes than outputs": lambda p: _with_meta(p, class_names=["A", "B", "C", "D"]),
    "too few colours": lambda p: _with_meta(p, class_colors=["#000000"]),
    "negative gsd": lambda p: _with_meta(p, gsd=-10.0),
    "huge patch": lambda p: _with_meta(p, patch_size=10 ** 9),
    "more bands than the graph": lambda p: _with_meta(p, band_names=["R", "G", "B", "N"], mean=[1.0] * 4,
                                                      std=[1.0] * 4),
    "no class names": lambda p: _with_meta(p, class_names=None),
    "newer format": lambda p: _with_meta(p, format_version=99),
    "metadata not json": lambda p: setattr(next(m for m in p.metadata_props if m.key == META_KEY), "value", "{"),
    "no metadata": lambda p: p.metadata_props.__delitem__(slice(None)),
    "nan weights": _nan_initializer,
}
RAW_TAMPERS = {
    "truncated": lambda b: b[: len(b) // 2],
    "garbage": lambda b: os.urandom(4096),
    "empty": lambda b: b"",
}


@pytest.mark.parametrize("name", list(ONNX_TAMPERS) + list(RAW_TAMPERS))
def test_tampered_onnx_file_is_exit_2(model, tmp_path, capsys, name):
    path = tmp_path / "m.onnx"
    if name in ONNX_TAMPERS:
        proto = onnx.load(str(model["onnx"]))
        ONNX_TAMPERS[name](proto)
        path.write_bytes(proto.SerializeToString())
    else:
        path.write_bytes(RAW_TAMPERS[name](model["onnx"].read_bytes()))
    out = tmp_path / "out" / "t.gpkg"
    assert cli.main(["classify", str(path), str(model["raster"]), "--out", str(out),
                     "--class-raster", str(tmp_path / "out" / "c.tif")]) == 2
    assert "hint:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# -- weights files and checkpoints given to training --------------------------------------------
class _Payload:
    """Unpickling it would create a folder: proof that code from the file ran."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.fixture(scope="module")
def tiny_ms(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("fi_data"), n_ms=3, n_rgb=2)["ms"]


WEIGHTS_FILES = {
    "garbage.safetensors": lambda p: p.write_bytes(os.urandom(300)),
    "payload.pth": lambda p: torch.save({"w": _Payload(p.parent / "ran")}, p),
    "list.pth": lambda p: torch.save([torch.zeros(2)], p),
    "truncated.pth": lambda p: (torch.save({"w": torch.zeros(100)}, p), p.write_bytes(p.read_bytes()[:200])),
}


@pytest.mark.parametrize("name", list(WEIGHTS_FILES))
def test_bad_weights_file_is_exit_2_without_unsafe_advice(tiny_ms, tmp_path, capsys, name):
    path = tmp_path / name
    WEIGHTS_FILES[name](path)
    code = cli.main(["teacher", "--run", str(tmp_path / "r"), "--ms", str(tiny_ms), "--bands", "sentinel2",
                     "--set", "teacher.backbone=resnet18_w16", "teacher.epochs=1", "teacher.folds=0",
                     f"teacher.weights={path}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert name in err and "weights_only" not in err and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("content", [b"", b"garbage" * 50, "list"])
def test_damaged_checkpoint_is_exit_2(tiny_ms, tmp_path, capsys, content):
    run = tmp_path / "r"
    (run / "teacher").mkdir(parents=True)
    ckpt = run / "teacher" / "checkpoint.pt"
    if content == "list":
        torch.save([1, 2, 3], ckpt)
    else:
        ckpt.write_bytes(content)
    code = cli.main(["teacher", "--run", str(run), "--ms", str(tiny_ms), "--bands", "sentinel2", "--resume",
                     "--set", "teacher.backbone=resnet18_w16", "teacher.epochs=1", "teacher.folds=0"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "weights_only" not in err


# -- writes over a file-size limit ---------------------------------------------------------------
def test_synth_over_the_file_size_limit(tmp_path):
    code, err = _run(["synth", "--out", str(tmp_path / "w"), *WORLD], fsize=4096)
    assert code == 2, err
    assert "file-size limit" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists() and not _leftovers(tmp_path)


def test_chips_over_the_file_size_limit(world, tmp_path):
    out = tmp_path / "chips"
    code, err = _run(["chips", "--raster", str(world / "old" / "map" / "ms_scene.tif"), "--labels",
                      str(world / "old" / "map" / "ms_labels.gpkg"), "--size", "16", "--out", str(out)], fsize=2048)
    assert code == 2, err
    assert "file-size limit" in err and not out.exists() and not _leftovers(tmp_path)


def test_classify_and_export_over_the_file_size_limit(model, tmp_path):
    out = tmp_path / "t.gpkg"
    code, err = _run(["classify", str(model["onnx"]), str(model["raster"]), "--out", str(out)], fsize=20_000)
    assert code == 2, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []
    code, err = _run(["export", str(model["folder"]), "--out", str(tmp_path / "m.onnx")], fsize=50_000)
    assert code == 2, err
    assert "file-size limit" in err and list(tmp_path.iterdir()) == []


# -- kills at random moments ----------------------------------------------------------------------
def _kill_at(args: list[str], delay: float, sig: int) -> tuple[int, str]:
    """Start a command, send `sig` `delay` seconds after its first event (once Python has
    started and the CLI handles signals), and return the exit code and the suffix of its
    temporary names ('-PID')."""
    proc = _asymkd([*args, "--events", "-"])
    proc.stdout.readline()
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.communicate(timeout=120)
    return proc.returncode, f"-{proc.pid}"


def _own(leftovers: list[str], pid: str) -> list[str]:
    # a kill -9 leaves its temporaries until the next run cleans them; a cancel leaves none
    return [p for p in leftovers if pid in Path(p).name]


def _kill_trials(args: list[str], out: Path, states: list[dict[str, bytes]], seed: int) -> None:
    """SIGTERM and SIGKILL at seeded random moments: after each, `out` is absent or one of
    `states`; after a SIGTERM nothing temporary is left; a final full run cleans up."""
    rng = random.Random(seed)
    for trial in range(6):
        sig = signal.SIGTERM if trial % 2 == 0 else signal.SIGKILL
        code, pid = _kill_at(args, rng.uniform(0.0, 1.0), sig)
        assert code in (0, 130, -signal.SIGKILL), code
        now = _files(out) if out.exists() else None
        assert now is None or now in states, f"trial {trial}: a mixed or half-written state"
        if code in (0, 130):
            assert not _own(_leftovers(out.parent), pid)
    code, err = _run(args)
    assert code == 0, err
    assert _files(out) == states[-1] and not _leftovers(out.parent)


def test_kills_during_synth_leave_the_old_world_or_the_new(world, tmp_path):
    out = tmp_path / "w"
    shutil.copytree(world / "old", out)
    states = [_files(world / "old"), _files(world / "new")]
    _kill_trials(["synth", "--out", str(out), "--seed", "1", *WORLD], out, states, seed=9)


def test_kills_during_chips_leave_the_old_chips_or_the_new(world, tmp_path):
    maps = world / "new" / "map"
    args = ["chips", "--raster", str(maps / "ms_scene.tif"), "--labels", str(maps / "ms_labels.gpkg"),
            "--pair-raster", str(maps / "rgb_scene.tif")]
    old, new = tmp_path / "old", tmp_path / "new"
    assert _run([*args, "--size", "8", "--out", str(old / "c"), "--pair-out", str(old / "p")])[0] == 0
    assert _run([*args, "--size", "16", "--out", str(new / "c"), "--pair-out", str(new / "p")])[0] == 0
    out = tmp_path / "work"
    shutil.copytree(old, out)
    rng = random.Random(3)
    for trial in range(6):
        sig = signal.SIGTERM if trial % 2 == 0 else signal.SIGKILL
        code, pid = _kill_at([*args, "--size", "16", "--out", str(out / "c"), "--pair-out", str(out / "p")],
                             rng.uniform(0.0, 0.8), sig)
        assert code in (0, 130, -signal.SIGKILL), code
        for sub in ("c", "p"):
            assert _files(out / sub) in (_files(old / sub), _files(new / sub)), f"trial {trial}: {sub} mixed"
        if code in (0, 130):
            assert not _own(_leftovers(out), pid)
    assert _run([*args, "--size", "16", "--out", str(out / "c"), "--pair-out", str(out / "p")])[0] == 0
    assert _files(out) == _files(new) and not _leftovers(out)


def test_kills_during_classify_leave_no_output_or_the_whole_one(model, tmp_path):
    raster = tmp_path / "big.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=1024, height=1024, count=3, dtype="uint8",
                       crs="EPSG:32632", transform=from_origin(500000, 5200000, 10, 10)) as dst:
        dst.write(np.random.default_rng(1).integers(0, 255, (3, 1024, 1024), dtype=np.uint8))
    out = tmp_path / "out"
    args = ["classify", str(model["onnx"]), str(raster), "--out", str(out / "t.gpkg"), "--class-raster",
            str(out / "c.tif"), "--overwrite", "--batch-size", "16", "--threads", "1"]
    outputs = ["c.tif", "t.gpkg", "t.qml", "t_areas.csv"]  # class raster, tiles, style, area table
    rng = random.Random(5)
    for trial in range(4):
        sig = signal.SIGTERM if trial % 2 == 0 else signal.SIGKILL
        code, pid = _kill_at(args, rng.uniform(0.0, 1.0), sig)
        assert code in (0, 130, -signal.SIGKILL), code
        finals = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.exists() else []
        assert finals in ([], outputs), finals
        if code in (0, 130):
            assert not _own(_leftovers(out), pid)
    code, err = _run(args)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == outputs


@pytest.mark.parametrize("resolution", ["0.00001", "inf", "nan"])
def test_an_absurd_chip_resolution_is_refused(world, tmp_path, capsys, resolution):
    maps = world / "old" / "map"
    assert cli.main(["chips", "--raster", str(maps / "ms_scene.tif"), "--labels", str(maps / "ms_labels.gpkg"),
                     "--size", "16", "--resolution", resolution, "--out", str(tmp_path / "c")]) == 2
    assert "--resolution" in capsys.readouterr().err and not (tmp_path / "c").exists()
