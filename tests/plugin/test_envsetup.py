"""Creating the engine environment: where torch comes from (CPU index, the registry when that
index is unreachable, CUDA with a GPU), a venv from a system Python (never QGIS's), offline
from a bundle folder, progress, partial environments removed, the engine installed as a package."""

from __future__ import annotations

import sys
import tarfile
import time
from pathlib import Path

import pytest

import wheels
from asymkd_qgis import envbuilder, envsetup, paths, settings
from asymkd_qgis.engine import REQUIRED_MODULES, Engine
from conftest import REPO, wait_for

sys.path.insert(0, str(REPO / "tools"))
SYSTEM_PYTHON = "/usr/bin/python3"


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
    cpu = envsetup.make_plan(tmp_path / "env", SYSTEM_PYTHON, requirements, gpu=None, platform="linux")
    cuda = envsetup.make_plan(tmp_path / "env", SYSTEM_PYTHON, requirements, gpu="NVIDIA H200", platform="linux")
    assert cpu.steps[0].argv == [SYSTEM_PYTHON, "-m", "venv", str(tmp_path / "env")]
    assert [s.kind for s in cpu.steps] == ["venv", "pip-upgrade", "torch", "pip"]
    cpu_step, cuda_step = cpu.steps[2], cuda.steps[2]
    cpu_torch, cuda_torch = cpu_step.argv, cuda_step.argv
    assert "--index-url" in cpu_torch and cpu_torch[cpu_torch.index("--index-url") + 1] == envsetup.DEFAULT_CPU_INDEX
    assert "--retries" in cpu_torch  # an unreachable index fails in seconds, not minutes
    assert cpu_step.fallback is not None and "--index-url" not in cpu_step.fallback
    assert "--index-url" not in cuda_torch and cuda_step.fallback is None  # the registry serves CUDA builds on Linux
    assert any(a.startswith("torch==") for a in cpu_torch) and any(a.startswith("torch==") for a in cuda_torch)
    rest = cpu.steps[3].argv
    assert not any(a.startswith(("torch==", "torchvision==")) for a in rest)
    assert any(a.startswith("onnxruntime==") for a in rest)
    for step in cpu.steps[1:]:  # everything goes into the venv's own Python, never into QGIS's
        assert step.argv[0] == str(settings.venv_python(tmp_path / "env")) != sys.executable
    assert cuda.torch_build == "CUDA (NVIDIA H200)" and cpu.torch_build == "CPU"
    # Windows: the registry's torch is the CPU build there; no CPU index needed
    windows = envsetup.make_plan(tmp_path / "env", SYSTEM_PYTHON, requirements, gpu=None, platform="win32")
    assert "--index-url" not in windows.steps[2].argv and windows.torch_build == "CPU"


def test_windows_gpu_users_are_told_how_to_get_cuda(tmp_path):
    plan = envsetup.make_plan(tmp_path / "env", SYSTEM_PYTHON, None, gpu="RTX 4090", platform="win32")
    assert "no CUDA build of torch for Windows" in plan.describe()
    [note] = envbuilder.torch_notes("torch 2.14.1+cpu (CPU build)", plan)
    assert "CPU-only" in note and "--index-url https://download.pytorch.org/whl/cu" in note and "RTX 4090" in note
    linux = envsetup.make_plan(tmp_path / "env", SYSTEM_PYTHON, None, gpu=None, platform="linux")
    assert "runs on the CPU" in envbuilder.torch_notes("torch 2.14.1 (CUDA 12.8 build)", linux)[0]


def test_default_plan_reads_the_settings(tmp_path, qgis_app):
    settings.put("engine/nvidia_smi", _fake_nvidia_smi(tmp_path, "GPU 0: Tesla T4 (UUID: GPU-1)"))
    settings.put("engine/base_python", SYSTEM_PYTHON)
    plan = envsetup.default_plan(tmp_path / "env")
    assert plan.gpu == "Tesla T4" and plan.base_python == SYSTEM_PYTHON
    assert plan.venv == tmp_path / "env"
    assert plan.steps[-1].kind == "engine" and plan.engine_source == paths.engine_source_dir()


# -- pip's output ---------------------------------------------------------------------------
RETRY = ("WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection "
         "broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: Failed to "
         "establish a new connection: [Errno -3] Temporary failure in name resolution')': /whl/cpu/torch/")


def test_an_unreachable_index_is_said_in_one_line():
    lines = [f"Looking in indexes: {envsetup.DEFAULT_CPU_INDEX}"] + [RETRY] * 55 + [
        "ERROR: Could not find a version that satisfies the requirement torch==2.14.1 (from versions: none)",
        "ERROR: No matching distribution found for torch==2.14.1"]
    assert envsetup.connection_problem(lines) == "[Errno -3] Temporary failure in name resolution"
    assert envsetup.pip_failure(lines, 1) == ("Could not find a version that satisfies the requirement torch==2.14.1 "
                                              "(from versions: none)")
    assert envsetup.pip_failure([RETRY] * 3, 1) == "the network failed: [Errno -3] Temporary failure in name resolution"


def test_pip_progress_counts_packages_and_bytes():
    progress = envsetup.PipProgress("installing torch", expected_packages=4)
    texts = []
    for line in ["Collecting torch==2.14.1", "  Downloading torch-2.14.1+cpu-cp311-cp311-linux_x86_64.whl (184.3 MB)",
                 "Progress 0 of 184300000", "Progress 92150000 of 184300000", RETRY, "Collecting numpy",
                 "  Downloading numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl (16.5 MB)",
                 "Installing collected packages: numpy, torch"]:
        if progress.feed(line):
            texts.append((round(progress.fraction, 3), progress.text()))
    fractions = [f for f, _ in texts]
    assert fractions == sorted(fractions) and 0 < fractions[3] < fractions[-1] <= 0.95
    assert texts[3][1] == "installing torch: package 1, torch, 92 MB of 184 MB, 92 MB downloaded"
    assert "numpy, 16.5 MB" in texts[5][1] and texts[-1][1] == "installing torch: installing 2 packages"
    assert progress.retries == 1


def test_pip_progress_counts_wheels_installed_from_a_folder():
    """pip says "Processing FILE (from ...)" for each wheel of a bundle folder, never "Collecting"."""
    progress = envsetup.PipProgress("installing the engine packages from the folder", expected_packages=3)
    texts = []
    for line in ["Processing ./wheels/torch-cuda/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl",
                 "Processing ./wheels/common/numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl "
                 "(from -r r.txt (line 4))",
                 "Processing ./wheels/torch-cuda/nvidia_nvtx-13.0.85-py3-none-manylinux_2_28_x86_64.whl "
                 "(from cuda-toolkit[cublas]==13.0.3; platform_system == \"Linux\"->torch==2.14.1)",
                 "Installing collected packages: nvidia-nvtx, numpy, torch"]:
        assert progress.feed(line)
        texts.append((round(progress.fraction, 3), progress.text()))
    assert texts[1][1] == "installing the engine packages from the folder: package 2, numpy"
    assert texts[2][1].endswith("package 3, nvidia_nvtx") and texts[0][0] < texts[1][0] < texts[2][0]
    assert texts[3][1].endswith("installing 3 packages")


def test_missing_wheels_are_named_with_the_python_and_platform_they_are_for(tmp_path):
    wheels.stub_wheel(tmp_path, "torch", "2.14.1", tag="cp312-cp312-win_amd64")
    wheels.stub_wheel(tmp_path, "numpy", "2.4.6", tag="cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64")
    wheels.stub_wheel(tmp_path, "onnxruntime", "1.31.0")
    found = envsetup.find_wheels([tmp_path])
    tags = {"cp311-cp311-manylinux_2_17_x86_64", "py3-none-any"}
    missing = envsetup.missing_wheels(["torch==2.14.1", "numpy==2.4.6", "onnxruntime==1.32.0", "rasterio==1.4.4"],
                                      found, tags)
    assert missing == ["torch==2.14.1 (only for cp312-cp312-win_amd64)", "onnxruntime==1.32.0 (only versions 1.31.0)",
                       "rasterio==1.4.4"]


def test_bundle_wheels_shared_by_both_torch_builds_go_to_common():
    import bundle as bundle_tool
    cpu = {"torch-2.14.1+cpu-cp311-cp311-linux_x86_64.whl", "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl",
           "timm-1.0.31-py3-none-any.whl", "sympy-1.14.0-py3-none-any.whl"}
    cuda = {"torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl", "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl",
            "timm-1.0.31-py3-none-any.whl", "sympy-1.14.0-py3-none-any.whl",
            "nvidia_cudnn_cu13-9.24.0.43-py3-none-manylinux_2_27_x86_64.whl", "triton-3.7.0-cp311-cp311-x.whl"}
    common, own = bundle_tool.partition({"cpu": cpu, "cuda": cuda})
    assert common == cpu & cuda and own["cpu"] == {"torch-2.14.1+cpu-cp311-cp311-linux_x86_64.whl"}
    assert own["cuda"] == cuda - cpu
    # one build alone: its CUDA libraries and compiler still stay out of common/
    common, own = bundle_tool.partition({"cuda": cuda})
    assert common == {n for n in cuda if n.startswith(("numpy", "timm", "sympy"))}
    assert {n.split("-")[0] for n in own["cuda"]} == {"torch", "nvidia_cudnn_cu13", "triton"}
    # pip matches --platform exactly: wheels tagged for an older glibc (cuDNN's 2_27) must be accepted
    assert "manylinux_2_27_x86_64" in bundle_tool.MANYLINUX


# -- creating environments for real (offline, from small local wheels) ---------------------------
@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """`make bundle` with stand-in wheels, unpacked: what a user copies from a USB stick."""
    import bundle as bundle_tool
    work = tmp_path_factory.mktemp("bundle")
    stubs = wheels.stub_bundle_wheels(work / "stubs")
    archive = bundle_tool.build(work / "asymkd-bundle.tar", ["cpu", "cuda"], "3.11", "manylinux_2_28_x86_64",
                                wheels_from=stubs)
    with tarfile.open(archive) as tar:
        tar.extractall(work / "unpacked")
    [folder] = list((work / "unpacked").iterdir())
    return folder


@pytest.fixture
def offline(monkeypatch):
    for key, value in wheels.offline_env().items():
        monkeypatch.setenv(key, value)


def _build(plan: envsetup.EnvPlan,
           timeout: float = 240) -> tuple[envbuilder.EnvironmentBuilder, list[tuple[float, str]]]:
    builder = envbuilder.EnvironmentBuilder(plan)
    progress: list[tuple[float, str]] = []
    builder.progressChanged.connect(lambda percent, text: progress.append((percent, text)))
    builder.start()
    wait_for(lambda: builder.done, timeout, "environment creation")
    return builder, progress


def test_bundle_holds_plugin_wheels_and_installer(bundle_dir):
    names = {p.name for p in bundle_dir.iterdir()}
    assert {"asymkd_qgis.zip", "requirements.txt", "install.sh", "README.txt", "wheels"} <= names
    assert {p.name for p in (bundle_dir / "wheels").iterdir()} == {"common", "torch-cpu", "torch-cuda"}
    assert list((bundle_dir / "wheels" / "common").glob("asymkd-*.whl"))
    assert list((bundle_dir / "wheels" / "torch-cpu").glob("torch-*+cpu-*.whl"))


def test_create_the_environment_from_a_bundle_without_network(bundle_dir, tmp_path, offline, qgis_app):
    venv = tmp_path / "engine env"
    plan = envsetup.make_plan(venv, SYSTEM_PYTHON, bundle_dir / "requirements.txt", gpu=None, wheels=bundle_dir,
                              engine_source=paths.engine_source_dir())
    assert plan.offline and plan.variant == "CPU" and "no download" in plan.describe()
    start = time.monotonic()
    builder, progress = _build(plan)
    elapsed = time.monotonic() - start
    assert builder.ok, builder.message
    print(f"\nenvironment created from the bundle folder in {elapsed:.1f} s")
    assert "torch 2.14.1+cpu (CPU build)" in builder.message
    assert settings.get("engine/python", "", str) == str(plan.python)
    assert [p for p, _ in progress] == sorted(p for p, _ in progress)
    assert any("installing the engine packages" in text for _, text in progress)
    # the engine judged by importing what it needs
    assert Engine(python=plan.python, source=paths.engine_source_dir()).state(REQUIRED_MODULES, imports=True).working
    # the engine is a package there: console script and python -m, without the plugin's PYTHONPATH
    clean = {"PATH": "/usr/bin:/bin"}
    script = wheels.run([str(venv / "bin" / "asymkd"), "--version"], env=clean)
    module = wheels.run([str(plan.python), "-m", "asymkd", "--version"], env=clean, cwd=tmp_path)
    assert script.returncode == 0 and module.returncode == 0, script.stderr + module.stderr
    assert envsetup.engine_version(paths.engine_source_dir()) in script.stdout + script.stderr


def test_a_gpu_machine_gets_the_bundles_cuda_torch(bundle_dir, tmp_path, offline, qgis_app):
    plan = envsetup.make_plan(tmp_path / "env", SYSTEM_PYTHON, bundle_dir / "requirements.txt", gpu="Tesla T4",
                              wheels=bundle_dir, engine_source=paths.engine_source_dir())
    assert plan.variant == "CUDA" and plan.wheel_dirs[-1].name == "torch-cuda"
    builder, _ = _build(plan)
    assert builder.ok, builder.message
    assert "torch 2.14.1 (CUDA 12.8 build)" in builder.message


def test_a_folder_without_wheels_for_this_python_names_what_is_missing(tmp_path, offline, qgis_app):
    folder = tmp_path / "wheels"
    wheels.stub_wheel(folder, "numpy", "2.4.6")
    wheels.stub_wheel(folder, "torch", "2.14.1", tag="cp39-cp39-win_amd64")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy==2.4.6\ntorch==2.14.1\nonnxruntime==1.32.0\n")
    plan = envsetup.make_plan(tmp_path / "env", SYSTEM_PYTHON, requirements, gpu=None, wheels=folder)
    builder, _ = _build(plan)
    print(f"\n{builder.message}")
    assert builder.ok is False
    assert "torch==2.14.1 (only for cp39-cp39-win_amd64)" in builder.message
    assert "onnxruntime==1.32.0" in builder.message
    assert "Python 3." in builder.message and "numpy" not in builder.message.split("of:")[1]
    assert not plan.venv.exists()  # nothing half-written
    assert settings.get("engine/python", "", str) == ""


def test_a_folder_without_any_wheels_says_so(tmp_path, offline, qgis_app):
    (tmp_path / "empty").mkdir()
    plan = envsetup.make_plan(tmp_path / "env", SYSTEM_PYTHON, REPO / "backend" / "requirements.txt", gpu=None,
                              wheels=tmp_path / "empty")
    builder, _ = _build(plan)
    assert builder.ok is False and "holds no wheels" in builder.message and "install.sh" in builder.message
    assert not plan.venv.exists()


def test_a_folder_that_is_not_an_environment_is_left_alone(tmp_path, qgis_app):
    folder = tmp_path / "my data"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    plan = envsetup.make_plan(folder, SYSTEM_PYTHON, None, gpu=None)
    builder, _ = _build(plan, 60)
    assert builder.ok is False and "is not a Python environment" in builder.message
    assert (folder / "notes.txt").read_text() == "keep me"


def test_cancelled_creation_removes_the_partial_environment(bundle_dir, tmp_path, offline, qgis_app):
    plan = envsetup.make_plan(tmp_path / "env", SYSTEM_PYTHON, bundle_dir / "requirements.txt", gpu=None,
                              wheels=bundle_dir)
    builder = envbuilder.EnvironmentBuilder(plan).start()
    wait_for(lambda: (plan.venv / "pyvenv.cfg").exists(), 60, "the venv")
    builder.cancel()
    wait_for(lambda: builder.done, 60, "the cancel")
    assert builder.ok is False and builder.cancelled and "cancelled" in builder.message
    assert not plan.venv.exists()


def test_unreachable_torch_index_falls_back_to_the_registry(bundle_dir, tmp_path, offline, qgis_app):
    """The registry here is the bundle folder; the torch CPU index is a closed port."""
    links = ["--no-index", "--find-links", str(bundle_dir / "wheels" / "common"),
             "--find-links", str(bundle_dir / "wheels" / "torch-cuda")]
    plan = envsetup.make_plan(tmp_path / "env", SYSTEM_PYTHON, bundle_dir / "requirements.txt", gpu=None,
                              cpu_index="http://127.0.0.1:9/whl/cpu", platform="linux", registry=links,
                              engine_source=paths.engine_source_dir())
    start = time.monotonic()
    builder, progress = _build(plan)
    print(f"\n{builder.message}")
    assert builder.ok, builder.message
    assert time.monotonic() - start < 120
    assert "127.0.0.1:9 could not be reached" in builder.message and "package registry" in builder.message
    assert "torch 2.14.1 (CUDA 12.8 build)" in builder.message and "runs on the CPU" in builder.message
    assert "CPU build" not in builder.message.replace("runs on the CPU", "")
    assert any("package registry" in text for _, text in progress)


def test_builder_failure_is_reported(tmp_path, qgis_app):
    plan = envsetup.make_plan(tmp_path / "env", str(tmp_path / "no-python"), None, gpu=None)
    builder, _ = _build(plan, 60)
    assert builder.ok is False
    assert "failed" in builder.message or "cannot" in builder.message
    assert settings.get("engine/python", "", str) == ""


def test_bundle_installer_script_installs_plugin_and_engine_offline(bundle_dir, tmp_path, offline):
    profiles = tmp_path / "profiles"
    env = {**wheels.offline_env(), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": SYSTEM_PYTHON,
           "QGIS_PROFILES_DIR": str(profiles)}
    done = wheels.run(["sh", str(bundle_dir / "install.sh"), "cpu"], env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    profile = profiles / "default"
    assert (profile / "python" / "plugins" / "asymkd_qgis" / "metadata.txt").is_file()
    python = profile / "asymkd" / "engine-env" / "bin" / "python"
    torch = wheels.run([str(python), "-c", "import torch, asymkd; print(torch.__version__)"], env={"PATH": "/usr/bin"})
    assert torch.stdout.strip() == "2.14.1+cpu", torch.stderr
    bad = wheels.run(["sh", str(bundle_dir / "install.sh"), "rocm"], env=env)
    assert bad.returncode == 2 and "no torch-rocm wheels" in bad.stderr
