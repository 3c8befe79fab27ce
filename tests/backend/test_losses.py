"""Loss terms: values, gradients, masking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asymkd.models.losses import (
    as_samples,
    contrastive_masks,
    coral_loss,
    kd_loss,
    masked_info_nce,
    mmd_loss,
    soften,
)

torch.set_num_threads(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- CORAL
def test_coral_matches_formula():
    g = _gen()
    a, b = torch.randn(50, 6, generator=g), torch.randn(40, 6, generator=g) * 2
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    expected = ((ca - cb) ** 2).sum() / (4 * 36)
    assert torch.allclose(coral_loss(a, b), expected, rtol=1e-5)


def test_coral_gradient_nonzero_and_zero_for_equal_covariance():
    g = _gen(1)
    a = torch.randn(64, 8, generator=g, requires_grad=True)
    b = torch.randn(64, 8, generator=g) * 3.0
    coral_loss(a, b).backward()
    assert a.grad.abs().sum() > 0

    # Same covariance (a shifted copy: CORAL ignores the mean): loss and gradient vanish.
    a2 = (b + 5.0).clone().requires_grad_(True)
    loss = coral_loss(a2, b)
    loss.backward()
    assert loss.item() < 1e-10
    assert a2.grad.abs().max() < 1e-6


def test_coral_gradient_decreases_loss():
    g = _gen(2)
    a = torch.randn(64, 4, generator=g, requires_grad=True)
    b = torch.randn(64, 4, generator=g) @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 2.0]))
    before = coral_loss(a, b)
    before.backward()
    with torch.no_grad():
        after = coral_loss(a - 10.0 * a.grad, b)
    assert after < before


def test_coral_accepts_feature_maps_of_different_spatial_size():
    g = _gen(3)
    student = torch.randn(4, 16, 4, 4, generator=g, requires_grad=True)  # 64 positions
    teacher = torch.randn(4, 16, 2, 2, generator=g)                       # 16 positions
    loss = coral_loss(student, teacher)
    loss.backward()
    assert loss.ndim == 0 and student.grad.abs().sum() > 0
    # Spatial positions are samples, channels the dimension.
    flat = as_samples(student.detach())
    assert flat.shape == (64, 16)
    assert torch.equal(flat[1], student.detach()[0, :, 0, 1])


def test_coral_rejects_mismatched_dimension_and_single_sample():
    with pytest.raises(ValueError, match="same feature dimension"):
        coral_loss(torch.randn(8, 4), torch.randn(8, 5))
    with pytest.raises(ValueError, match="at least two"):
        coral_loss(torch.randn(1, 4), torch.randn(8, 4))


# ----------------------------------------------------------------------------- MMD
def test_mmd_zero_for_same_set_and_grows_with_shift():
    g = _gen(4)
    a = torch.randn(40, 5, generator=g)
    assert mmd_loss(a, a.clone()).abs() < 1e-6
    near = mmd_loss(a, a + 0.1)
    far = mmd_loss(a, a + 2.0)
    assert 0 < near < far


def test_mmd_gradient_pulls_distributions_together():
    g = _gen(5)
    a = torch.randn(32, 3, generator=g, requires_grad=True)
    b = torch.randn(32, 3, generator=g) + 1.5
    loss = mmd_loss(a, b, kernels=(0.5, 1.0, 2.0))
    loss.backward()
    assert a.grad.abs().sum() > 0
    with torch.no_grad():
        assert mmd_loss(a - 5.0 * a.grad, b, kernels=(0.5, 1.0, 2.0)) < loss


# ----------------------------------------------------------------------------- InfoNCE
def _embeddings(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    zr = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    zm = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    return zr, zm


def test_info_nce_masks():
    rgb = torch.tensor([0, 0, 1, -1])
    ms = torch.tensor([0, 0, 1, 2])
    pos, neg = contrastive_masks(rgb, ms, torch.arange(4))
    assert pos.diagonal().all() and pos.sum() == 4
    assert not neg[0, 1] and not neg[1, 0]          # same class, other target: masked
    assert neg[0, 2] and neg[2, 0] and neg[0, 3]    # different classes: negatives
    assert neg[3, 0] and neg[3, 1] and neg[3, 2]    # unknown class: negative to other targets
    assert not (neg & pos).any()


def test_info_nce_same_class_non_target_gets_no_gradient():
    zr, zm = _embeddings(4, 8, seed=6)
    labels = torch.tensor([0, 0, 1, 1])
    masked_info_nce(zr, zm, labels, labels, temperature=0.1).backward()
    # Per-pair gradients: make the similarity matrix itself the leaf.
    sims = (zr @ zm.T).detach().requires_grad_(True)

    def loss_from(s: torch.Tensor) -> torch.Tensor:
        # Same loss with the similarity matrix as the leaf: z_rgb = I, z_ms = s^T.
        return masked_info_nce(torch.eye(4), s.T, labels, labels, temperature=0.1)

    loss_from(sims).backward()
    grad = sims.grad
    # (0,1), (1,0), (2,3), (3,2): same class, other target -> exactly no gradient.
    for i, j in [(0, 1), (1, 0), (2, 3), (3, 2)]:
        assert grad[i, j] == 0
    # Different-class pairs are negatives: their similarity is pushed down (positive grad).
    for i, j in [(0, 2), (0, 3), (2, 0), (3, 1)]:
        assert grad[i, j] > 0
    # Positives are pulled up.
    assert (grad.diagonal() < 0).all()
    assert zr.grad.abs().sum() > 0 and zm.grad.abs().sum() > 0


def test_info_nce_unlabeled_is_negative_to_all_other_targets():
    # Target 1 has an unknown class on both sides (as in the matcher, where a pair shares its label).
    labels = torch.tensor([0, -1, 0])
    sims = torch.zeros(3, 3, requires_grad=True)
    masked_info_nce(torch.eye(3), sims.T, labels, labels, temperature=0.5).backward()
    g = sims.grad
    assert g[1, 0] > 0 and g[1, 2] > 0     # unlabeled row vs every other target
    assert g[0, 1] > 0 and g[2, 1] > 0     # every other row vs the unlabeled target's MS
    assert g[0, 2] == 0 and g[2, 0] == 0   # labeled same-class pairs stay masked

    # An unlabeled RGB row whose MS partner's class is known (0): the MS side is a
    # same-class non-target for the other class-0 rows, so those pairs stay masked.
    sims = torch.zeros(3, 3, requires_grad=True)
    masked_info_nce(torch.eye(3), sims.T, labels, torch.tensor([0, 0, 0]), temperature=0.5).backward()
    g = sims.grad
    assert g[1, 0] > 0 and g[1, 2] > 0
    assert g[0, 1] == 0 and g[2, 1] == 0


def test_info_nce_equals_plain_info_nce_when_all_classes_differ():
    zr, zm = _embeddings(6, 5, seed=7)
    labels = torch.arange(6)
    logits = zr @ zm.T / 0.2
    target = torch.arange(6)
    plain = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    assert torch.allclose(masked_info_nce(zr, zm, labels, labels, temperature=0.2), plain, atol=1e-6)


def test_info_nce_with_pos_index_and_no_negatives():
    zr, zm = _embeddings(3, 4, seed=8)
    # All one class: no negatives, the loss is 0 and gives no gradient.
    same = torch.zeros(3, dtype=torch.long)
    loss = masked_info_nce(zr, zm, same, same)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert zr.grad.abs().max() == 0
    # pos_index: RGB rows 0 and 1 share MS partner 2; row 2 pairs with MS 0.
    zr, zm = _embeddings(3, 4, seed=9)
    loss = masked_info_nce(zr, zm, torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0]),
                           pos_index=torch.tensor([2, 2, 0]))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="pos_index"):
        masked_info_nce(zr, zm, torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0]), pos_index=torch.tensor([0, 1, 5]))


def test_info_nce_training_separates_classes():
    # A few steps of gradient descent raise the positive similarities.
    zr, zm = _embeddings(8, 6, seed=10)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, -1])
    opt = torch.optim.SGD([zr, zm], lr=0.5)
    first = None
    for _ in range(20):
        loss = masked_info_nce(F.normalize(zr, dim=1), F.normalize(zm, dim=1), labels, labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


# ----------------------------------------------------------------------------- KD
def test_kd_kl_matches_hinton_formula_and_is_zero_at_teacher():
    g = _gen(11)
    s = torch.randn(5, 4, generator=g, requires_grad=True)
    t = torch.randn(5, 4, generator=g)
    T = 3.0
    expected = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
    assert torch.allclose(kd_loss(s, t, T), expected, atol=1e-6)
    # Probabilities or logits of the same teacher give the same loss.
    assert torch.allclose(kd_loss(s, F.softmax(t, 1), T), expected, atol=1e-5)
    assert kd_loss(t.clone(), t, T).abs() < 1e-6
    kd_loss(s, t, T).backward()
    assert s.grad.abs().sum() > 0


def test_kd_gradient_moves_student_towards_teacher():
    s = torch.zeros(1, 3, requires_grad=True)
    t = torch.tensor([[4.0, 0.0, 0.0]])
    kd_loss(s, t, 2.0).backward()
    assert s.grad[0, 0] < 0 and s.grad[0, 1] > 0 and s.grad[0, 2] > 0
    s.grad = None
    kd_loss(s, t, 2.0, mode="ce").backward()
    assert s.grad[0, 0] < 0


def test_kd_ce_uses_hard_pseudo_labels():
    g = _gen(12)
    s = torch.randn(6, 5, generator=g)
    t = torch.randn(6, 5, generator=g)
    expected = F.cross_entropy(s, t.argmax(1))
    assert torch.allclose(kd_loss(s, t, temperature=4.0, mode="ce"), expected)


def test_kd_weights_scale_samples_and_zero_weight_removes_gradient():
    g = _gen(13)
    s = torch.randn(4, 3, generator=g, requires_grad=True)
    t = torch.randn(4, 3, generator=g)
    w = torch.tensor([1.0, 0.0, 0.5, 2.0])
    per = torch.stack([kd_loss(s[i:i + 1], t[i:i + 1], 2.0) for i in range(4)])
    assert torch.allclose(kd_loss(s, t, 2.0, weights=w), (per * w).mean(), atol=1e-6)
    kd_loss(s, t, 2.0, weights=w).backward()
    assert s.grad[1].abs().max() == 0 and s.grad[0].abs().sum() > 0
    with pytest.raises(ValueError, match="one per sample"):
        kd_loss(s, t, 2.0, weights=torch.ones(3))


def test_kd_rejects_bad_arguments():
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="one of kl, ce"):
        kd_loss(s, t, 1.0, mode="mse")
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, 0.0)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        kd_loss(s, torch.randn(2, 4), 1.0)


def test_soften_probabilities_equals_softened_logits():
    z = torch.tensor([[2.0, 0.5, -1.0]])
    assert torch.allclose(soften(F.softmax(z, 1), 3.0), F.softmax(z / 3.0, 1), atol=1e-6)
