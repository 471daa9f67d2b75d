#!/usr/bin/env bash
# The GPU speed suite behind results/speed/README.md, in one device call (≤ 10 min on an H200):
# kernel tests on the GPU, kernel TOPS against measured ceilings, then end-to-end rows for SD 1.5
# (PNDM 50, batch 1) and DiT-XL/2 (DDIM 50, batch 1). Each step has a time limit so the call ends
# inside the device's 10-minute command limit; rows cut by a budget say so in the JSON.
# Usage: benchmarks/run_speed_suite.sh OUT_DIR   (PYTHONPATH must reach cachequant, diffusers, torchao, DeepCache)
set -u
out=${1:?usage: run_speed_suite.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  echo "== kernel tests (GPU)"; timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -8
  echo "== kernel TOPS"; timeout 80 python3 benchmarks/speed.py --kernels-only --out "$out/kernels.json" 2>&1 | grep '^{' | tail -12
  echo "== SD 1.5"; timeout 250 python3 benchmarks/speed.py --model sd15 --batch 1 --time-budget-s 200 \
      --rows "fp16 eager,fp16 + CUDA,quant-only,N=5 INT8 + graph,N=5 FP8 + graph,DeepCache N=5,torch.compile,torchao" \
      --out "$out/sd15.json" 2>&1 | grep '^{' | cut -c1-220
  echo "== DiT-XL/2 DDIM 50"; timeout 130 python3 benchmarks/speed.py --model dit-xl2 --sampler ddim --batch 1 \
      --time-budget-s 100 --rows "fp16 eager,fp16 + CUDA,quant-only,N=2 INT8 + graph,N=2 FP8 + graph,N=3 FP8,torch.compile" \
      --out "$out/dit-ddim50.json" 2>&1 | grep '^{' | cut -c1-220
} 2>&1 | tee "$out/suite.log"
