"""Where a model's reward varies: between samples of one prompt, or between prompts.

    python benchmarks/reward_spread.py                      # the shipped base, 64 train prompts × 8
    python benchmarks/reward_spread.py --adapter=runs/opd_seed0/teacher_text/teacher --cfg 2

RL can only sharpen what varies between the samples of one prompt (a GRPO group). For each
task this samples `--samples` images per prompt of the train split (40-step Euler ODE, the
samples differing only in their initial noise, the recipe's evaluation otherwise) and splits the
headline score's variance into the mean within-prompt variance and the variance of the prompt
means. Writes benchmarks/results/reward_spread.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs.mini import common                    # noqa: E402


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--base', default='', help='a base artifact (default: the shipped base)')
  p.add_argument('--adapter', default='', help='a LoRA adapter artifact (default: none)')
  p.add_argument('--cfg', type=float, default=2.0, help='CFG scale (the base\'s own: 2)')
  p.add_argument('--prompts', type=int, default=64)
  p.add_argument('--samples', type=int, default=8)
  p.add_argument('--split', default='train')
  p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'reward_spread.md'))
  args = p.parse_args(argv)
  os.chdir(ROOT)
  from opd_jax.eval.mini_world import Evaluator
  from opd_jax.mini_world import artifacts, shipped_base
  e = common.evaluation()
  e.split, e.max_prompts, e.samples_per_prompt = args.split, args.prompts, args.samples
  e.batch_size = 128
  base = artifacts.load_base(args.base) if args.base else shipped_base.load()[0]
  data = common.data()
  ev = Evaluator(base, e, data.data_dir, data.dataset_config)
  adapter = artifacts.load_adapter(args.adapter) if args.adapter else None
  scores = ev.scores(adapter, args.cfg)
  commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
  lines = ['# Reward spread: within prompts vs between prompts', '',
           f'Command: `python benchmarks/reward_spread.py {" ".join(sys.argv[1:])}`  ',
           f'Commit: `{commit}`  ',
           f'Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU  ',
           f'Model: {args.base or "the shipped base"}{" + " + args.adapter if args.adapter else ""}'
           f' at CFG {args.cfg}; {args.prompts} {args.split} prompts × {args.samples} samples '
           '(40-step Euler ODE, samples differ in initial noise).', '',
           '| task | mean | within-prompt variance | variance of prompt means | prompts whose '
           'samples differ | mean within-prompt std |', '|---|---|---|---|---|---|']
  for task, s in scores.items():
    v = s['headline'].reshape(-1, args.samples)
    lines.append(f'| {task} | {v.mean():.3f} | {v.var(axis=1, ddof=1).mean():.4f} | '
                 f'{v.mean(axis=1).var(ddof=1):.4f} | {np.mean(v.std(axis=1) > 0):.2f} | '
                 f'{v.std(axis=1, ddof=1).mean():.3f} |')
  text = '\n'.join(lines) + '\n'
  with open(args.out, 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
