#!/usr/bin/env bash
# The GPU speed suite behind benchmarks/results/<device>.md, in one device call (~10 min on an H200):
# kernel tests on the GPU, kernel TOPS against measured ceilings, then the end-to-end rows for
# SD 1.5 (PNDM 50, batch 1) and DiT-XL/2 (DDIM 50 all rows; DDPM 250 the headline rows).
# Usage: benchmarks/run_speed_suite.sh OUT_DIR   (PYTHONPATH must reach cachequant, diffusers, torchao, DeepCache)
set -u
out=${1:?usage: run_speed_suite.sh OUT_DIR}
mkdir -p "$out"
log="$out/suite.log"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  echo "== kernel tests (GPU)"; timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -8
  echo "== kernel TOPS"; timeout 90 python3 benchmarks/speed.py --kernels-only --out "$out/kernels.json" 2>&1 | tail -12
  echo "== SD 1.5"; timeout 200 python3 benchmarks/speed.py --model sd15 --batch 1 --time-budget-s 170 \
      --out "$out/sd15.json" 2>&1 | grep -v Warning | tail -22
  echo "== DiT-XL/2 DDIM 50"; timeout 150 python3 benchmarks/speed.py --model dit-xl2 --sampler ddim --batch 1 \
      --time-budget-s 120 --rows "fp16 eager,fp16 + CUDA,cache-only,quant-only,+ graph,FirstBlock,compile,torchao" \
      --out "$out/dit-ddim50.json" 2>&1 | grep -v Warning | tail -22
} 2>&1 | tee "$log"
