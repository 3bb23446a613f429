#!/usr/bin/env bash
# The GPU checks in one run: tests/gpu, then `prefix-serve bench w3`, its shared variant one
# step at a time, and 256 requests; logs and figures go to $OUT (bench/results where it is
# unset). About 3 minutes on an H200. Run from the checkout's root with the Python that has torch (CUDA),
# transformers, peft and triton:
#     bash bench/gpu_check.sh            # PYTHON=... to pick another interpreter
set -u -o pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  $py -c 'import torch, triton, transformers, peft; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name())'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} 2>&1 | tee "$out/env.txt"
status=0
timeout 240 $py -m pytest -q -p no:cacheprovider -rfE tests/gpu 2>&1 | tee "$out/gpu_tests.log" || status=1
timeout 300 $py -m server.cli bench w3 --json "$out/w3.json" ${W3_ARGS:-} 2>&1 | tee "$out/w3.log" || status=1
# The shared variant one step at a time (no windows): what the windows change.
timeout 120 $py -m server.cli bench w3 --variants shared --no-baselines --new-tokens 64 \
  --window 1 --json "" 2>&1 | tee "$out/w3_window1.log" || status=1
# 256 requests in flight, one shared prefix, the engine alone.
timeout 150 $py -m server.cli bench w3 --requests 256 --variants shared --no-baselines \
  --json "$out/w3_256.json" 2>&1 | tee "$out/w3_256.log" || status=1
exit $status
