#!/usr/bin/env bash
# Everything a GPU session checks, in one go, each part time-boxed, logs under OUT (default bench/out/gpu):
#   1. the GPU-marked tests (Triton kernels compiled on the device, the engine on CUDA in fp32 and bf16, ...);
#   2. bench/kernels.py, the grouped-delta micro-benchmark;
#   3. the whole test suite on the GPU machine (in the background during 1 and 2, mostly CPU work);
#   4. workload W on the GPU (BENCHMARK.md: batch 64 on a 0.5B-1.5B shape; preset llama1b, bf16), with the
#      peers, alone on the machine.
# usage: bench/gpu.sh [OUT]   (after `pip install -e clients/python -e '.[test]'`; builds its fixture once)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/out/gpu}
fixture=${LORAPLEX_GPU_FIXTURE:-bench/out/fixture-llama1b}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 bench/fixture.py "$fixture" llama1b 32 16 >"$out/fixture.log" 2>&1 &
builder=$!
suite=""
if [ "${LORAPLEX_GPU_SUITE:-1}" = 1 ]; then  # LORAPLEX_GPU_SUITE=0 leaves the suite out
    timeout 270 python3 -m pytest -q -p no:cacheprovider >"$out/suite.log" 2>&1 &
    suite=$!
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "import triton; print('triton', triton.__version__)"; } 2>&1 | tee "$out/env.txt"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tee "$out/gpu_tests.log" | tail -5
timeout 120 python3 bench/kernels.py --reps 30 2>&1 | tee "$out/kernels.md"
wait "$builder" || { echo "fixture build failed:"; tail -20 "$out/fixture.log"; }
[ -z "$suite" ] || { wait "$suite"; tail -12 "$out/suite.log"; }
timeout 300 python3 bench/workload.py --device cuda --dtype bfloat16 --preset llama1b --fixture "$fixture" \
    --threads 8 --rounds 3 --peers hf,peft 2>&1 | tee "$out/workload.log" | grep -v '^{"round"'
