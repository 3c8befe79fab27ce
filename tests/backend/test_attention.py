"""Cross-modal attention: shapes, real crossing of modalities, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asymkd.models.attention import CrossModalAttention, to_tokens
from asymkd.models.losses import coral_loss

torch.set_num_threads(1)


def _maps(seed: int = 0, cs: int = 32, ct: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, cs, 4, 4, generator=g), torch.randn(3, ct, 2, 2, generator=g)


def test_shapes_with_different_widths_and_spatial_sizes():
    torch.manual_seed(0)
    att = CrossModalAttention(32, 64, dim=48, heads=4)
    s, t = _maps()
    s_out, t_out = att(s, t)
    assert s_out.shape == (3, 16, 48) and t_out.shape == (3, 4, 48)
    assert isinstance(att.proj_student, nn.Linear) and isinstance(att.proj_teacher, nn.Linear)
    # LayerNorm outputs: zero mean per token.
    assert s_out.mean(-1).abs().max() < 1e-5


def test_no_projection_when_width_already_common():
    att = CrossModalAttention(128, 256, dim=128)
    assert isinstance(att.proj_student, nn.Identity) and isinstance(att.proj_teacher, nn.Linear)


def test_student_output_depends_on_teacher_and_back():
    torch.manual_seed(1)
    att = CrossModalAttention(32, 64, dim=32, heads=4).eval()
    s, t = _maps(2)
    s_out, t_out = att(s, t)
    # Change only the teacher: the student's aligned tokens change (they attend to the teacher).
    s_out2, _ = att(s, t + torch.randn_like(t))
    assert (s_out2 - s_out).abs().max() > 1e-3
    # Change only the student: the teacher's aligned tokens change.
    _, t_out2 = att(s + torch.randn_like(s), t)
    assert (t_out2 - t_out).abs().max() > 1e-3


def test_attention_crosses_batches_never():
    # Sample b's output depends on sample b's partner only, not on other pairs in the batch.
    torch.manual_seed(2)
    att = CrossModalAttention(32, 64, dim=32).eval()
    s, t = _maps(3)
    s_out, _ = att(s, t)
    t2 = t.clone()
    t2[1] += 5.0
    s_out2, _ = att(s, t2)
    assert torch.allclose(s_out2[0], s_out[0], atol=1e-6) and torch.allclose(s_out2[2], s_out[2], atol=1e-6)
    assert not torch.allclose(s_out2[1], s_out[1], atol=1e-3)


def test_coral_on_aligned_tokens_gives_student_features_a_gradient():
    torch.manual_seed(3)
    att = CrossModalAttention(32, 64, dim=32)
    s, t = _maps(4)
    s = s.requires_grad_(True)
    s_out, t_out = att(s, t)
    coral_loss(s_out, t_out).backward()
    assert s.grad.abs().sum() > 0
    assert att.proj_teacher.weight.grad.abs().sum() > 0
    assert att.student_from_teacher.in_proj_weight.grad.abs().sum() > 0


def test_tokens_and_bad_inputs():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    tok = to_tokens(x)
    assert tok.shape == (2, 4, 3) and torch.equal(tok[0, 1], x[0, :, 0, 1])
    with pytest.raises(ValueError, match="divisible"):
        CrossModalAttention(8, 8, dim=30, heads=4)
    att = CrossModalAttention(32, 64, dim=32)
    with pytest.raises(ValueError, match="batches differ"):
        att(torch.randn(2, 32, 4, 4), torch.randn(3, 64, 2, 2))
    with pytest.raises(ValueError, match="feature map"):
        att(torch.randn(32), torch.randn(3, 64, 2, 2))
