"""The cross-sensor case: RGB of another patch size, no same-target pairs, and RGB labels for
only some of the teacher's classes. The student learns the classes of its RGB labels; the
teacher's output is restricted to them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from asymkd import config as config_mod
from asymkd.data.patches import load_folder
from asymkd.pipeline import resolve_config, run_all
from tiny_data import TINY_CONFIG, make_dataset, write_rgb


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """MS of three classes at 16 px; RGB of two of them at 24 px, from another 'sensor'."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cross")
    paths = make_dataset(root)
    rng = np.random.default_rng(1)
    for split, n in (("rgb_train", 8), ("rgb_test", 4)):
        shutil.rmtree(paths[split])
        for c, name in enumerate(["Forest", "River"]):
            for i in range(n):
                write_rgb(paths[split] / name / f"{name}_{split}_{i}.jpg", rng.normal(90 + 60 * c, 25, (3, 24, 24)))
    return paths


def test_restrict_classes_keeps_the_named_classes_in_their_order(tmp_path):
    paths = make_dataset(tmp_path, n_ms=2)
    ms = load_folder(paths["ms"], "ms", bands="sentinel2")
    sub = ms.restrict_classes(["Urban", "Forest"])
    assert sub.class_names == ["Urban", "Forest"] and len(sub) == 4
    assert [s.split("_")[0] for s in sub.stems] == ["Forest", "Forest", "Urban", "Urban"]
    assert sub.labels.tolist() == [1, 1, 0, 0]
    with pytest.raises(Exception, match="Lake"):
        ms.restrict_classes(["Lake"])


def _run(tmp_path, dataset, **distill):
    run = tmp_path / "run"
    data = {"ms": str(dataset["ms"]), "rgb": str(dataset["rgb_train"]), "rgb_test": str(dataset["rgb_test"])}
    values = config_mod.merge(TINY_CONFIG, {"data": data, "distill": distill})
    run_all(resolve_config(run, None, values), run)
    return run


def test_the_student_learns_the_classes_of_its_rgb_labels(tmp_path, dataset):
    run = _run(tmp_path, dataset)
    meta = json.loads((run / "student" / "meta.json").read_text())
    assert meta["class_names"] == ["Forest", "River"] and meta["patch_size"] == 24
    assert json.loads((run / "teacher" / "meta.json").read_text())["class_names"] == ["Forest", "River", "Urban"]
    student = json.loads((run / "student" / "metrics.json").read_text())
    # the MS samples of the two classes (6 each) train as RGB rows though sizes differ and
    # there are no pairs: true colour resampled to 24 px on the RGB set's colour scale
    assert student["summary"]["ms_rows"] == 12 and student["summary"]["ms_rows_source"] == "pseudo-rgb"
    assert student["test"]["class_names"] == ["Forest", "River"] and student["test"]["n"] == 8
    assert json.loads((run / "baseline" / "meta.json").read_text())["class_names"] == ["Forest", "River"]
    pairs = np.load(run / "pairs" / "pairs.npz")
    assert pairs["ms_index"].max() < 12  # partners among the student's classes' MS samples


def test_all_teacher_classes_on_request(tmp_path, dataset):
    run = _run(tmp_path, dataset, all_teacher_classes=True)
    meta = json.loads((run / "student" / "meta.json").read_text())
    assert meta["class_names"] == ["Forest", "River", "Urban"]


def test_the_students_ground_resolution_for_rgb_patches_without_a_georeference(tmp_path, dataset):
    import io

    from asymkd.config import ConfigError
    from asymkd.events import Events
    from asymkd.train.distill import student_gsd
    ms = load_folder(dataset["ms"], "ms", bands="sentinel2")
    rgb = load_folder(dataset["rgb_train"], "rgb", class_names=ms.class_names)  # PNG: no georeference
    assert ms.gsd and rgb.gsd is None
    assert student_gsd(rgb, ms) == ms.gsd  # same patch size: the MS sensor's, quietly
    assert student_gsd(rgb, ms, rgb_gsd=0.5) == 0.5
    rgb.images = np.repeat(np.repeat(rgb.images, 2, axis=2), 2, axis=3)  # another camera's larger patches
    stream = io.StringIO()
    assert student_gsd(rgb, ms, 0.0, Events(stream=stream, progress_bars=False)) == ms.gsd
    assert "--rgb-gsd" in stream.getvalue()
    with pytest.raises(ConfigError, match="rgb_gsd"):
        config_mod.from_dict({"data": {"rgb_gsd": -1.0}})
