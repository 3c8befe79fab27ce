"""The CUDA path: skipped where there is no NVIDIA GPU (CI), run by tools/gpu_check.sh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asymkd.events import NULL_EVENTS
from asymkd.models.backbones import SceneClassifier
from asymkd.train import common, loop
from asymkd.train.classifier import ClassifierTask
from asymkd.train.objectives import SupervisedObjective

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_training_steps_under_bf16_autocast_and_channels_last(tmp_path):
    device = torch.device("cuda")
    model = common.prepare_model(SceneClassifier("efficientnet_lite0", 3, 4, pretrained=True, input_size=96), device)
    assert model.body.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    x, y = torch.randn(64, 3, 64, 64), torch.arange(64) % 4
    task = ClassifierTask(model, SupervisedObjective(), x, y, np.arange(64), device, amp=True)
    settings = loop.LoopSettings("cuda", 3, 16, 1e-3, 0.0, common.Checkpoint(tmp_path / "c.pt"))
    history = loop.fit(task, 64, settings, common.generator(0), NULL_EVENTS)
    assert np.isfinite(history[-1]["train_loss"])
    probs = common.predict_normalised(model, x, device, amp=True)
    assert probs.shape == (64, 4) and torch.allclose(probs.sum(1), torch.ones(64), atol=1e-3)


def test_onnxruntime_runs_on_the_cuda_provider(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here")
    from asymkd.classify.infer import providers_for
    assert providers_for("cuda")[0] == "CUDAExecutionProvider"
