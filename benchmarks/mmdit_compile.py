"""Compile time of the MMDiT forward+backward, blocks unrolled vs `scan_layers`.

    python benchmarks/mmdit_compile.py [--layers 24] [--dual 13]

A narrow network with SD3.5-M's block layout (`--dual` MMDiT-X blocks, plain blocks, the
context_pre_only block) so that compile time, which grows with the number of distinct blocks
XLA sees, dominates; writes benchmarks/results/mmdit_compile.md.
"""

import argparse
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from opd_jax.models.mmdit import MMDiT, MMDiTConfig  # noqa: E402


def compile_seconds(cfg: MMDiTConfig, scan: bool) -> float:
  model = MMDiT(cfg, rngs=nnx.Rngs(0), lora_rank=4, scan_layers=scan, remat=True)
  graphdef, base, lora = nnx.split(model, nnx.Param, ...)
  x = jnp.zeros((1, 16, 16, cfg.in_channels))
  ctx, pooled = jnp.zeros((1, 8, cfg.joint_attention_dim)), jnp.zeros((1, cfg.pooled_projection_dim))
  ts = jnp.ones((1,))

  def loss(lora):
    return jnp.mean(nnx.merge(graphdef, base, lora)(x, ts, ctx, pooled) ** 2)
  began = time.perf_counter()
  jax.jit(jax.grad(loss)).lower(lora).compile()
  return time.perf_counter() - began


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--layers', type=int, default=24)
  p.add_argument('--dual', type=int, default=13)
  args = p.parse_args()
  cfg = MMDiTConfig(sample_size=16, patch_size=2, in_channels=16, out_channels=16,
                    num_layers=args.layers, attention_head_dim=16, num_attention_heads=4,
                    joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32,
                    pos_embed_max_size=16, dual_attention_layers=tuple(range(args.dual)),
                    qk_norm='rms_norm')
  unrolled, scanned = compile_seconds(cfg, False), compile_seconds(cfg, True)
  commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
  text = (f'# MMDiT compile time: unrolled vs scan_layers\n\n'
          f'Command: `python benchmarks/mmdit_compile.py --layers {args.layers} '
          f'--dual {args.dual}`  \nCommit: `{commit}`  \nMachine: {platform.machine()}, '
          f'{os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.default_backend()}\n\n'
          f'Forward + backward w.r.t. the LoRA, remat on, {args.layers} blocks '
          f'({args.dual} MMDiT-X, {args.layers - args.dual - 1} plain, 1 context_pre_only), '
          f'width 64:\n\n| blocks | compile s |\n|---|---|\n'
          f'| unrolled | {unrolled:.1f} |\n| scan_layers | {scanned:.1f} |\n')
  out = os.path.join(ROOT, 'benchmarks', 'results', 'mmdit_compile.md')
  with open(out, 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
