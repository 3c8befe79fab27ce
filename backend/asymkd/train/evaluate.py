"""Evaluation: predictions (optionally with 8-view test-time augmentation), classification
metrics computed with numpy, confusion-matrix and training-curve figures, and the
evaluation of a saved model folder on a labeled folder dataset.

Metrics dicts (the `test`/`val` entries of every step's metrics.json) look like:
`{"n", "overall_accuracy", "macro_f1", "macro_precision", "macro_recall", "class_names",
"per_class": {name: {"precision", "recall", "f1", "support", "predicted"}},
"confusion": [[...]] (rows = true class, columns = predicted)}`.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .. import layout
from ..data.patches import PatchSet, load_folder
from ..errors import DataError
from ..events import NULL_EVENTS, Events, jsonable
from ..fileio import atomic_write_bytes, atomic_write_text
from ..models.files import check_bands, load_model
from ..models.metadata import ModelMeta
from .common import batch_probs, normalize, resolve_device

# -- preprocessing and prediction -----------------------------------------------------

@torch.no_grad()
def predict_probs(model: nn.Module, images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                  device: str | torch.device = "cpu", batch_size: int = 256,
                  tta: bool = False, events: Events = NULL_EVENTS,
                  step: str = "predict") -> np.ndarray:
    """Softmax probabilities (N, K) for raw (N, C, H, W) images, normalised with the model's
    stored statistics: the one prediction path of training-time scores, `evaluate`, soft
    labels and the report.

    With `tta` the probabilities are averaged over the 8 dihedral views. The model's
    train/eval mode is restored afterwards, so trainers can call this between epochs.
    Progress goes to `events` under `step` (in patches).
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    started = time.time()
    try:
        for start in range(0, len(images), batch_size):
            batch = normalize(torch.as_tensor(np.asarray(images[start:start + batch_size])), mean, std)
            out.append(batch_probs(model, batch, device, tta=tta).numpy())
            done = min(start + batch_size, len(images))
            events.progress(step, done, len(images), started, unit="patch")
    finally:
        model.train(was_training)
    if not out:
        num_classes = getattr(getattr(model, "head", None), "out_features", 0)
        return np.zeros((0, num_classes), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


# -- metrics -------------------------------------------------------------------------------

def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0 (no NaN reaches JSON)."""
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    for what, y in (("label", y_true), ("prediction", y_pred)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{what} outside 0..{num_classes - 1}: {int(y.min())}..{int(y.max())}")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def classification_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                           class_names: Sequence[str]) -> dict[str, Any]:
    """Overall accuracy, macro-F1, per-class precision/recall/F1/support and the confusion.

    Samples with label -1 (unlabeled) are left out. A class never predicted has precision
    0; a class absent from the labels has recall 0. Macro averages run over the classes
    that occur among the labels or the predictions (a class absent from both says nothing
    about the model and would only pull the mean down).
    """
    names = [str(c) for c in class_names]
    k = len(names)
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    keep = y_true >= 0
    cm = confusion_matrix(y_true[keep], y_pred[keep], k)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    n = int(cm.sum())
    seen = (support + predicted) > 0

    def macro(values: np.ndarray) -> float:
        return float(values[seen].mean()) if seen.any() else 0.0

    return {
        "n": n,
        "overall_accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": macro(f1),
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "class_names": names,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i]),
                             "predicted": int(predicted[i])}
                      for i, name in enumerate(names)},
        "confusion": cm.astype(int).tolist(),
    }


def write_metrics_json(path: str | Path, document: dict[str, Any]) -> Path:
    """Write a metrics.json atomically, with NaN/inf as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(jsonable(document), indent=2, allow_nan=False))
    return path


# -- figures -----------------------------------------------------------------------------

def _new_figure(width: float, height: float):
    # A Figure with its own Agg canvas: no pyplot, no global backend state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def confusion_png_bytes(confusion: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str],
                        title: str = "") -> bytes:
    """Confusion matrix as PNG: colours are row-normalised (recall), cells show counts."""
    cm = np.asarray(confusion, dtype=np.int64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix {cm.shape} does not fit {k} class names")
    rates = _ratio(cm, cm.sum(axis=1, keepdims=True).repeat(k, axis=1))
    side = max(3.5, 0.42 * k + 2.2)
    fig = _new_figure(side + 0.8, side)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    font = 9 if k <= 12 else 6
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=font,
                        color="white" if rates[i, j] > 0.55 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(class_names, rotation=45, ha="right", fontsize=font + 1)
    ax.set_yticklabels(class_names, fontsize=font + 1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    return _png_bytes(fig)


def save_confusion_png(confusion: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str],
                       path: str | Path, title: str = "") -> Path:
    return atomic_write_bytes(path, confusion_png_bytes(confusion, class_names, title))


def _numeric_series(history: Sequence[dict[str, Any]]) -> tuple[list[float], dict[str, list[float]]]:
    """x values (epoch, else position) and every numeric key's values (NaN where missing)."""
    xs = [float(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    keys: list[str] = []
    for h in history:
        for key, value in h.items():
            if key != "epoch" and key not in keys and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                keys.append(key)
    series = {}
    for key in keys:
        values = [h.get(key) for h in history]
        series[key] = [float(v) if isinstance(v, (int, float)) and v is not None else math.nan
                       for v in values]
    return xs, series


# Keys of a history record that are bookkeeping, not curves worth a panel.
_NOT_PLOTTED = ("lr", "time", "seconds", "step")


def _panel_of(key: str) -> str | None:
    """Which panel a history key goes to: loss (and per-term train averages), score, other."""
    low = key.lower()
    if any(word in low for word in ("acc", "f1", "precision", "recall", "agree")):
        return "score"
    if "loss" in low or low.startswith("train_"):
        return "loss"
    if low in _NOT_PLOTTED or low.endswith(tuple("_" + w for w in _NOT_PLOTTED)):
        return None
    return "other"


def curves_png_bytes(history: Sequence[dict[str, Any]], title: str = "") -> bytes | None:
    """Training curves as PNG, one panel each for losses, scores (accuracy, F1) and other
    numeric values (e.g. a teacher weight). None when the history holds nothing to plot."""
    if not history:
        return None
    from matplotlib.ticker import MaxNLocator
    xs, series = _numeric_series(history)
    groups: dict[str, dict[str, list[float]]] = {"loss": {}, "score": {}, "other": {}}
    for key, values in series.items():
        panel = _panel_of(key)
        if panel is not None:
            groups[panel][key] = values
    panels = [(name, group) for name, group in groups.items() if group]
    if not panels:
        return None
    fig = _new_figure(3.8 * len(panels), 3.0)
    for index, (ylabel, group) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        for key, values in group.items():
            ax.plot(xs, values, marker="o" if len(xs) <= 30 else None, markersize=3, label=key)
        finite = [v for values in group.values() for v in values if math.isfinite(v)]
        # Loss terms differ by orders of magnitude (CE vs CORAL): a log axis shows them all.
        if ylabel == "loss" and finite and min(finite) > 0 and max(finite) / min(finite) > 100:
            ax.set_yscale("log")
        epochs = sorted({x for x in xs if math.isfinite(x)})
        if 0 < len(epochs) <= 12:
            ax.set_xticks(epochs)  # few epochs: one tick each (a single point gets no 0.95..1.05)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _png_bytes(fig)


def save_curves_png(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Write the training curves; returns None (and writes nothing) for an empty history."""
    data = curves_png_bytes(history, title)
    return atomic_write_bytes(path, data) if data is not None else None


# -- evaluation of models ----------------------------------------------------------------

def evaluate_patches(model: nn.Module, meta: ModelMeta, data: PatchSet,
                     device: str | torch.device = "cpu", batch_size: int = 256,
                     tta: bool = False, events: Events = NULL_EVENTS,
                     step: str = "evaluate") -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of a model on the labeled samples of a patch set, and the probabilities."""
    probs = predict_probs(model, data.images, meta.mean, meta.std, device=device,
                          batch_size=batch_size, tta=tta, events=events, step=step)
    metrics = classification_metrics(data.labels, probs.argmax(axis=1), meta.class_names)
    return metrics, probs


def default_out_dir(model_dir: str | Path, data_dir: str | Path) -> Path:
    """Where `evaluate` writes when no --out is given: MODEL/eval/<data folder name>."""
    return Path(model_dir) / layout.EVAL / (Path(data_dir).resolve().name or "data")


def _model_modality(meta: ModelMeta) -> str:
    if meta.modality in ("rgb", "ms"):
        return str(meta.modality)
    return "rgb" if [b.upper() for b in meta.band_names] == ["R", "G", "B"] else "ms"


def load_eval_data(meta: ModelMeta, data_dir: str | Path, events: Events = NULL_EVENTS) -> PatchSet:
    """A labeled folder dataset in the model's label order, checked against its bands."""
    modality = _model_modality(meta)
    # Bands are read as the files have them and checked before the model's names are given
    # to them, so a band-count mismatch is reported as such (not as a --bands error).
    data = load_folder(data_dir, modality, class_names=meta.class_names)
    if not data.labeled.any():
        raise DataError(f"{data_dir} has no class folders, so there is nothing to score against",
                        "evaluate on a labeled folder laid out as root/<Class>/<image files>")
    check_bands(meta, data.num_bands, f"dataset {data_dir}")
    file_names = [b.upper() for b in data.band_names]
    if modality == "ms" and file_names != [b.upper() for b in meta.band_names] \
            and not all(b.startswith("BAND") for b in file_names):
        events.warning(f"band names in {data_dir} ({', '.join(data.band_names)}) differ from the "
                       f"model's ({', '.join(meta.band_names)}); bands are used in file order")
    data.band_names = list(meta.band_names)
    patch = meta.patch_size
    if data.size != patch:
        events.warning(f"patches in {data_dir} are {data.size} px, the model was trained on "
                       f"{patch} px; scores may suffer")
    absent = [c for c, n in data.class_counts().items() if n == 0]
    if absent:
        events.warning(f"model classes with no sample in {data_dir}: {', '.join(absent)}")
    return data


def evaluate_model_folder(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path | None = None,
                          device: str | torch.device = "cpu", events: Events = NULL_EVENTS,
                          tta: bool = False, batch_size: int = 256) -> dict[str, Any]:
    """Score a saved model on a labeled folder dataset.

    Writes `out_dir/metrics.json` ({"step": "evaluate", "model", "data", "tta", "test":
    metrics}) and `out_dir/confusion.png`; returns the metrics dict.
    """
    device = resolve_device(str(device))
    out = Path(out_dir) if out_dir is not None else default_out_dir(model_dir, data_dir)
    with events.step("evaluate", model=str(model_dir), data=str(data_dir)):
        model, meta = load_model(Path(model_dir), device=device)
        data = load_eval_data(meta, data_dir, events)
        events.log(f"evaluating {model_dir} on {len(data)} patches from {data_dir}"
                   f"{' with 8-view TTA' if tta else ''} ({device})")
        metrics, _ = evaluate_patches(model, meta, data, device=device, batch_size=batch_size,
                                      tta=tta, events=events)
        metrics_path = write_metrics_json(out / layout.METRICS, {
            "step": "evaluate", "model": str(Path(model_dir).resolve()),
            "data": str(Path(data_dir).resolve()), "tta": bool(tta), "test": metrics})
        title = f"{Path(model_dir).name} on {Path(data_dir).name}: OA {100 * metrics['overall_accuracy']:.1f}%"
        confusion_path = save_confusion_png(metrics["confusion"], metrics["class_names"],
                                            out / layout.CONFUSION, title)
        events.metrics("evaluate", {k: metrics[k] for k in ("n", "overall_accuracy", "macro_f1")}
                       | {"per_class": metrics["per_class"]})
        events.result("evaluate", metrics=metrics_path, confusion=confusion_path)
    return metrics
