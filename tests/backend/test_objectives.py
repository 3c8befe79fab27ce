"""The distillation objective's soft-label term over the samples it teaches."""

from __future__ import annotations

import torch

from asymkd.train.objectives import Batch, DistillObjective


def _objective(taught=None) -> DistillObjective:
    torch.manual_seed(0)
    soft = torch.softmax(torch.randn(4, 3) * 3, 1)
    return DistillObjective(soft=soft, features=torch.zeros(4, 2, 1, 1), trust=torch.ones(4),
                            partners=torch.tensor([0, 1, 2, 3]), row_trust=torch.ones(4), attention=None,
                            w_gt=0.0, w_pseudo=1.0, w_feat=0.0, temperature=2.0, pseudo="kl", domain_loss="coral",
                            use_trust=True, taught=taught)


def _batch(index) -> Batch:
    torch.manual_seed(1)
    n = len(index)
    return Batch(feats=torch.zeros(n, 2, 1, 1), logits=torch.randn(n, 3), labels=torch.full((n,), -1),
                 index=torch.as_tensor(index))


def test_untaught_samples_take_no_soft_label_and_do_not_dilute_the_others():
    taught = torch.tensor([True, True, False, False])
    batch = _batch([0, 1, 2, 3])
    with_mask = _objective(taught)(batch)["pseudo"]
    only_taught = _objective()(Batch(batch.feats[:2], batch.logits[:2], batch.labels[:2], batch.index[:2]))["pseudo"]
    assert torch.allclose(with_mask, only_taught)  # the mean over the taught samples alone
    everyone = _objective()(batch)["pseudo"]
    assert not torch.allclose(with_mask, everyone)
    assert _objective(torch.zeros(4, dtype=torch.bool))(batch)["pseudo"].item() == 0.0
