"""Evaluation: metrics on hand-computed cases, figures, TTA, and `asymkd evaluate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asymkd.cli import main as cli_main
from asymkd.errors import DataError, ModelFileError
from asymkd.models.backbones import SceneClassifier
from asymkd.models.files import save_model
from asymkd.models.metadata import ModelMeta
from asymkd.train.common import normalize
from asymkd.train.evaluate import (
    classification_metrics,
    evaluate_model_folder,
    predict_probs,
    save_confusion_png,
    save_curves_png,
)

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- metrics -------------------------------------------------------------------------------

def test_metrics_hand_computed_with_a_class_never_predicted():
    # classes a, b, c; c is never predicted.
    y_true = [0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 1, 1, 1, 0, 1]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["n"] == 7
    assert m["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 1, 0]]
    assert m["overall_accuracy"] == pytest.approx(4 / 7)
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert a["f1"] == pytest.approx(2 / 3)
    assert (b["precision"], b["recall"]) == (pytest.approx(2 / 4), pytest.approx(1.0))
    assert b["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert c == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2, "predicted": 0}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0.0) / 3)
    assert [a["support"], b["support"]] == [3, 2]
    json.dumps(m, allow_nan=False)  # no NaN anywhere


def test_metrics_class_absent_from_labels_and_predictions_is_left_out_of_macro():
    m = classification_metrics([0, 1, 1], [0, 1, 0], ["a", "b", "unused"])
    assert m["per_class"]["unused"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                        "support": 0, "predicted": 0}
    f1_a = 2 * 0.5 * 1.0 / 1.5
    f1_b = 2 * 1.0 * 0.5 / 1.5
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    json.dumps(m, allow_nan=False)


def test_metrics_skip_unlabeled_and_handle_empty():
    m = classification_metrics([0, -1, 1], [0, 1, 1], ["a", "b"])
    assert m["n"] == 2 and m["overall_accuracy"] == 1.0 and m["macro_f1"] == 1.0
    empty = classification_metrics([], [], ["a", "b"])
    assert empty["n"] == 0 and empty["overall_accuracy"] == 0.0 and empty["macro_f1"] == 0.0
    json.dumps(empty, allow_nan=False)
    with pytest.raises(ValueError):
        classification_metrics([0, 3], [0, 1], ["a", "b"])


# -- figures -------------------------------------------------------------------------------

def test_confusion_and_curves_png_are_written(tmp_path: Path):
    path = save_confusion_png([[5, 1, 0], [0, 0, 0], [2, 3, 9]], ["Forest", "River", "Sea & Lake"],
                              tmp_path / "c" / "confusion.png", "test")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000
    history = [{"epoch": e, "train_loss": 1 / e, "val_accuracy": 0.5 + e / 20, "lr": 0.01}
               for e in range(1, 5)]
    curves = save_curves_png(history, tmp_path / "curves.png")
    assert curves is not None and curves.read_bytes().startswith(PNG_MAGIC)
    assert save_curves_png([], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    with pytest.raises(ValueError):
        save_confusion_png([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "bad.png")


# -- prediction ----------------------------------------------------------------------------

class _Corner(torch.nn.Module):
    """Scores class 1 by the top-left pixel: not rotation invariant, so TTA changes it."""

    def forward(self, x):
        return torch.stack([torch.zeros(len(x)), 4 * x[:, 0, 0, 0]], dim=1)


def test_normalize_and_predict_probs_tta():
    images = np.zeros((3, 1, 4, 4), dtype=np.float32)
    images[:, 0, 0, 0] = [10.0, 12.0, 8.0]  # normalised: 0, 1, -1 at one corner only
    x = normalize(images, [10.0], [2.0])
    assert x.dtype == torch.float32 and float(x[1, 0, 0, 0]) == 1.0 and float(x[1, 0, 1, 1]) == -5.0
    model = _Corner().train()
    plain = predict_probs(model, images, [10.0], [2.0], batch_size=2)
    assert plain.shape == (3, 2) and np.allclose(plain.sum(1), 1.0, atol=1e-6)
    corner = np.array([0.0, 1.0, -1.0])
    assert np.allclose(plain[:, 1], 1 / (1 + np.exp(-4 * corner)), atol=1e-6)
    tta = predict_probs(model, images, [10.0], [2.0], tta=True)
    # The corner pixel visits each of the 4 corners twice over the 8 views; the other
    # three corners are -5 after normalisation.
    expect = (2 / (1 + np.exp(-4 * corner)) + 6 / (1 + np.exp(20.0))) / 8
    assert np.allclose(tta[:, 1], expect, atol=1e-6)
    assert model.training  # mode restored


# -- model folders and the command -----------------------------------------------------------

def _write_png_dataset(root: Path, classes: dict[str, int], size: int = 16, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for ci, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            arr = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
            arr[..., ci % 3] = 200  # some class signal
            Image.fromarray(arr).save(root / name / f"{name}_{i}.png")


def _save_tiny_model(folder: Path, bands: list[str], classes: list[str]) -> Path:
    torch.manual_seed(0)
    model = SceneClassifier("resnet18_w16", len(bands), len(classes))
    return save_model(folder, model, ModelMeta(
        backbone="resnet18_w16", class_names=classes, band_names=bands,
        mean=[120.0] * len(bands), std=[60.0] * len(bands), patch_size=16))


@pytest.fixture(scope="module")
def rgb_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    _write_png_dataset(root / "test", {"Forest": 3, "River": 2})
    _save_tiny_model(root / "model", ["R", "G", "B"], ["Forest", "River"])
    return root


def test_evaluate_command_matches_predict_probs(rgb_world: Path, tmp_path: Path, capsys):
    out = tmp_path / "eval"
    events_file = tmp_path / "events.jsonl"
    rc = cli_main(["evaluate", "--model", str(rgb_world / "model"), "--data", str(rgb_world / "test"),
                   "--out", str(out), "--device", "cpu", "--events", str(events_file)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "overall accuracy" in printed and "Forest" in printed and "River" in printed

    doc = json.loads((out / "metrics.json").read_text())
    assert doc["step"] == "evaluate" and doc["tta"] is False
    metrics = doc["test"]

    from asymkd.data.patches import load_folder
    from asymkd.models.files import load_model
    model, meta = load_model(rgb_world / "model")
    data = load_folder(rgb_world / "test", "rgb", class_names=meta.class_names)
    probs = predict_probs(model, data.images, meta.mean, meta.std)
    expected = classification_metrics(data.labels, probs.argmax(1), meta.class_names)
    assert metrics["confusion"] == expected["confusion"]
    assert metrics["overall_accuracy"] == pytest.approx(expected["overall_accuracy"])
    assert metrics["n"] == 5 and sum(map(sum, metrics["confusion"])) == 5
    assert f"{100 * expected['overall_accuracy']:6.2f}%" in printed
    assert (out / "confusion.png").read_bytes().startswith(PNG_MAGIC)

    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"metrics", "result"} <= kinds
    result = next(e for e in events if e["event"] == "result")
    assert Path(result["paths"]["metrics"]) == out / "metrics.json"
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == 5 and progress[-1]["fraction"] == 1.0


def test_evaluate_command_with_events_on_stdout_prints_only_json(rgb_world: Path, tmp_path: Path, capsys):
    rc = cli_main(["evaluate", "--model", str(rgb_world / "model"), "--data", str(rgb_world / "test"),
                   "--out", str(tmp_path / "eval"), "--device", "cpu", "--tta", "--events", "-"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]  # every stdout line is an event
    metrics = next(r for r in records if r["event"] == "metrics")["metrics"]
    assert metrics["n"] == 5 and set(metrics["per_class"]) == {"Forest", "River"}


def test_evaluate_with_tta_and_default_out_dir(rgb_world: Path, tmp_path: Path):
    import shutil
    model_dir = tmp_path / "model"
    shutil.copytree(rgb_world / "model", model_dir)
    metrics = evaluate_model_folder(model_dir, rgb_world / "test", tta=True)
    assert (model_dir / "eval" / "test" / "metrics.json").is_file()
    assert json.loads((model_dir / "eval" / "test" / "metrics.json").read_text())["tta"] is True
    assert metrics["n"] == 5 and not math.isnan(metrics["macro_f1"])


def test_ms_model_on_rgb_data_is_a_band_count_error(rgb_world: Path, tmp_path: Path, capsys):
    ms_model = _save_tiny_model(tmp_path / "ms_model", ["B02", "B03", "B04", "B08"], ["Forest", "River"])
    with pytest.raises(ModelFileError, match="has 3 bands but the model was trained on 4"):
        evaluate_model_folder(ms_model, rgb_world / "test", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    rc = cli_main(["evaluate", "--model", str(ms_model), "--data", str(rgb_world / "test"),
                   "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "3 bands" in err and "B02, B03, B04, B08" in err and "hint:" in err


def test_ms_model_on_ms_tiffs(tmp_path: Path):
    import rasterio
    bands = ["B02", "B03", "B04", "B08"]
    rng = np.random.default_rng(1)
    for name in ("Forest", "River"):
        (tmp_path / "ms" / name).mkdir(parents=True)
        for i in range(2):
            with rasterio.open(tmp_path / "ms" / name / f"{name}_{i}.tif", "w", driver="GTiff",
                               width=16, height=16, count=4, dtype="uint16") as dst:
                dst.write(rng.integers(0, 3000, (4, 16, 16)).astype(np.uint16))
    model_dir = _save_tiny_model(tmp_path / "ms_model", bands, ["Forest", "River"])
    metrics = evaluate_model_folder(model_dir, tmp_path / "ms", out_dir=tmp_path / "out")
    assert metrics["n"] == 4 and (tmp_path / "out" / "metrics.json").is_file()


def test_data_class_folder_not_in_model_is_an_error(rgb_world: Path, tmp_path: Path):
    _write_png_dataset(tmp_path / "data", {"Forest": 1, "Highway": 1})
    with pytest.raises(DataError, match="no sample in the model's training set: Highway"):
        evaluate_model_folder(rgb_world / "model", tmp_path / "data", out_dir=tmp_path / "out")


def test_missing_or_empty_data_folder_is_an_error(rgb_world: Path, tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        evaluate_model_folder(rgb_world / "model", tmp_path / "nowhere", out_dir=tmp_path / "out")
    _write_png_dataset(tmp_path / "data", {"Forest": 1})
    (tmp_path / "data" / "River").mkdir()
    with pytest.raises(DataError, match="class folder.*with no images.*River"):
        evaluate_model_folder(rgb_world / "model", tmp_path / "data", out_dir=tmp_path / "out")


def test_unlabeled_folder_and_missing_model_are_errors(rgb_world: Path, tmp_path: Path):
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class folders"):
        evaluate_model_folder(rgb_world / "model", tmp_path / "flat", out_dir=tmp_path / "out")
    with pytest.raises(ModelFileError, match="not a model folder"):
        evaluate_model_folder(tmp_path, rgb_world / "test", out_dir=tmp_path / "out")
