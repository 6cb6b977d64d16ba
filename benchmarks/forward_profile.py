"""Where the XLA:CPU time of one MMDiT forward goes, by kind of operation (jax.profiler).

    python benchmarks/forward_profile.py [--network small] [--side 32] [--batch 8]
        [--attention ''|xla|einsum]

Traces 3 jitted forwards of a random SD3.5-architecture MMDiT (`NETWORKS` of
opd_round_throughput; side 32 = 256 image tokens), sums the duration of every XLA operation in the
trace, and classifies each by the compiled HLO it runs: a matmul (by the shape of the product —
[B, heads, tokens, tokens] are attention logits, [B, heads, head_dim, tokens] or
[B, heads, tokens, head_dim] attention outputs, 2-D ones the linear layers), a softmax-like
fusion (exponentials), GELU, norms, other. Writes benchmarks/results/forward_profile_cpu.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

from opd_round_throughput import NETWORKS, TEXT_TOKENS   # noqa: E402
from opd_jax.models.mmdit import MMDiT, MMDiTConfig        # noqa: E402


def _computations(hlo: str) -> tuple[dict, dict]:
  comps, current = {}, None
  for line in hlo.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      current = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      comps[current] = []
    elif current:
      comps[current].append(line.strip())
  instructions = {}
  for lines in comps.values():
    for l in lines:
      m = re.match(r'^(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(', l)
      if m:
        instructions[m.group(1)] = (m.group(2), m.group(3), l)
  return comps, instructions


def _kind(name: str, comps: dict, instructions: dict) -> str:
  if name not in instructions:
    return 'runtime'
  shape, op, line = instructions[name]
  called = re.search(r'calls=%([\w.\-]+)', line)
  body = ' '.join(comps.get(called.group(1), [])) if called else line
  dots = re.findall(r'= (\S+) dot\(', body) or ([shape] if op == 'dot' else [])
  if dots:
    dims = [d for d in re.findall(r'\[([\d,]*)\]', dots[0])[0].split(',') if d]
    return f'matmul, product rank {len(dims)}' + (' (attention)' if len(dims) == 4 else '')
  for key, kind in (('exponential(', 'softmax / exp'), ('tanh(', 'GELU (tanh)'),
                    ('rsqrt(', 'norms'), ('reduce(', 'reductions')):
    if key in body:
      return kind
  if op in ('copy', 'transpose') or 'transpose(' in body or 'copy' in name:
    return 'copies / transposes'
  return 'other element-wise'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--network', choices=sorted(NETWORKS), default='small')
  p.add_argument('--side', type=int, default=32)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--attention', default='')
  p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results',
                                               'forward_profile_cpu.md'))
  args = p.parse_args(argv)
  config = {k: list(v) if isinstance(v, tuple) else v
            for k, v in dict(NETWORKS[args.network], sample_size=args.side).items()}
  model = MMDiT(MMDiTConfig.from_dict(config), rngs=nnx.Rngs(0), lora_rank=32, lora_alpha=64.0,
                attention_impl=args.attention or None)
  graphdef, state = nnx.split(model)
  b = args.batch
  inputs = (jnp.zeros((b, args.side, args.side, config['in_channels'])), jnp.ones((b,)),
            jnp.zeros((b, TEXT_TOKENS[args.network], config['joint_attention_dim'])),
            jnp.zeros((b, config['pooled_projection_dim'])))
  forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
  jax.block_until_ready(forward(state, *inputs))
  began = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(forward(state, *inputs))
  seconds = (time.perf_counter() - began) / 3
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(3):
        jax.block_until_ready(forward(state, *inputs))
    trace = json.load(gzip.open(glob.glob(f'{folder}/**/*.trace.json.gz', recursive=True)[0]))
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  comps, instructions = _computations(forward.lower(state, *inputs).compile().as_text())
  by_kind = collections.Counter()
  for e in events:
    name = e.get('name', '')
    if e.get('ph') == 'X' and name in instructions:
      by_kind[_kind(name, comps, instructions)] += e.get('dur', 0)
  total = sum(by_kind.values())
  lines = ['# Where the XLA:CPU time of an MMDiT forward goes', '',
           f'`python benchmarks/forward_profile.py {" ".join(argv or sys.argv[1:])}` — '
           f'{args.network} network, {(args.side // 2) ** 2} image + '
           f'{TEXT_TOKENS[args.network]} text tokens, batch {b}, float32, attention '
           f'{args.attention or "jax default"}; {os.cpu_count()}-core CPU, one forward '
           f'{1e3 * seconds:.0f} ms (mean of 3). Share of the summed XLA operation time '
           '(jax.profiler trace of 3 forwards):', '', '| operations | share |', '|---|---|']
  for kind, t in by_kind.most_common():
    lines.append(f'| {kind} | {100 * t / total:.1f} % |')
  text = '\n'.join(lines) + '\n'
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
