"""The training loop, objectives and named choices: behaviour the trainers rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asymkd import choices
from asymkd import config as config_mod
from asymkd.errors import ConfigError, DataError
from asymkd.events import NULL_EVENTS
from asymkd.models.losses import DOMAIN_LOSSES, KD_MODES, coral_loss, relative_coral_loss
from asymkd.train import common, loop
from asymkd.train.classifier import Consistency, consistency_terms
from asymkd.train.objectives import Batch, SupervisedObjective
from asymkd.train.pairing import PAIRING, assign_pairs


class _Linear(loop.Task):
    """y = w x on a fixed set: small enough to follow exactly."""

    def __init__(self, scale: float = 1.0):
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.modules = {"net": self.net}
        self.x = torch.randn(40, 4)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) * scale
        self.epochs_seen: list[int] = []

    def batch_terms(self, index, gen):
        err = self.net(self.x[index]).squeeze(1) - self.y[index]
        return {"loss": (err ** 2).mean(), "mae": err.abs().mean()}

    def end_epoch(self, epoch, record):
        self.epochs_seen.append(epoch)
        record["val_accuracy"] = 0.5


def _settings(tmp_path, **kw):
    base = dict(step="test", epochs=4, batch_size=8, lr=0.05, weight_decay=0.0,
                checkpoint=common.Checkpoint(tmp_path / "ckpt.pt"))
    return loop.LoopSettings(**{**base, **kw})


def test_loop_trains_logs_named_terms_and_calls_hooks(tmp_path):
    task = _Linear()
    history = loop.fit(task, 40, _settings(tmp_path), common.generator(0), NULL_EVENTS)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] == task.epochs_seen
    assert {"train_loss", "train_mae", "lr", "val_accuracy"} <= set(history[0])
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_non_finite_loss_stops_training_with_a_clear_error(tmp_path):
    task = _Linear(scale=float("nan"))
    with pytest.raises(DataError, match="training loss became nan"):
        loop.fit(task, 40, _settings(tmp_path), common.generator(0), NULL_EVENTS)


def test_resume_with_other_settings_is_refused(tmp_path):
    loop.fit(_Linear(), 40, _settings(tmp_path, epochs=2, fingerprint={"lr": 1}), common.generator(0),
             NULL_EVENTS)
    with pytest.raises(ConfigError, match="other settings or data"):
        loop.fit(_Linear(), 40, _settings(tmp_path, epochs=3, resume=True, fingerprint={"lr": 2}),
                 common.generator(0), NULL_EVENTS)
    # the same settings resume where the run stopped
    history = loop.fit(_Linear(), 40, _settings(tmp_path, epochs=2, resume=True, fingerprint={"lr": 1}),
                       common.generator(0), NULL_EVENTS)
    assert [h["epoch"] for h in history] == [1, 2]


def test_failed_checkpoint_write_leaves_no_temporary_file(tmp_path):
    ckpt = common.Checkpoint(tmp_path / "ckpt.pt")

    class Broken:
        def state_dict(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        ckpt.save(1, {"x": Broken()}, common.generator(0))
    assert list(tmp_path.iterdir()) == []


def test_supervised_objective_ignores_unlabeled_rows():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    batch = Batch(feats=torch.zeros(3, 1, 1, 1), logits=logits, labels=torch.tensor([0, 1, -1]),
                  index=torch.arange(3))
    terms = SupervisedObjective()(batch)
    expected = torch.nn.functional.cross_entropy(logits[:2], torch.tensor([0, 1]))
    assert torch.allclose(terms["loss"], expected) and torch.allclose(terms["gt"], expected)


def test_consistency_term_uses_only_confident_weak_views():
    weak = torch.tensor([[10.0, 0.0], [0.1, 0.0]])      # sure of class 0; unsure
    strong = torch.tensor([[0.0, 0.0], [0.0, 5.0]])
    terms = consistency_terms(weak, strong, Consistency(torch.arange(2), 1, 0.95, 1.0))
    assert float(terms["confident_share"]) == 0.5
    assert torch.allclose(terms["unlabeled"], torch.log(torch.tensor(2.0)) / 2)


def test_strong_views_differ_from_weak_ones_but_keep_shape():
    x = torch.randn(6, 3, 16, 16)
    out = common.strong_augment(x, common.generator(1))
    assert out.shape == x.shape and not torch.allclose(out, common.dihedral(x, common.generator(1)))
    assert (out == 0).flatten(1).sum(1).min() >= 16  # every sample has a cut-out square


def test_shift_translates_each_patch_with_mirrored_edges():
    x = torch.randn(6, 3, 16, 16)
    out = common.shift(x, torch.Generator().manual_seed(1), 4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    offsets = []
    for i in range(len(x)):  # each output is a 16x16 window of its own padded patch
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.equal(out[i], padded[i, :, dy:dy + 16, dx:dx + 16])]
        assert found
        offsets.append(found[0])
    assert len(set(offsets)) > 1 and offsets != [(4, 4)] * len(x)  # patches move, each its own way
    again = common.shift(x, torch.Generator().manual_seed(1), 4)
    assert torch.equal(out, again)  # the seeded generator decides
    assert common.shift(x, torch.Generator(), 0) is x


def test_students_from_scratch_shift_by_default_and_pretrained_ones_do_not():
    from asymkd.train.teacher import auto_shift
    scratch = config_mod.DistillConfig(backbone="resnet18_w32", pretrained=False)
    assert auto_shift(scratch, 64) == 8 and auto_shift(scratch, 32) == 4  # an eighth of the patch
    assert auto_shift(config_mod.DistillConfig(), 64) == 0  # the bundled ImageNet start
    assert auto_shift(config_mod.DistillConfig(shift=3), 64) == 3
    with pytest.raises(ConfigError, match="distill.shift"):
        config_mod.validate(config_mod.RunConfig(distill=config_mod.DistillConfig(shift=-2)))


def test_relative_coral_does_not_vanish_when_features_shrink():
    a, b = torch.randn(64, 8), torch.randn(64, 8) * torch.linspace(0.2, 2, 8)
    for s in (1.0, 1e-3):
        assert float(relative_coral_loss(a * s, b * s)) == pytest.approx(float(relative_coral_loss(a, b)), rel=1e-3)
    assert float(coral_loss(a * 1e-3, b * 1e-3)) < 1e-9  # the plain term does vanish


def test_random_pairing_keeps_classes():
    rgb, ms = np.array([0, 0, 1, 1, -1]), np.array([0, 0, 0, 1, 1])
    assign = assign_pairs(np.zeros((5, 5)), rgb, ms, method="random", seed=3)
    assert (ms[assign[:4]] == rgb[:4]).all() and 0 <= assign[4] < 5


def test_choices_tables_match_their_implementations_and_validate_config():
    assert set(DOMAIN_LOSSES) == set(choices.DOMAIN_LOSSES)
    assert set(KD_MODES) == set(choices.PSEUDO_MODES)
    assert set(PAIRING) == set(choices.PAIRING_METHODS)
    for key, table in config_mod.CONFIG_CHOICES.items():
        config_mod.from_dict(config_mod.parse_set([f"{key}={next(iter(table))}"]))
    with pytest.raises(ConfigError) as info:
        config_mod.from_dict(config_mod.parse_set(["distill.domain_loss=wasserstein"]))
    assert "coral, coral_rel, mmd" in str(info.value)


@pytest.mark.parametrize("item", ["teacher.lr=inf", "distill.w_feat=nan", "distill.temperature=-inf"])
def test_non_finite_settings_are_refused(item):
    with pytest.raises(ConfigError):
        config_mod.from_dict(config_mod.parse_set([item]))
