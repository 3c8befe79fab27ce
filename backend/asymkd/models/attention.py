"""Cross-modal attention between student (RGB) and teacher (MS) feature maps.

Student tokens (queries) attend to teacher tokens (keys/values), and teacher tokens attend
to student tokens: each output really mixes in the other modality. (A published reference
implementation attends each branch to itself, which aligns nothing across modalities.)
The two aligned token sets are what the domain-shift loss (CORAL/MMD) compares.
"""

from __future__ import annotations

import torch
from torch import nn


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) feature map -> (B, h*w, C) tokens; (B, L, C) tokens pass through."""
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    if x.dim() == 3:
        return x
    raise ValueError(f"expected a (B, C, h, w) feature map or (B, L, C) tokens, got shape {tuple(x.shape)}")


def _projection(channels: int, dim: int) -> nn.Module:
    # A linear map to the common width only where the widths differ.
    return nn.Identity() if channels == dim else nn.Linear(channels, dim)


class CrossModalAttention(nn.Module):
    """Bidirectional cross-attention: student <- teacher and teacher <- student.

    forward(student, teacher) takes feature maps (B, C_s, h_s, w_s) and (B, C_t, h_t, w_t)
    (or token sets (B, L, C)); spatial sizes may differ (e.g. student 4x4, teacher 2x2).
    Returns (student_aligned (B, L_s, dim), teacher_aligned (B, L_t, dim)), each
    LayerNorm(tokens + attention to the other modality's tokens).
    """

    def __init__(self, student_channels: int, teacher_channels: int, dim: int = 128,
                 heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} must be divisible by the number of heads {heads}")
        self.dim = dim
        self.proj_student = _projection(student_channels, dim)
        self.proj_teacher = _projection(teacher_channels, dim)
        self.student_from_teacher = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.teacher_from_student = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_student = nn.LayerNorm(dim)
        self.norm_teacher = nn.LayerNorm(dim)

    def project(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of both modalities at the common width, before attention."""
        s, t = to_tokens(student), to_tokens(teacher)
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"student and teacher batches differ: {s.shape[0]} vs {t.shape[0]} "
                             "(one MS partner per RGB sample)")
        return self.proj_student(s), self.proj_teacher(t)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.project(student, teacher)
        s_att, _ = self.student_from_teacher(query=s, key=t, value=t, need_weights=False)
        t_att, _ = self.teacher_from_student(query=t, key=s, value=s, need_weights=False)
        return self.norm_student(s + s_att), self.norm_teacher(t + t_att)
