"""Every bad input named in the engine's contract gives a clear error (exit 2), and leaves
nothing half-written."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from asymkd.cli import main
from tiny_data import TINY_CONFIG, make_dataset, write_ms


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    torch.set_num_threads(1)
    return make_dataset(tmp_path_factory.mktemp("tiny"), n_ms=4, n_rgb=4)


def _tiny_flags():
    t = TINY_CONFIG["teacher"]
    return ["--set", f"teacher.backbone={t['backbone']}", f"teacher.epochs={t['epochs']}", "teacher.folds=0",
            f"teacher.batch_size={t['batch_size']}"]


def _fails(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_dataset_folder(tmp_path, capsys):
    _fails(capsys, ["teacher", "--run", str(tmp_path / "r"), "--ms", str(tmp_path / "nope")],
           "does not exist")


def test_empty_class_folder(tmp_path, dataset, capsys):
    ms = tmp_path / "ms"
    shutil.copytree(dataset["ms"], ms)
    (ms / "Glacier").mkdir()
    _fails(capsys, ["teacher", "--run", str(tmp_path / "r"), "--ms", str(ms)], "Glacier", "no images")
    assert not (tmp_path / "r" / "teacher").exists()


def test_rgb_class_without_ms_samples_lists_the_classes(tmp_path, dataset, capsys):
    rgb = tmp_path / "rgb"
    shutil.copytree(dataset["rgb_train"], rgb)
    shutil.copytree(rgb / "Forest", rgb / "Glacier")
    shutil.copytree(rgb / "Forest", rgb / "Desert")
    run = tmp_path / "r"
    assert main(["teacher", "--run", str(run), "--ms", str(dataset["ms"]), *_tiny_flags()]) == 0
    _fails(capsys, ["pair", "--run", str(run), "--rgb", str(rgb)], "with no sample in the MS set",
           "Desert", "Glacier")


def test_band_count_differs_from_checkpoint(tmp_path, dataset, capsys):
    run = tmp_path / "r"
    assert main(["teacher", "--run", str(run), "--ms", str(dataset["ms"]), *_tiny_flags()]) == 0
    ms12 = tmp_path / "ms12"
    for path in dataset["ms"].rglob("*.tif"):
        write_ms(ms12 / path.parent.name / path.name, np.full((12, 16, 16), 1000))
    (run / "pairs").mkdir()
    np.savez(run / "pairs" / "pairs.npz", ms_index=np.zeros(12, dtype=np.int64), confidence=np.ones(12),
             rgb_stems=np.array(sorted(p.stem for p in dataset["rgb_train"].rglob("*.png"))))
    _fails(capsys, ["distill", "--run", str(run), "--ms", str(ms12), "--bands", "",
                    "--rgb", str(dataset["rgb_train"]), "--no-baseline"], "12 bands", "13")


def test_corrupt_image_names_the_file(tmp_path, dataset, capsys):
    ms = tmp_path / "ms"
    shutil.copytree(dataset["ms"], ms)
    (ms / "River" / "broken.tif").write_bytes(b"not a tiff at all")
    _fails(capsys, ["teacher", "--run", str(tmp_path / "r"), "--ms", str(ms)], "broken.tif")


def test_unknown_backbone_suggests_close_names(tmp_path, dataset, capsys):
    _fails(capsys, ["teacher", "--run", str(tmp_path / "r"), "--ms", str(dataset["ms"]),
                    "--backbone", "resnet81"], "unknown backbone 'resnet81'", "resnet18")


def test_fewer_than_two_classes(tmp_path, dataset, capsys):
    ms = tmp_path / "ms"
    shutil.copytree(dataset["ms"] / "Forest", ms / "Forest")
    _fails(capsys, ["teacher", "--run", str(tmp_path / "r"), "--ms", str(ms)], "at least 2")


def test_unknown_config_key_in_file_and_set(tmp_path, dataset, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("distill:\n  w_fet: 0.1\n")
    _fails(capsys, ["teacher", "--run", str(tmp_path / "r"), "--config", str(cfg)],
           "unknown config key 'distill.w_fet'", "w_feat")
    _fails(capsys, ["teacher", "--run", str(tmp_path / "r2"), "--set", "techer.epochs=3"],
           "unknown config key 'techer'", "teacher")
    toml = tmp_path / "cfg.toml"
    toml.write_text("[distill]\nepochs = 'many'\n")
    _fails(capsys, ["teacher", "--run", str(tmp_path / "r3"), "--config", str(toml)], "distill.epochs")


def test_unlabeled_ms_folder_is_refused(tmp_path, dataset, capsys):
    ms = tmp_path / "ms"
    ms.mkdir()
    for path in list(dataset["ms"].rglob("*.tif"))[:4]:
        shutil.copy(path, ms / path.name)
    _fails(capsys, ["teacher", "--run", str(tmp_path / "r"), "--ms", str(ms)], "no class folders")
