"""The distilled student's rows: the RGB set, then the MS samples seen in RGB, each paired
with itself for good; the baseline trains on the RGB set alone."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from torch.nn import functional as F

from asymkd.config import from_dict
from asymkd.data.patches import load_folder
from asymkd.events import Events
from asymkd.train.common import TrainContext
from asymkd.train.distill import TeacherCache, _student_task, ms_rows, student_data
from asymkd.train.teacher import build_classifier
from tiny_data import TINY_CONFIG, make_dataset


def _sets(tmp_path, **kwargs):
    paths = make_dataset(tmp_path, **kwargs)
    ms = load_folder(paths["ms"], "ms", bands="sentinel2")
    rgb = load_folder(paths["rgb_train"], "rgb", class_names=ms.class_names)
    paired = load_folder(paths["rgb_paired"], "rgb", class_names=ms.class_names)
    return ms, rgb, paired


def test_ms_rows_train_with_their_own_partner_and_are_never_repaired(tmp_path):
    torch.manual_seed(0)
    ms, rgb, paired = _sets(tmp_path)
    cfg = from_dict(TINY_CONFIG)
    rows = ms_rows(cfg.distill, ms, rgb, paired)
    assert rows is not None and rows.source == "pairs" and len(rows) == len(ms)
    data = student_data(cfg.distill, rgb, False, rows, ms.labels, val_fraction=cfg.data.val_fraction)
    n = len(rgb)
    assert len(data.y) == n + len(ms) and (data.y[n:].numpy() == ms.labels[rows.ms_index]).all()
    assert set(data.train_index[data.train_index >= n]) == set(range(n, n + len(ms)))  # every MS row trains
    assert len(data.val_index) and data.val_index.max() < n  # and none validates: scores stay RGB's
    k = len(ms.class_names)
    cache = TeacherCache(features=torch.randn(len(ms), 8, 2, 2), soft=F.softmax(torch.randn(len(ms), k), -1),
                         labels=torch.as_tensor(ms.labels), trust=torch.ones(len(ms)), accuracy=0.9)
    student = build_classifier(cfg.distill, 3, k, rgb.band_names, torch.device("cpu"))
    # each RGB row starts with the first MS sample of its class
    first = np.array([np.flatnonzero(ms.labels == c)[0] for c in range(k)])
    task = _student_task(cfg.distill, data, student, TrainContext(), cache, first[rgb.labels], None)
    assert (task.objective.partners[n:].numpy() == rows.ms_index).all()
    task.logp_table = F.log_softmax(torch.randn(len(data.y), k), -1)
    task.after_step(task.repair_every)
    partners = task.objective.partners.numpy()
    assert (partners[n:] == rows.ms_index).all()  # the MS rows kept themselves
    trained = task.trained_rows().numpy()
    rgb_rows = trained[trained < n]
    assert (ms.labels[partners[rgb_rows]] == rgb.labels[rgb_rows]).all()
    assert len(set(partners[rgb_rows])) > k  # re-paired among the class's samples, not left on the first
    # the baseline trains on the RGB set alone
    base = student_data(cfg.distill, rgb, True, rows, ms.labels, val_fraction=cfg.data.val_fraction)
    assert len(base.y) == n and base.ms_rows is None


def test_ms_rows_take_the_rgb_patch_size_and_are_left_out_only_when_asked(tmp_path):
    ms, rgb, paired = _sets(tmp_path)
    stream = io.StringIO()
    events = Events(stream, progress_bars=False)

    def said() -> list[str]:
        return [e["message"] for e in map(json.loads, stream.getvalue().splitlines()) if e["event"] == "warning"]

    cfg = from_dict({**TINY_CONFIG, "distill": {**TINY_CONFIG["distill"], "ms_rows": False}})
    assert ms_rows(cfg.distill, ms, rgb, paired, events) is None and not said()  # asked not to
    cfg = from_dict(TINY_CONFIG)
    for size in (8, 40):  # an RGB sensor with smaller and larger patches than the MS ones (16 px)
        other = rgb.subset(np.arange(len(rgb)))
        other.images = np.repeat(np.repeat(rgb.images, 3, -1), 3, -2)[:, :, :size, :size]
        for partner in (paired, None):  # with same-target RGB (16 px) and without
            rows = ms_rows(cfg.distill, ms, other, partner, events)
            assert rows is not None and len(rows) == len(ms) and rows.images.shape[-2:] == (size, size)
    assert not said()


def test_colour_jitter_reaches_the_ms_rows_only_and_only_when_asked(tmp_path):
    torch.manual_seed(0)
    ms, rgb, paired = _sets(tmp_path)
    k = len(ms.class_names)
    cache = TeacherCache(features=torch.randn(len(ms), 8, 2, 2), soft=F.softmax(torch.randn(len(ms), k), -1),
                         labels=torch.as_tensor(ms.labels), trust=torch.ones(len(ms)), accuracy=0.9)
    first = np.array([np.flatnonzero(ms.labels == c)[0] for c in range(k)])
    seen = {}
    for jitter in (False, True):
        cfg = from_dict({**TINY_CONFIG, "data": {"val_fraction": 0.0},
                         "distill": {**TINY_CONFIG["distill"], "ms_rows_jitter": jitter}})
        data = student_data(cfg.distill, rgb, False, ms_rows(cfg.distill, ms, rgb, paired), ms.labels,
                            val_fraction=cfg.data.val_fraction)
        student = build_classifier(cfg.distill, 3, k, rgb.band_names, torch.device("cpu"))
        task = _student_task(cfg.distill, data, student, TrainContext(), cache, first[rgb.labels], None)
        inputs: list[torch.Tensor] = []
        forward = student.forward_features
        student.forward_features = lambda x, f=forward, into=inputs: into.append(x.clone()) or f(x)  # type: ignore[method-assign]
        task.forward_batch(torch.arange(len(data.train_index)), common_generator(5))
        seen[jitter] = inputs[0]
    n = len(rgb)
    assert torch.equal(seen[True][:n], seen[False][:n])  # the RGB rows' views are the same draws
    assert not torch.allclose(seen[True][n:], seen[False][n:])  # the MS rows' colours moved


def common_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_fixmatch_threshold_is_a_share_of_the_confidence_label_smoothing_allows(tmp_path):
    from asymkd.train.classifier import consistency_terms
    ms, rgb, _ = _sets(tmp_path)
    rgb.labels[::2] = -1  # half of the RGB set unlabeled
    k = len(rgb.class_names)
    cfg = from_dict({**TINY_CONFIG, "distill": {**TINY_CONFIG["distill"], "label_smoothing": 0.1}})
    data = student_data(cfg.distill, rgb, True, val_fraction=cfg.data.val_fraction)
    assert data.consistency is not None
    ceiling = 0.9 + 0.1 / k  # where label smoothing pulls the true class's probability
    assert abs(data.consistency.threshold - 0.95 * ceiling) < 1e-9
    # a weak view as sure as a smoothed model gets now teaches the strong view; at 0.95 it never did
    weak = torch.log(torch.tensor([[ceiling] + [(1 - ceiling) / (k - 1)] * (k - 1)]))
    assert float(consistency_terms(weak, torch.zeros(1, k), data.consistency)["confident_share"]) == 1.0
    unsmoothed = from_dict({**TINY_CONFIG, "distill": {**TINY_CONFIG["distill"], "label_smoothing": 0.0}})
    plain = student_data(unsmoothed.distill, rgb, True, val_fraction=unsmoothed.data.val_fraction).consistency
    assert plain is not None and plain.threshold == 0.95


def test_balanced_rows_repeat_the_rgb_labels_up_to_the_ms_rows(tmp_path):
    ms, rgb, paired = _sets(tmp_path)
    few = rgb.subset(np.flatnonzero(np.isin(np.arange(len(rgb)) % 8, [0, 1])))  # 2 labels a class: 6 rows
    n = len(few)
    base = {**TINY_CONFIG, "data": {"val_fraction": 0.0}}
    for balance, copies in ((False, 1), (True, 3)):  # 18 MS rows: 6 RGB labels, then 3 times over
        cfg = from_dict({**base, "distill": {**TINY_CONFIG["distill"], "balance_rows": balance}})
        data = student_data(cfg.distill, few, False, ms_rows(cfg.distill, ms, few, paired), ms.labels,
                            val_fraction=cfg.data.val_fraction)
        counts = np.bincount(data.train_index, minlength=len(data.y))
        assert (counts[:n] == copies).all() and (counts[n:] == 1).all()
        assert sorted(set(data.train_index)) == list(range(len(data.y)))
    baseline = student_data(cfg.distill, few, True, val_fraction=cfg.data.val_fraction)
    assert len(baseline.train_index) == n  # the baseline: its labels once
