#!/usr/bin/env bash
# The CUDA path and GPU throughput, with the CPU figures beside them (under 8 minutes on one
# GPU). Skips cleanly, exit 0, where there is no NVIDIA GPU.
#   tools/gpu_check.sh            (make gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no CUDA GPU visible to torch; skipped"
  exit 0
fi
"$PY" -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0)); print('onnxruntime providers', ort.get_available_providers())"
echo "== CUDA tests"
"$PY" -m pytest -q tests/backend/test_cuda.py tests/backend/test_distributed_train.py -k "cuda or gpu"
for device in cuda cpu; do
  samples=4096; [ "$device" = cpu ] && samples=512
  echo "== training throughput and distillation/plain epoch ratio on $device ($samples patches)"
  "$PY" -m asymkd bench train --rgb 100000 --ms 10000 --repeats 3 --device "$device" \
    --epoch-device "$device" --epoch-samples "$samples" --epoch-count 3
done
echo "== classify tiles/s (onnxruntime CUDA provider, then CPU)"
"$PY" -m asymkd bench classify --size 4096 --repeat 1 --device cuda
"$PY" -m asymkd bench classify --size 4096 --repeat 1 --device cpu
