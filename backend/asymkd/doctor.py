"""Environment report: Python, torch, CUDA devices, onnxruntime providers, versions, paths."""

from __future__ import annotations

import importlib
import platform
import sys
from typing import Any


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # a missing or broken package is what doctor reports, not an error
        return None


def doctor_report() -> dict[str, Any]:
    report: dict[str, Any] = {
        "python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform(),
        "packages": {m: _version(m) for m in
                     ("asymkd", "torch", "torchvision", "timm", "numpy", "rasterio", "pyogrio",
                      "onnx", "onnxruntime", "safetensors")},
    }
    try:
        import torch
        cuda = torch.cuda.is_available()
        report["torch_cuda_build"] = torch.version.cuda
        report["cuda_available"] = cuda
        count = torch.cuda.device_count() if cuda else 0
        report["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(count)]
        report["device"] = "cuda" if cuda else "cpu"
        if not cuda:
            report["cuda_reason"] = ("torch is a CPU build" if torch.version.cuda is None
                                     else "no CUDA device visible (driver or GPU missing)")
        report["cpu_threads"] = torch.get_num_threads()
    except Exception as exc:
        report["torch_error"] = str(exc)
    try:
        import onnxruntime
        report["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception as exc:
        report["onnxruntime_error"] = str(exc)
    import asymkd
    report["asymkd_path"] = asymkd.__path__[0]
    return report
