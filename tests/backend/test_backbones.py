"""Backbones: timm names, local weight files (no hub), clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from asymkd.errors import ConfigError, ModelFileError
from asymkd.models.backbones import SceneClassifier


def test_feature_map_and_logits_shapes():
    model = SceneClassifier("resnet18_w16", in_chans=13, num_classes=7)
    x = torch.zeros(2, 13, 64, 64)
    assert model.forward_features(x).shape == (2, model.num_features, 2, 2)
    assert model(x).shape == (2, 7)


def test_local_weights_initialise_the_backbone_and_skip_misfits(tmp_path):
    source = SceneClassifier("resnet18_w16", in_chans=3, num_classes=10)
    path = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in source.body.state_dict().items()}, str(path))
    # a 13-band model takes every deeper layer; the 3-band first conv does not fit and is skipped
    target = SceneClassifier("resnet18_w16", in_chans=13, num_classes=4, weights=str(path))
    src, dst = source.body.state_dict(), target.body.state_dict()
    assert torch.equal(dst["layer4.1.conv2.weight"], src["layer4.1.conv2.weight"])
    assert dst["conv1.weight"].shape[1] == 13


def test_weights_file_errors(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        SceneClassifier("resnet18_w16", 3, 2, weights=str(tmp_path / "none.pth"))
    other = tmp_path / "other.pth"
    torch.save({"nothing.weight": torch.zeros(3)}, other)
    with pytest.raises(ModelFileError, match="no weights"):
        SceneClassifier("resnet18_w16", 3, 2, weights=str(other))


def test_unknown_backbone_suggests_names():
    with pytest.raises(ConfigError) as info:
        SceneClassifier("mobilenetv3_smal_100", 3, 2)
    assert "mobilenetv3_small_100" in str(info.value)
