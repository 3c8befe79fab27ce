"""Pairing and re-pairing: brute-force agreement, class masking, hubs, Sinkhorn marginals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asymkd.errors import DataError
from asymkd.train.pairing import (
    assign_pairs,
    class_blocks,
    kl_cost_matrix,
    pairing_stats,
    repair_by_kl,
    repair_by_kl_balanced,
    sinkhorn_blocks,
)

torch.set_num_threads(1)


def _random_outputs(n_rgb: int, n_ms: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student_logp = torch.log_softmax(2.0 * torch.randn(n_rgb, k, generator=g), dim=1)
    teacher_p = torch.softmax(2.0 * torch.randn(n_ms, k, generator=g), dim=1)
    return student_logp, teacher_p


def _brute_force_repair(student_logp, teacher_p, rgb_labels, ms_labels):
    s, t = student_logp.double().numpy(), teacher_p.double().numpy()
    out, best = [], []
    for i in range(len(s)):
        costs = []
        for j in range(len(t)):
            if rgb_labels[i] >= 0 and ms_labels[j] != rgb_labels[i]:
                costs.append(np.inf)
                continue
            tj = t[j]
            costs.append(float(np.sum(np.where(tj > 0, tj * (np.log(np.where(tj > 0, tj, 1.0)) - s[i]), 0.0))))
        out.append(int(np.argmin(costs)))
        best.append(min(costs))
    return np.array(out), np.array(best)


@pytest.mark.parametrize("chunk,workers", [(None, None), (3, 1), (3, 3)])
def test_repair_by_kl_matches_brute_force(chunk, workers):
    rng = np.random.default_rng(0)
    s, t = _random_outputs(37, 23, 5, seed=1)
    rgb = rng.integers(0, 4, 37)
    rgb[::5] = -1  # some unlabeled rows
    ms = np.r_[np.arange(4), rng.integers(0, 4, 19)]
    threads = torch.get_num_threads()
    assign, kl = repair_by_kl(s, t, rgb, ms, chunk=chunk, return_kl=True, workers=workers)
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    expected, expected_kl = _brute_force_repair(s, t, rgb, ms)
    assert assign.dtype == np.int64 and assign.shape == (37,)
    np.testing.assert_allclose(kl, expected_kl, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(assign, expected)


def test_kl_cost_matrix_is_kl_divergence():
    s, t = _random_outputs(4, 3, 6, seed=2)
    cost = kl_cost_matrix(s, t)
    ref = torch.stack([torch.stack([(t[j] * (t[j].log() - s[i])).sum() for j in range(3)]) for i in range(4)])
    assert torch.allclose(cost, ref, atol=1e-5)
    assert (cost > -1e-6).all()


def test_repair_masks_classes_and_lets_unlabeled_choose_any_class():
    # Teacher MS 0 (class 0) says "class 1" confidently; MS 1 (class 1) says "class 0".
    teacher = torch.tensor([[0.05, 0.95], [0.95, 0.05]])
    student = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]]))
    rgb = np.array([0, -1, 1])
    ms = np.array([0, 1])
    assign = repair_by_kl(student, teacher, rgb, ms)
    # Labeled rows stay in their class even though the other class's MS is closer.
    assert assign[0] == 0 and assign[2] == 1
    # The unlabeled row takes the closest MS of any class.
    assert assign[1] == 1


def test_repair_handles_zero_probabilities_and_numpy_inputs():
    teacher = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    student = np.log(np.array([[0.98, 0.01, 0.01], [0.01, 0.49, 0.5]]))
    assign, kl = repair_by_kl(student, teacher, [-1, -1], [0, 1], return_kl=True)
    assert assign.tolist() == [0, 1] and np.isfinite(kl).all()


def test_missing_ms_class_is_a_clear_data_error():
    s, t = _random_outputs(3, 2, 3, seed=3)
    with pytest.raises(DataError, match="classes of the RGB set with no sample in the MS set: 2"):
        repair_by_kl(s, t, [0, 2, 1], [0, 1])
    with pytest.raises(DataError, match="no class label"):
        assign_pairs(np.zeros((3, 2)), [0, 1, 1], [0, -1])
    with pytest.raises(ValueError, match="balanced, nearest, random"):
        assign_pairs(np.zeros((3, 2)), [0, 1, 1], [0, 1], method="greedy")
    with pytest.raises(ValueError, match=r"\(N_rgb, N_ms\)"):
        assign_pairs(np.zeros((2, 2)), [0, 1, 1], [0, 1])


def test_nearest_is_masked_argmax():
    rng = np.random.default_rng(4)
    sim = rng.normal(size=(30, 12))
    rgb = rng.integers(-1, 3, 30)
    ms = np.arange(12) % 3
    assign = assign_pairs(sim, rgb, ms, method="nearest", chunk=4)
    masked = np.where((rgb[:, None] < 0) | (rgb[:, None] == ms[None, :]), sim, -np.inf)
    np.testing.assert_array_equal(assign, masked.argmax(1))


def _hub_similarity(seed: int, n_rgb: int = 400, per_class: int = 10, classes: int = 4):
    rng = np.random.default_rng(seed)
    ms = np.repeat(np.arange(classes), per_class)
    rgb = rng.integers(0, classes, n_rgb)
    sim = rng.normal(0.0, 0.1, (n_rgb, len(ms)))
    for c in range(classes):
        sim[:, np.flatnonzero(ms == c)[0]] += 0.5  # one MS per class similar to everything
    return sim, rgb, ms


def test_balanced_pairing_avoids_hubs_that_nearest_creates():
    sim, rgb, ms = _hub_similarity(5)
    nearest = pairing_stats(assign_pairs(sim, rgb, ms, method="nearest"), ms)
    balanced_assign = assign_pairs(sim, rgb, ms, method="balanced")
    balanced = pairing_stats(balanced_assign, ms)
    assert nearest["distinct_ms"] == 4 and nearest["gini_within_class"] > 0.85
    assert balanced["distinct_ms"] == len(ms)
    assert balanced["gini_within_class"] < 0.15
    # About n_rgb_c / n_ms_c partners each (10 on average here); far from one hub.
    assert balanced["max_count"] <= 2 * len(rgb) / len(ms)
    assert (ms[balanced_assign] == rgb).all()


def test_balanced_pairing_with_unlabeled_rows_and_sampling():
    sim, rgb, ms = _hub_similarity(6)
    rgb[:100] = -1
    for rounding in ("argmax", "sample"):
        assign = assign_pairs(sim, rgb, ms, rounding=rounding, seed=1)
        stats = pairing_stats(assign, ms)
        assert stats["distinct_ms"] == len(ms) and stats["gini_within_class"] < 0.2
        assert (ms[assign[100:]] == rgb[100:]).all()


def test_balanced_pairing_recovers_a_clear_one_to_one_matching():
    rng = np.random.default_rng(7)
    ms = np.repeat(np.arange(3), 8)
    perm = rng.permutation(24)
    rgb = ms[perm]
    sim = rng.normal(0.0, 0.05, (24, 24))
    sim[np.arange(24), perm] += 1.0
    sim[:, 0] += 0.6  # a hub that the nearest rule would not take, but must not spoil balance
    np.testing.assert_array_equal(assign_pairs(sim, rgb, ms), perm)


def _dense_plan(blocks, scores, res, n_rows, n_cols):
    plan = torch.zeros(n_rows, n_cols)
    for b, s in zip(blocks, scores, strict=True):
        p = torch.exp(s / res.epsilon + res.row_potential[b.rows][:, None] + res.col_potential[b.cols][None, :])
        plan[b.rows[:, None], b.cols[None, :]] = p
    return plan


@pytest.mark.parametrize("unlabeled", [0, 30])
def test_sinkhorn_marginals(unlabeled):
    rng = np.random.default_rng(8)
    ms = np.r_[np.zeros(5, int), np.ones(3, int), np.full(7, 2)]
    rgb = rng.integers(0, 3, 90)
    rgb[:unlabeled] = -1
    sim = torch.from_numpy(rng.normal(size=(90, len(ms)))).float()
    sim[:, 2] += 2.0
    blocks = class_blocks(rgb, ms)
    scores = [sim[b.rows][:, b.cols] for b in blocks]
    res = sinkhorn_blocks(blocks, scores, 90, torch.from_numpy(ms), epsilon=0.1, iters=500, tol=1e-5)
    plan = _dense_plan(blocks, scores, res, 90, len(ms))
    assert res.col_error < 1e-4
    # Rows: mass 1; labeled rows only on their own class.
    torch.testing.assert_close(plan.sum(1), torch.ones(90), atol=1e-4, rtol=0)
    labeled = np.flatnonzero(rgb >= 0)
    outside = torch.from_numpy(ms[None, :] != rgb[labeled][:, None])
    assert plan[labeled][outside].abs().max() == 0
    cols = plan.sum(0).numpy()
    for c in range(3):
        in_class = cols[ms == c]
        assert np.ptp(in_class) < 1e-3 * max(in_class.mean(), 1.0)  # equal within a class
        if unlabeled == 0:
            assert in_class.mean() == pytest.approx((rgb == c).sum() / (ms == c).sum(), rel=1e-3)
    assert cols.sum() == pytest.approx(90, rel=1e-4)


def test_repair_by_kl_balanced_spreads_partners_within_class():
    rng = np.random.default_rng(9)
    s, t = _random_outputs(300, 30, 4, seed=10)
    ms = np.arange(30) % 3
    rgb = rng.integers(0, 3, 300)
    # One MS per class with a flat (high-entropy) teacher output is close in KL to many students.
    t[:3] = torch.full((3, 4), 0.25)
    nearest = pairing_stats(repair_by_kl(s, t, rgb, ms), ms)
    assign = repair_by_kl_balanced(s, t, rgb, ms)
    balanced = pairing_stats(assign, ms)
    assert (ms[assign] == rgb).all()
    assert balanced["max_count"] < nearest["max_count"] / 2
    assert balanced["gini_within_class"] < nearest["gini_within_class"]
    with pytest.raises(ValueError, match="max_entries"):
        repair_by_kl_balanced(s, t, rgb, ms, max_entries=100)


def test_pairing_stats():
    ms = np.array([0, 0, 1, 1])
    even = pairing_stats(np.array([0, 1, 2, 3, 0, 1, 2, 3]), ms)
    assert even["gini"] == pytest.approx(0.0) and even["distinct_ms"] == 4 and even["max_share"] == 0.25
    hub = pairing_stats(np.array([0, 0, 0, 0, 2, 2, 2, 2]), ms)
    assert hub["distinct_ms"] == 2 and hub["coverage"] == 0.5 and hub["max_count"] == 4
    assert hub["gini_within_class"] == pytest.approx(0.5) and hub["gini"] > even["gini"]
    with pytest.raises(ValueError, match="outside"):
        pairing_stats(np.array([5]), ms)


def test_bench_train_times_repairing(capsys):
    import argparse

    from asymkd.bench import train as bench_train
    from asymkd.errors import ConfigError
    from asymkd.events import NULL_EVENTS

    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(["--rgb", "500", "--ms", "50", "--classes", "5", "--repeats", "2",
                              "--unlabeled", "0.2"])
    args.events = None
    assert bench_train.run(args, NULL_EVENTS) == 0
    out = capsys.readouterr().out
    assert "re-pairing 500 RGB x 50 MS x 5 classes (20% unlabeled" in out and "ratio" in out
    args.ms = 3
    with pytest.raises(ConfigError, match="smaller than --classes"):
        bench_train.run(args, NULL_EVENTS)


def test_random_pairing_re_pairs_randomly_within_the_class():
    from asymkd.train.pairing import PairingOptions, repairer
    rgb_labels, ms_labels = np.repeat([0, 1], 50), np.repeat([0, 1], 10)
    # the student agrees with one MS sample per class only: KL re-pairing would pick it for every row
    teacher = np.full((20, 2), 0.5)
    teacher[0], teacher[10] = [0.99, 0.01], [0.01, 0.99]
    student = np.log(np.where(rgb_labels[:, None] == 0, [0.99, 0.01], [0.01, 0.99]))
    repair = repairer("random", PairingOptions(seed=3))
    first, second = (repair(student, teacher, rgb_labels, ms_labels) for _ in range(2))
    for assign in (first, second):
        assert (ms_labels[assign] == rgb_labels).all()  # same class
        assert len(set(assign[:50])) > 5  # spread over the class, not the KL nearest
    assert (first != second).any()  # drawn anew at each re-pairing
    again = repairer("random", PairingOptions(seed=3))
    assert np.array_equal(again(student, teacher, rgb_labels, ms_labels), first)  # from its seed
    balanced = repair_by_kl_balanced(student, teacher, rgb_labels, ms_labels)
    assert not np.array_equal(balanced, first)
    assert np.array_equal(repairer("balanced", PairingOptions())(student, teacher, rgb_labels, ms_labels), balanced)
    nearest = repairer("nearest", PairingOptions())(student, teacher, rgb_labels, ms_labels)
    assert np.array_equal(nearest, repair_by_kl(student, teacher, rgb_labels, ms_labels))


def test_every_pairing_method_assigns_within_the_class():
    from asymkd import choices
    sim = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
    rgb, ms = np.array([0, 1, -1] * 4), np.array([0, 1] * 3)
    for method in choices.PAIRING_METHODS:  # assign_pairs finds each method in the registry
        assign = assign_pairs(sim, rgb, ms, method=method, seed=1)
        assert (ms[assign[rgb >= 0]] == rgb[rgb >= 0]).all(), method
