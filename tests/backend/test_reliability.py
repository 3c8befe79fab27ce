"""Reliability promises: atomic writers, validated model metadata, non-finite data refused,
class names that cannot collide or carry control characters."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from asymkd import cli, fileio
from asymkd.data import synth
from asymkd.data.mapchips import check_folder_names, safe_name
from asymkd.data.patches import load_folder
from asymkd.errors import DataError, ModelFileError
from asymkd.models.metadata import ModelMeta, check_graph_shapes, validate_meta
from tiny_data import write_ms, write_rgb

torch.set_num_threads(1)
TINY_WORLD = dict(size=16, ms_per_class=2, rgb_per_class=2, test_per_class=1, unlabeled_per_class=1,
                  paired=2, classes=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _hidden_siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# -- fileio ----------------------------------------------------------------------------------
def test_temp_path_renames_on_success_and_removes_on_failure(tmp_path):
    final = tmp_path / "sub" / "a.bin"
    with fileio.temp_path(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".a.bin.tmp-")
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new"
    for exc in (RuntimeError("disk"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), fileio.temp_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise exc
        assert final.read_bytes() == b"new" and _hidden_siblings(final) == []


def test_atomic_writers_write_exactly_the_path(tmp_path):
    fileio.atomic_write_text(tmp_path / "t.json", "{}")
    fileio.atomic_save_npy(tmp_path / "a.npy", np.arange(3))
    fileio.atomic_save_npz(tmp_path / "b.npz", x=np.ones(2))
    assert (tmp_path / "t.json").read_text() == "{}"
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 2]
    assert np.load(tmp_path / "b.npz")["x"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npz", "t.json"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / f".x.npy.tmp-{dead}.npy").write_bytes(b"half")
    (tmp_path / f".d.partial-{dead}").mkdir()
    (tmp_path / f".x.npy.tmp-{os.getppid()}.npy").write_bytes(b"busy")  # a live process's: kept
    fileio.atomic_save_npy(tmp_path / "x.npy", np.zeros(1))
    with fileio.staged_dir(tmp_path / "d") as stage:
        (stage / "f").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".x.npy.tmp-{os.getppid()}.npy", "d", "x.npy"]


def test_staged_dir_replaces_a_folder_in_one_step_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(RuntimeError), fileio.staged_dir(final) as stage:
        (stage / "new").write_text("new")
        raise RuntimeError("cancelled")
    assert _files(final) == {"old": b"old"} and _hidden_siblings(final) == []
    with fileio.staged_dir(final) as stage:
        (stage / "new").write_text("new")
    assert _files(final) == {"new": b"new"} and _hidden_siblings(final) == []


# -- synth -----------------------------------------------------------------------------------
def test_failed_synth_keeps_the_old_world_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "w"
    synth.make_world(out, synth.SynthConfig(**TINY_WORLD))
    before = _files(out)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # as a Ctrl-C or SIGTERM while the scenes are written

    monkeypatch.setattr(synth, "_write_labels", boom)
    with pytest.raises(KeyboardInterrupt):
        synth.make_world(out, synth.SynthConfig(**{**TINY_WORLD, "seed": 5}))
    assert _files(out) == before and _hidden_siblings(out) == []


def test_synth_into_the_working_directory_and_an_interrupted_fill(tmp_path, monkeypatch):
    out = tmp_path / "w"
    out.mkdir()
    monkeypatch.chdir(out)
    synth.make_world(Path("."), synth.SynthConfig(**TINY_WORLD))
    assert (out / "world.json").is_file() and Path.cwd() == out
    # a folder a killed fill left behind is recognised as a world and replaced
    (out / "world.json").unlink()
    (out / synth.INCOMPLETE).touch()
    synth.make_world(Path("."), synth.SynthConfig(**TINY_WORLD))
    assert (out / "world.json").is_file() and not (out / synth.INCOMPLETE).exists()


def test_synth_refuses_to_delete_foreign_files_and_huge_worlds(tmp_path, capsys):
    out = tmp_path / "w"
    synth.make_world(out, synth.SynthConfig(**TINY_WORLD))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="notes.txt"):
        synth.make_world(out, synth.SynthConfig(**TINY_WORLD))
    assert cli.main(["synth", "--out", str(tmp_path / "big"), "--ms-per-class", "1000000000"]) == 2
    assert cli.main(["synth", "--out", str(tmp_path / "big"), "--size", "512", "--ms-per-class", "90000"]) == 2
    assert "GiB" in capsys.readouterr().err and not (tmp_path / "big").exists()


# -- class names -----------------------------------------------------------------------------
def test_chip_classes_that_share_a_folder_are_refused():
    check_folder_names(["Forest", "River"])
    with pytest.raises(DataError, match="'a/b', 'a:b', 'a\\*b'|a_b"):
        check_folder_names(["a/b", "a:b", "a*b", "Forest"])
    with pytest.raises(DataError, match="Forest"):
        check_folder_names(["Forest", "forest"])
    assert safe_name("Red\x1b[31m\x9b") == "Red_[31m_"


def test_class_folder_with_control_characters_is_refused(tmp_path):
    for name in ("Forest", "Bad\x1b[31mName"):
        write_rgb(tmp_path / name / "a.png", np.full((3, 8, 8), 100))
    with pytest.raises(DataError) as info:
        load_folder(tmp_path, "rgb")
    assert "\\x1b" in info.value.message and "\x1b" not in info.value.message


# -- non-finite pixels -----------------------------------------------------------------------
def _float_tif(path: Path, data: np.ndarray) -> None:
    write_ms(path, data, dtype="float32")


def test_nan_pixels_in_a_patch_folder_are_refused_naming_the_files(tmp_path):
    good = np.full((4, 8, 8), 0.3)
    bad = good.copy()
    bad[:, :4, :4] = np.nan  # NaN as nodata, common in float GeoTIFFs
    _float_tif(tmp_path / "A" / "a1.tif", good)
    _float_tif(tmp_path / "A" / "a2.tif", bad)
    _float_tif(tmp_path / "B" / "b1.tif", good * 2)
    _float_tif(tmp_path / "B" / "b2.tif", np.where(bad > 0, np.inf, 0.0))
    with pytest.raises(DataError) as info:
        load_folder(tmp_path, "ms")
    assert "a2.tif" in info.value.message and "b2.tif" in info.value.message
    assert "a1.tif" not in info.value.message and info.value.hint


# -- model metadata --------------------------------------------------------------------------
META = {"backbone": "resnet18_w16", "class_names": ["A", "B", "C"], "band_names": ["R", "G", "B"],
        "mean": [1.0, 2.0, 3.0], "std": [1.0, 1.0, 1.0], "patch_size": 32, "gsd": 10.0}


@pytest.mark.parametrize("change", [
    {"mean": [1.0, 2.0]}, {"std": [1.0, 0.0, 1.0]}, {"mean": [1.0, math.nan, 3.0]}, {"std": "1"},
    {"gsd": -10.0}, {"gsd": math.inf}, {"patch_size": 10 ** 9}, {"patch_size": 0}, {"patch_size": "32"},
    {"patch_size": True}, {"in_chans": 4}, {"num_classes": 10 ** 9}, {"class_names": ["A", "A", "B"]},
    {"class_names": ["A", "B\x1b[2J"]}, {"class_names": "ABC"}, {"class_names": []}, {"band_names": [1, 2, 3]},
    {"backbone": None}, {"input_size": -1}, {"input_size": 10 ** 6},
])
def test_bad_metadata_is_a_model_file_error(change):
    with pytest.raises(ModelFileError) as info:
        validate_meta({**META, **change}, "x/meta.json")
    assert "x/meta.json" in info.value.message and info.value.hint


@pytest.mark.parametrize("key", ["backbone", "class_names", "band_names", "mean", "std", "patch_size"])
def test_missing_metadata_field_is_named(key):
    meta = {k: v for k, v in META.items() if k != key}
    with pytest.raises(ModelFileError, match=key):
        validate_meta(meta, "m")


def test_good_metadata_and_graph_shapes():
    assert validate_meta(META, "m")["in_chans"] == 3
    meta = ModelMeta.from_json({**META, "kind": "student", "input_size": 0, "gsd": None}, "m")
    assert meta.in_chans == 3 and meta.num_classes == 3
    check_graph_shapes(meta, ["batch", 3, "height", "width"], ["batch", 3], "m.onnx")
    with pytest.raises(ModelFileError, match="4 outputs"):
        check_graph_shapes(meta, ["batch", 3, "h", "w"], ["batch", 4], "m.onnx")
    with pytest.raises(ModelFileError, match="takes 13"):
        check_graph_shapes(meta, ["batch", 13, "h", "w"], ["batch", 3], "m.onnx")
    with pytest.raises(ModelFileError, match="colour"):
        validate_meta({**META, "class_colors": ["#000000"]}, "m.onnx", onnx=True)


# -- non-finite models -----------------------------------------------------------------------
def test_a_model_with_nan_weights_is_refused_by_evaluate_and_export(tmp_path, capsys):
    from asymkd.models.backbones import SceneClassifier
    from asymkd.models.files import save_model
    net = SceneClassifier("resnet18_w16", 3, 3)
    net.head.weight.data[:] = math.nan
    folder = save_model(tmp_path / "student", net, ModelMeta(**META))
    write_rgb(tmp_path / "data" / "A" / "a.png", np.full((3, 32, 32), 100))
    write_rgb(tmp_path / "data" / "B" / "b.png", np.full((3, 32, 32), 50))
    assert cli.main(["evaluate", "--model", str(folder), "--data", str(tmp_path / "data")]) == 2
    assert cli.main(["export", str(folder), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("not finite") == 2 and not (tmp_path / "m.onnx").exists()


def test_parity_check_fails_on_nan_probabilities():
    from torch import nn

    from asymkd.export import _parity, _to_onnx_bytes

    class NanModel(nn.Module):
        def forward(self, x):
            p = x.mean(dim=(2, 3)) * math.nan
            return p, p

    batch = np.ones((4, 3, 8, 8), np.float32)
    module = NanModel().eval()
    assert math.isnan(_parity(module, _to_onnx_bytes(module, batch[:2], 17), batch, torch))


# -- shared tiny model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 3-band, 3-class student (patch 16) and its ONNX export, plus a 64x64 RGB raster."""
    from asymkd.export import export_onnx
    from asymkd.models.backbones import SceneClassifier
    from asymkd.models.files import save_model
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_model")
    meta = ModelMeta(**{**META, "patch_size": 16})
    folder = save_model(root / "student", SceneClassifier("resnet18_w16", 3, 3), meta)
    onnx_path = export_onnx(folder, root / "student.onnx", check_samples=4).path
    raster = root / "scene.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8",
                       crs="EPSG:32632", transform=from_origin(500000, 5200000, 10, 10)) as dst:
        dst.write(np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8))
    return folder, onnx_path, raster


# -- classify: options, outputs --------------------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (["--tile", "0"], "--tile 0"), (["--stride", "0"], "--stride 0"), (["--tile", "1000000"], "--tile"),
    (["--batch-size", "100000000"], "--batch-size 100000000"), (["--tile", "4096", "--batch-size", "4096"], "GiB"),
    (["--bbox=nan,0,1,1"], "finite"), (["--threads", "100000"], "--threads 100000"),
    (["--streams", "-1"], "--streams -1"), (["--streams", "100000"], "--streams 100000"),
])
def test_classify_refuses_absurd_options_up_front(tiny_model, tmp_path, capsys, flags, needle):
    _, onnx_path, raster = tiny_model
    out = tmp_path / "t.gpkg"
    assert cli.main(["classify", str(onnx_path), str(raster), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and "hint:" in err and list(tmp_path.iterdir()) == []


def test_classify_refuses_an_output_that_is_an_input(tiny_model, tmp_path, capsys):
    _, onnx_path, raster = tiny_model
    before = raster.read_bytes()
    assert cli.main(["classify", str(onnx_path), str(raster), "--out", str(tmp_path / "t.gpkg"),
                     "--class-raster", str(raster), "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err and raster.read_bytes() == before


def test_commit_never_replaces_an_output_another_run_wrote(tmp_path):
    from asymkd.classify.writer import AtomicOutputs
    from asymkd.errors import ConfigError
    out, qml = tmp_path / "t.gpkg", tmp_path / "t.qml"
    with pytest.raises(ConfigError, match="another run"), AtomicOutputs([out, qml]) as outputs:
        outputs.temp(out).write_text("mine")
        outputs.temp(qml).write_text("mine")
        qml.write_text("theirs")  # the other run committed first
        outputs.commit()
    assert qml.read_text() == "theirs" and not out.exists()  # nothing of this run is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.qml"]


def test_rotated_raster_resolution_is_the_true_pixel_size():
    from affine import Affine

    from asymkd.classify.grid import pixel_size
    assert pixel_size(Affine.rotation(30) * Affine.scale(10, -10)) == pytest.approx(10.0)


# -- export and evaluate: options and output folders -----------------------------------------
@pytest.mark.parametrize("flags,needle",
                         [(["--opset", "3"], "--opset 3"), (["--check-samples", "0"], "--check-samples 0")])
def test_export_refuses_bad_options(tiny_model, tmp_path, capsys, flags, needle):
    folder, _, _ = tiny_model
    assert cli.main(["export", str(folder), "--out", str(tmp_path / "m.onnx"), *flags]) == 2
    assert needle in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_unwritable_output_folders_are_refused_before_the_work(tiny_model, tmp_path, capsys):
    folder, _, _ = tiny_model
    (tmp_path / "afile").write_text("x")
    write_rgb(tmp_path / "data" / "A" / "a.png", np.full((3, 16, 16), 100))
    write_rgb(tmp_path / "data" / "B" / "b.png", np.full((3, 16, 16), 50))
    assert cli.main(["evaluate", "--model", str(folder), "--data", str(tmp_path / "data"),
                     "--out", str(tmp_path / "afile" / "eval")]) == 2
    assert cli.main(["export", str(folder), "--out", str(tmp_path / "afile" / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("is a file, not a folder") == 2 and "evaluating" not in err


# -- the CLI's edge ----------------------------------------------------------------------------
def test_events_into_a_missing_folder_is_exit_2(tmp_path, capsys):
    code = cli.main(["synth", "--out", str(tmp_path / "w"), "--events", str(tmp_path / "no" / "e.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "no" in err and "e.jsonl" in err and "hint:" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_os_errors_are_storage_errors_naming_path_and_cause():
    import errno

    from asymkd.errors import storage_error
    fault = storage_error(OSError(errno.ENOSPC, "No space left on device", "/data/.x.tif.tmp-12.tif"))
    assert fault.message == "cannot write or read /data/x.tif: the disk is full" and fault.hint
    wrapped = RuntimeError("sqlite3_exec(COMMIT) failed: database or disk is full")
    assert "disk is full" in storage_error(wrapped).message
    torch_like = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert storage_error(torch_like) is not None
    assert storage_error(ValueError("bad value")) is None


def test_every_exit_2_error_has_a_hint(tmp_path, capsys):
    assert cli.main(["run", "--out", str(tmp_path / "r")]) == 2  # raised without a hint of its own
    assert "hint:" in capsys.readouterr().err


def test_sigterm_after_success_keeps_exit_0(tmp_path):
    code = ("import atexit, os, signal, sys\n"
            "from asymkd import cli\n"
            "atexit.register(os.kill, os.getpid(), signal.SIGTERM)  # while Python shuts down\n"
            "rc = cli.main()\n"
            "os.kill(os.getpid(), signal.SIGTERM)  # after the command, before the exit\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, "doctor"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# -- weights files -----------------------------------------------------------------------------
def test_unreadable_weights_files_are_model_file_errors(tmp_path):
    from asymkd.models.statefile import read_state_dict
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    torch.save({"a": 1}, tmp_path / "nontensor.pth")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(64))
    (tmp_path / "garbage.pth").write_bytes(os.urandom(64))
    torch.save({"a": Path("x")}, tmp_path / "objects.pth")  # refused by the safe loader
    for name in ("list.pth", "nontensor.pth", "garbage.safetensors", "garbage.pth", "objects.pth"):
        with pytest.raises(ModelFileError) as info:
            read_state_dict(tmp_path / name)
        assert name in info.value.message and "weights_only" not in str(info.value), str(info.value)
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ckpt.pth")
    assert read_state_dict(tmp_path / "ckpt.pth")["w"].tolist() == [1.0, 1.0]


def test_binary_config_file_is_refused_while_reading_the_arguments(tmp_path, capsys):
    binary = tmp_path / "model.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SystemExit) as info:
        cli.main(["teacher", "--run", str(tmp_path / "r"), "--config", str(binary)])
    assert info.value.code == 2 and "not a text file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_export_check_data_with_other_bands_does_not_blame_bands(tiny_model, tmp_path, capsys):
    folder, _, _ = tiny_model
    for name in ("A", "B"):
        path = tmp_path / "ms" / name / f"{name}.tif"
        path.parent.mkdir(parents=True)
        with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=4, dtype="uint16") as dst:
            dst.write(np.ones((4, 16, 16), np.uint16))
    assert cli.main(["export", str(folder), "--out", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "ms")]) == 2
    err = capsys.readouterr().err
    assert "4 bands" in err and "--bands" not in err


def test_export_check_batch_memory_is_bounded(tiny_model, tmp_path, monkeypatch):
    from asymkd import export
    folder, _, _ = tiny_model
    monkeypatch.setattr(export, "CHECK_BYTES", 3 * 3 * 16 * 16 * 4)  # room for three 16-px RGB patches
    result = export.export_onnx(folder, tmp_path / "m.onnx", check_samples=128)
    assert result.checked_samples == 3


def test_band_names_a_model_could_not_hold_are_refused_at_load(tmp_path):
    for name in ("A", "B"):
        path = tmp_path / name / f"{name}.tif"
        path.parent.mkdir(parents=True)
        with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=2, dtype="uint16") as dst:
            dst.write(np.ones((2, 8, 8), np.uint16))
            dst.descriptions = ("B04", "B08\nB8A")
    with pytest.raises(DataError, match="control characters"):
        load_folder(tmp_path, "ms")
    assert load_folder(tmp_path, "ms", bands="red,nir").band_names == ["red", "nir"]


def test_overwriting_commits_of_two_runs_never_mix_their_files(tmp_path):
    import threading

    from asymkd.classify.writer import AtomicOutputs
    finals = [tmp_path / "t.gpkg", tmp_path / "t.qml"]

    class Slow(AtomicOutputs):
        def _place(self, tmp, final):
            super()._place(tmp, final)
            time.sleep(self.pause)  # a slow file system between the two renames

    def commit(run: str, pause: float, start: float) -> None:
        time.sleep(start)
        outputs = Slow(finals, overwrite=True)
        outputs.temps = {p: p.with_name(f".{p.name}.{run}") for p in finals}  # two runs, one process
        outputs.pause = pause
        for final in finals:
            outputs.temp(final).write_text(run)
        outputs.commit()

    threads = [threading.Thread(target=commit, args=("A", 0.3, 0.0)),
               threading.Thread(target=commit, args=("B", 0.0, 0.1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {p.read_text() for p in finals} in ({"A"}, {"B"})


def test_a_sigterm_turned_into_another_error_by_an_extension_import_is_still_a_cancel(monkeypatch, capsys):
    """onnxruntime's import catches the SIGTERM's exception and raises ImportError instead:
    the command was cancelled, not broken (exit 130, no 'this is a bug')."""
    import signal

    from asymkd.commands import doctor

    def run(args, events):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except BaseException as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(doctor, "run", run)
    assert cli.main(["doctor"]) == 130
    err = capsys.readouterr().err
    assert "cancelled" in err and "bug" not in err
