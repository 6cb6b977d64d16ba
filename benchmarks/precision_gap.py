"""How well each mixed-precision policy keeps the ODE loss signal: the teacher − student
velocity gap, against float32.

    python benchmarks/precision_gap.py [--network small] [--gap 0.04] [--samples 4]

The OPD ODE loss is ½‖μ_S − μ_T‖² = ½Δt²‖v_S − v_T‖²: a small difference of two large
velocities. A random SD3.5-architecture MMDiT (`NETWORKS` of opd_round_throughput) is the
student (its base, LoRA B = 0); the teacher is the same base with a random LoRA on the recipe's
eight attention projections, scaled so that the float32 gap ‖v_T − v_S‖ / ‖v_S‖ is `--gap`
(3.9 % in the audit that motivated this). Inputs are x_t = (1 − t)·x_0 + t·ε at the recipe's
9 trained noise levels (10-step schedule, shift 3) with random text embeddings. For each
policy the same float32 weights are cast to the policy's storage dtype, and it reports, against
float32 on identical inputs: the relative error of the gap ‖Δ_p − Δ_32‖ / ‖Δ_32‖, of the loss
‖Δ_p‖² / ‖Δ_32‖² − 1, and of the velocity ‖v_p − v_32‖ / ‖v_32‖ (means over noise levels and
samples). Policies (`model.*` fields of configs/opd_sd35m.py):

  fp16                  float16 weights and compute (the audit's comparison; not on CPU)
  bf16                  bfloat16 weights and compute everywhere (softmax float32, as always)
  bf16+residual         … residual streams float32 (model.float32_residual)
  bf16+output           … output layer float32 (model.float32_output)
  bf16+matmul_out       … every linear returns float32 products (model.float32_matmul_output)
  bf16+all              all three
  bf16 weights, f32     bfloat16 weight storage, float32 compute (storage rounding alone)

Writes benchmarks/results/precision_gap.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

from opd_round_throughput import NETWORKS, TEXT_TOKENS   # noqa: E402
from opd_jax.models.lora import split_model                 # noqa: E402
from opd_jax.models.mmdit import MMDiT, MMDiTConfig        # noqa: E402
from opd_jax.sampling.schedule import flow_match_sigmas   # noqa: E402

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
# name: (weight dtype, compute dtype, float32 residual, float32 output, float32 matmul output)
POLICIES = {
    'float32': (F32, F32, False, False, False),
    'fp16': (F16, F16, False, False, False),
    'bf16': (BF16, BF16, False, False, False),
    'bf16+residual': (BF16, BF16, True, False, False),
    'bf16+output': (BF16, BF16, False, True, False),
    'bf16+matmul_out': (BF16, BF16, False, False, True),
    'bf16+all': (BF16, BF16, True, True, True),
    'bf16 weights, f32': (BF16, F32, False, False, False),
}


def network(config: dict, policy: str, rank: int):
  weights, compute, residual, output, matmul_out = POLICIES[policy]
  return MMDiT(MMDiTConfig.from_dict(config), rngs=nnx.Rngs(0), lora_rank=rank,
               lora_alpha=float(rank), dtype=compute, param_dtype=weights,
               float32_residual=residual, float32_output=output,
               float32_matmul_output=matmul_out)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--network', choices=sorted(NETWORKS), default='small')
  p.add_argument('--side', type=int, default=32, help='latent side (32: 256 image tokens)')
  p.add_argument('--gap', type=float, default=0.039, help='float32 relative teacher gap')
  p.add_argument('--samples', type=int, default=4)
  p.add_argument('--rank', type=int, default=32)
  p.add_argument('--out_dir', default=os.path.join(ROOT, 'benchmarks', 'results'))
  args = p.parse_args(argv)
  config = dict(NETWORKS[args.network], sample_size=args.side)
  config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}

  # float32 weights: the base as initialised, a random teacher LoRA (B ≠ 0).
  _, base, adapter = split_model(network(config, 'float32', args.rank))
  adapter = nnx.to_pure_dict(adapter)        # lora_a as initialised, lora_b = 0
  paths, treedef = jax.tree_util.tree_flatten_with_path(adapter)
  keys = jax.random.split(jax.random.PRNGKey(1), len(paths))
  teacher_b = jax.tree.unflatten(treedef, [
      jax.random.normal(k, x.shape) if 'lora_b' in jax.tree_util.keystr(path) else
      jnp.zeros_like(x) for k, (path, x) in zip(keys, paths)])
  base = nnx.to_pure_dict(base)

  rng = np.random.default_rng(0)
  n, side, ch = args.samples, args.side, config['in_channels']
  sig = flow_match_sigmas(10, 3.0)[:9]
  x0 = rng.standard_normal((n, side, side, ch)).astype(np.float32)
  eps = rng.standard_normal((len(sig), n, side, side, ch)).astype(np.float32)
  xt = np.stack([(1 - t) * x0 + t * e for t, e in zip(sig, eps)])        # [9, n, ...]
  context = rng.standard_normal((n, TEXT_TOKENS[args.network], config['joint_attention_dim']))
  pooled = rng.standard_normal((n, config['pooled_projection_dim']))
  context, pooled = context.astype(np.float32), pooled.astype(np.float32)

  def velocities(policy: str, teacher_scale: float):
    g, _, _ = split_model(network(config, policy, args.rank))
    weights = POLICIES[policy][0]
    b = jax.tree.map(lambda x: x.astype(weights), base)

    @jax.jit
    def run(adapter, x, t):
      model = nnx.merge(g, b, adapter)
      return model(x, jnp.full((n,), t * 1000.0), context, pooled)
    student = [run(adapter, xt[j], float(sig[j])) for j in range(len(sig))]
    teacher_adapter = jax.tree.map(lambda a, d: a + d * teacher_scale, adapter, teacher_b)
    teacher = [run(teacher_adapter, xt[j], float(sig[j])) for j in range(len(sig))]
    return np.stack(student), np.stack(teacher)

  # Scale the teacher LoRA until the float32 gap is --gap (a few multiplicative corrections).
  scale = 1e-3
  for _ in range(6):
    s32, t32 = velocities('float32', scale)
    rel = float(np.linalg.norm(t32 - s32) / np.linalg.norm(s32))
    if abs(rel / args.gap - 1) < 0.02:
      break
    scale *= args.gap / rel
  gap32 = t32 - s32
  measured_gap = float(np.linalg.norm(gap32) / np.linalg.norm(s32))

  def per_sample_norm(a):
    return np.sqrt(np.sum(np.square(a), axis=(2, 3, 4)))      # [steps, samples]

  rows = []
  for policy in POLICIES:
    if policy == 'float32':
      continue
    if policy == 'fp16' and jax.default_backend() == 'cpu':
      continue   # XLA:CPU has no float16 dot with float32 accumulation (the attention logits)
    s, t = velocities(policy, scale)
    gap = t - s
    rows.append({
        'policy': policy,
        'gap_error': float(np.mean(per_sample_norm(gap - gap32) / per_sample_norm(gap32))),
        'loss_error': float(np.mean(np.abs(per_sample_norm(gap) ** 2 /
                                           per_sample_norm(gap32) ** 2 - 1))),
        'velocity_error': float(np.mean(per_sample_norm(s - s32) / per_sample_norm(s32))),
    })
    print(json.dumps(rows[-1]), flush=True)
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
  meta = {'command': 'python benchmarks/precision_gap.py ' + ' '.join(argv or sys.argv[1:]),
          'network': args.network, 'image_tokens': (args.side // 2) ** 2,
          'float32_gap': measured_gap, 'samples': n, 'noise_levels': len(sig), 'commit': commit,
          'machine': f'{platform.machine()} {os.cpu_count()}-core {platform.system()} host, '
                     f'{jax.default_backend()}',
          'date': datetime.date.today().isoformat()}
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'precision_gap.json'), 'w') as f:
    json.dump({'rows': rows, 'meta': meta}, f, indent=2)
  lines = ['# Mixed precision and the teacher − student gap', '',
           f'`{meta["command"]}` on {meta["machine"]} ({meta["date"]}, commit {commit}). '
           f'Random {args.network} SD3.5-architecture MMDiT at {meta["image_tokens"]} image '
           f'tokens; teacher = base + random r{args.rank} LoRA with a float32 gap '
           f'‖v_T − v_S‖/‖v_S‖ = {100 * measured_gap:.1f} %; {n} samples × {len(sig)} noise '
           'levels; errors are means of per-sample relative errors against float32.', '',
           '| policy | gap error | loss error | velocity error |', '|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["policy"]} | {100 * r["gap_error"]:.2f} % | '
                 f'{100 * r["loss_error"]:.2f} % | {100 * r["velocity_error"]:.3f} % |')
  with open(os.path.join(args.out_dir, 'precision_gap.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  return {'rows': rows, 'meta': meta}


if __name__ == '__main__':
  main()
