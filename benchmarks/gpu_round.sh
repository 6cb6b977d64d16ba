#!/usr/bin/env bash
# The GPU measurements of issue #17, as one script (run from the repository root on a machine
# with one NVIDIA GPU and the CUDA builds of jax and torch installed):
#   1. the SD3.5-M OPD round at 512 px (1024 image + 205 text tokens), bfloat16, block
#      checkpointing on both sides, 3 prompts per task: PyTorch (diffusers + peft) vs opd_jax
#      two-pass / fused / fused + einsum attention, with MFU against the bf16 peak;
#   2. the mixed-precision study on the GPU, where float16 runs too (XLA:CPU cannot).
# Results: benchmarks/results/opd_round_throughput_gpu_bfloat16.{md,json} and
# benchmarks/results/gpu/precision_gap.{md,json}.
set -euo pipefail
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}   # torch shares the GPU
python benchmarks/opd_round_throughput.py --points sd35m:64 --dtype=bfloat16 --prompts=3 \
    --remat --rounds=5
python benchmarks/precision_gap.py --network=sd35m --side=64 --samples=2 \
    --out_dir=benchmarks/results/gpu
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
