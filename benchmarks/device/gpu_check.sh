#!/usr/bin/env bash
# Runs on the GPU machine (H100/H200 image: Python 3.12, jax 0.11.x + CUDA, torch 2.11, transformers 5.x, no
# network, the project not pip-installed), from the project root, after benchmarks/device/prepare.sh filled
# .device/whl. About 8-9 minutes: the step benchmark (unrolled with cuDNN attention beside torch eager and
# torch.compile; unrolled with XLA attention; scan with the default full remat and with remat=minimal), the
# remat memory table on the GPU, and the GPU test lane (benchmarks/device/gpu_tests.txt, the same list as
# `make test-gpu`, gpu-marked tests included). Every part has its own timeout; results are copied to $OUT
# (default .device/out) as they finish.
# Usage: bash benchmarks/device/gpu_check.sh [bench|tests|all]   (default all)
set -u
what=${1:-all}
[ -f pyproject.toml ] || { echo "run from the project root" >&2; exit 2; }
OUT=${OUT:-.device/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The tree is not pip-installed here: lay configs/ where `sga_jax.configs` resolves.
[ -e sga_jax/configs ] || cp -r configs sga_jax/configs
python3 -c "import jax, flax, optax, torch, transformers; print('versions: jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"
B="python3 benchmarks/step_vs_torch.py --model llama1b --dtype bfloat16 --seq 512 --batch 8 --steps 20 --warmup 3"
if [ "$what" != tests ]; then
  SECONDS=0; timeout 300 $B --attention auto --tag gpu_unrolled; echo "== bench unrolled, auto (cuDNN) attention (+ torch eager, torch.compile): rc=$? ${SECONDS}s"
  SECONDS=0; timeout 90 $B --attention xla --skip torch-eager torch-compile --tag gpu_unrolled_xla; echo "== bench unrolled, XLA attention: rc=$? ${SECONDS}s"
  SECONDS=0; timeout 90 $B --scan --skip peak torch-eager torch-compile --tag gpu_scan; echo "== bench scan, default remat (full): rc=$? ${SECONDS}s"
  SECONDS=0; timeout 90 $B --scan --remat minimal --skip peak torch-eager torch-compile --tag gpu_scan_minimal; echo "== bench scan, remat=minimal: rc=$? ${SECONDS}s"
  SECONDS=0; timeout 90 python3 benchmarks/scaling_memory.py --table remat --tag remat_memory_gpu; echo "== remat memory table on the GPU: rc=$? ${SECONDS}s"
  cp benchmarks/results/step_vs_torch_gpu_*.json benchmarks/results/step_vs_torch_gpu_*.md benchmarks/results/remat_memory_gpu.* "$OUT/" 2>/dev/null
fi
if [ "$what" != bench ]; then
  SECONDS=0
  # -o addopts="": the default suite deselects `gpu`-marked tests; here they run. float32 tests pin
  # jax.default_matmul_precision("highest") themselves (tests/conftest.py), so no TF32 tolerance misses.
  timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" -ra --tb=line \
    $(cat benchmarks/device/gpu_tests.txt) 2>&1 | tail -40
  echo "== GPU tests: ${SECONDS}s"
fi
