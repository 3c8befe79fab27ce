"""Creating the engine environment: CUDA or CPU torch by nvidia-smi, a venv from a system
Python (never QGIS's), in a background task that records the engine Python in the settings."""

from __future__ import annotations

from pathlib import Path

from asymkd_qgis import envsetup, paths, settings
from asymkd_qgis.engine import Engine

from conftest import wait_for


def _fake_nvidia_smi(tmp_path: Path, output: str, code: int = 0) -> str:
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {code}\n")
    script.chmod(0o755)
    return str(script)


def test_detect_gpu(tmp_path):
    assert envsetup.detect_gpu(_fake_nvidia_smi(tmp_path, "GPU 0: NVIDIA H200 (UUID: GPU-1234)")) == "NVIDIA H200"
    assert envsetup.detect_gpu(_fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed", 9)) is None
    assert envsetup.detect_gpu(str(tmp_path / "no-such-nvidia-smi")) is None


def test_plan_takes_cuda_torch_with_a_gpu_and_cpu_torch_without(tmp_path):
    requirements = paths.requirements_file()
    assert requirements is not None
    cpu = envsetup.make_plan(tmp_path / "env", "/usr/bin/python3", requirements, gpu=None)
    cuda = envsetup.make_plan(tmp_path / "env", "/usr/bin/python3", requirements, gpu="NVIDIA H200")
    assert cpu.steps[0].argv == ["/usr/bin/python3", "-m", "venv", str(tmp_path / "env")]
    cpu_torch, cuda_torch = cpu.steps[1].argv, cuda.steps[1].argv
    assert "--index-url" in cpu_torch and cpu_torch[cpu_torch.index("--index-url") + 1] == envsetup.DEFAULT_CPU_INDEX
    assert "--index-url" not in cuda_torch  # the default index serves CUDA builds on Linux
    assert any(a.startswith("torch==") for a in cpu_torch) and any(a.startswith("torch==") for a in cuda_torch)
    rest = cpu.steps[2].argv
    assert not any(a.startswith(("torch==", "torchvision==")) for a in rest)
    assert any(a.startswith("onnxruntime==") for a in rest)
    # everything goes into the venv's own Python, never into the one running QGIS
    import sys
    for step in cpu.steps[1:]:
        assert step.argv[0] == str(settings.venv_python(tmp_path / "env")) != sys.executable
    assert cuda.torch_build == "CUDA (NVIDIA H200)" and cpu.torch_build == "CPU"


def test_default_plan_reads_the_settings(tmp_path, qgis_app):
    settings.put("engine/nvidia_smi", _fake_nvidia_smi(tmp_path, "GPU 0: Tesla T4 (UUID: GPU-1)"))
    settings.put("engine/base_python", "/usr/bin/python3")
    plan = envsetup.default_plan(tmp_path / "env")
    assert plan.gpu == "Tesla T4" and plan.base_python == "/usr/bin/python3"
    assert plan.venv == tmp_path / "env"


def test_builder_creates_the_venv_in_the_background_and_records_it(tmp_path, qgis_app):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# nothing to install in this test\n")
    plan = envsetup.make_plan(tmp_path / "engine env", "/usr/bin/python3", requirements, gpu=None,
                              check_modules=("asymkd",))
    builder = envsetup.EnvironmentBuilder(plan).start()
    progress = []
    builder.progressChanged.connect(lambda percent, text: progress.append(text))
    wait_for(lambda: builder.done, 120, "environment creation")
    assert builder.ok, builder.message
    assert plan.python.is_file()
    assert settings.get("engine/python", "", str) == str(plan.python)
    assert "ready" in builder.message
    assert Engine(python=plan.python, source=paths.engine_source_dir()).check() == builder.version


def test_builder_failure_is_reported(tmp_path, qgis_app):
    plan = envsetup.make_plan(tmp_path / "env", str(tmp_path / "no-python"), None, gpu=None)
    builder = envsetup.EnvironmentBuilder(plan).start()
    wait_for(lambda: builder.done, 60, "failed environment creation")
    assert builder.ok is False
    assert "failed" in builder.message or "cannot" in builder.message
    assert settings.get("engine/python", "", str) == ""
