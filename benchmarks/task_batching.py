"""Should the round evaluate its K tasks as one batch? Network calls timed both ways on this host.

    python benchmarks/task_batching.py [--points small:16 small:32] [--prompts 4] [--repeats 7]

The round takes the tasks in turn (`opd.teachers.round_robin`: a `lax.scan` over the M tasks,
each a batch of B prompts scored by its own teacher adapter, picked by a traced index). The
alternative is one batch of M·B samples: the student (one adapter for every task) on M·B samples,
and the teachers as one call whose base matmuls see all M·B samples while each sample meets its
own task's adapter (a `vmap` over the stacked adapters: the base weights are shared, so XLA
lowers their matmuls to one [M·B·T, D] product; only the rank-r adapter matmuls are batched per
task). Timed here, jitted, at the benchmark networks of `opd_round_throughput.py`, with the
guided (2B) batch of CFG:
  teacher forward        M calls of 2B  vs  one grouped call of 2·M·B
  student forward + VJP  M calls of 2B  vs  one call of 2·M·B (the fused round's per-step work)
Medians of `--repeats` timed calls after one warm-up; both forms in one process, alternated.
Writes benchmarks/results/task_batching_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import jax                                            # noqa: E402
import jax.numpy as jnp                               # noqa: E402
import ml_collections                                 # noqa: E402
from flax import nnx                                  # noqa: E402

from configs.opd_sd35m import get_config              # noqa: E402
from opd_jax.models.lora import select_adapter, split_model, stack_adapters   # noqa: E402
from opd_jax.models.policy import Policy              # noqa: E402
from opd_jax.models.registry import make_module       # noqa: E402
from opd_round_throughput import TEXT_TOKENS, network          # noqa: E402

TASKS, RANK, ALPHA = 3, 32, 64.0


def build(name: str, side: int):
  net = network(name, side)
  c = get_config()
  c.model.transformer = ml_collections.ConfigDict(
      {k: list(v) if isinstance(v, tuple) else v for k, v in net.items()})
  c.model.update(latent_size=side, latent_channels=net['in_channels'], dtype='float32',
                 param_dtype='float32', remat=False, attention='')
  graphdef, base, adapter = split_model(make_module(c.model, seed=0, lora_rank=RANK,
                                                    lora_alpha=ALPHA))
  base, adapter = nnx.to_pure_dict(base), nnx.to_pure_dict(adapter)
  leaves, treedef = jax.tree.flatten(adapter)
  teachers = stack_adapters([jax.tree.unflatten(treedef, [
      x + 0.01 * jax.random.normal(jax.random.PRNGKey(10 * k + i), x.shape)
      for i, x in enumerate(leaves)]) for k in range(TASKS)])
  return Policy(graphdef), base, adapter, teachers, net


def inputs(net: dict, name: str, prompts: int):
  """[M, 2B, ...] latents, timesteps and conditioning (the guided batch of each task)."""
  rng = np.random.default_rng(0)
  side, ch = net['sample_size'], net['in_channels']
  n = 2 * prompts
  x = rng.standard_normal((TASKS, n, side, side, ch)).astype(np.float32)
  t = np.full((TASKS, n), 0.7, np.float32)
  cond = {'context': rng.standard_normal((TASKS, n, TEXT_TOKENS[name],
                                          net['joint_attention_dim'])).astype(np.float32),
          'pooled': rng.standard_normal((TASKS, n, net['pooled_projection_dim'])
                                        ).astype(np.float32)}
  return jnp.asarray(x), jnp.asarray(t), jax.tree.map(jnp.asarray, cond)


def forms(policy: Policy, base, adapter, teachers):
  flat = lambda a: a.reshape((-1,) + a.shape[2:])

  @jax.jit
  def teacher_in_turn(x, t, cond):
    def body(_, xs):
      k, x, t, cond = xs
      return None, policy.velocity(base, select_adapter(teachers, k))(x, t, cond)
    return jax.lax.scan(body, None, (jnp.arange(TASKS), x, t, cond))[1]

  @jax.jit
  def teacher_grouped(x, t, cond):
    one = lambda a, x, t, cond: policy.velocity(base, a)(x, t, cond)
    return jax.vmap(one)(teachers, x, t, cond)

  def student_vjp(p, x, t, cond):
    out, back = jax.vjp(lambda p: policy.velocity(base, p)(x, t, cond), p)
    return back(jnp.ones_like(out))[0]

  @jax.jit
  def student_in_turn(p, x, t, cond):
    def body(acc, xs):
      g = student_vjp(p, *xs)
      return jax.tree.map(jnp.add, acc, g), None
    return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, p), (x, t, cond))[0]

  @jax.jit
  def student_batched(p, x, t, cond):
    return student_vjp(p, flat(x), flat(t), jax.tree.map(flat, cond))

  return {'teacher forward': (teacher_in_turn, teacher_grouped),
          'student forward + VJP': (lambda x, t, c: student_in_turn(adapter, x, t, c),
                                    lambda x, t, c: student_batched(adapter, x, t, c))}


def time_pair(a, b, args_, repeats: int) -> tuple[list[float], list[float], float]:
  outs = [jax.block_until_ready(f(*args_)) for f in (a, b)]    # compile both
  gap = max(float(jnp.max(jnp.abs(u - v))) for u, v in
            zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])))
  ta, tb = [], []
  for _ in range(repeats):
    for f, acc in ((a, ta), (b, tb)):
      began = time.perf_counter()
      jax.block_until_ready(f(*args_))
      acc.append(time.perf_counter() - began)
  return ta, tb, gap


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--points', nargs='+', default=['small:16', 'small:32'])
  p.add_argument('--prompts', type=int, default=4, help='B, prompts per task')
  p.add_argument('--repeats', type=int, default=7)
  p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'task_batching_cpu'))
  args = p.parse_args(argv)
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
  rows = []
  for point in args.points:
    name, side = point.split(':')
    policy, base, adapter, teachers, net = build(name, int(side))
    data = inputs(net, name, args.prompts)
    for what, (in_turn, grouped) in forms(policy, base, adapter, teachers).items():
      ta, tb, gap = time_pair(in_turn, grouped, data, args.repeats)
      rows.append({'point': point, 'image_tokens': (int(side) // 2) ** 2, 'work': what,
                   'in_turn_s': float(np.median(ta)), 'batched_s': float(np.median(tb)),
                   'speedup': float(np.median(ta) / np.median(tb)), 'max_abs_gap': gap,
                   'all_in_turn_s': ta, 'all_batched_s': tb})
      print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith('all_')}),
            flush=True)
  meta = {'command': 'python benchmarks/task_batching.py ' + ' '.join(argv or sys.argv[1:]),
          'commit': commit, 'tasks': TASKS, 'prompts_per_task': args.prompts,
          'machine': f'{platform.machine()} {os.cpu_count()}-core {platform.system()}, '
                     f'{jax.devices()[0].platform}'}
  with open(args.out + '.json', 'w') as f:
    json.dump({'rows': rows, 'meta': meta}, f, indent=2)
  lines = ['# Tasks in turn vs one batch: network calls of the OPD round', '',
           f'`{meta["command"]}` — commit {commit}, {meta["machine"]}. {TASKS} tasks × '
           f'{args.prompts} prompts, guided (2B) batches, float32, r{RANK} LoRA; median of '
           f'{args.repeats} calls after a warm-up, the two forms alternated in one process.', '',
           '| network | image tokens | work | tasks in turn s | one batch s | '
           'one batch speed-up (in turn s / one batch s) | max abs difference |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["point"]} | {r["image_tokens"]} | {r["work"]} | {r["in_turn_s"]:.4f} | '
                 f'{r["batched_s"]:.4f} | {r["speedup"]:.2f}× | {r["max_abs_gap"]:.1e} |')
  with open(args.out + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
