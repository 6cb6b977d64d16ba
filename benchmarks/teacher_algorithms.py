"""Stage-1 algorithms on the mini world: Flow-GRPO vs GRPO-Guard teachers, old vs upstream NFT.

    python benchmarks/teacher_algorithms.py --seeds 0 1 2     # runs/teacher_algorithms/seed<S>/
    python benchmarks/teacher_algorithms.py --seeds 0 --reuse # aggregate what has run

Per seed, each variant trains its teachers through the recipe (configs/opd.py with
`stages='pretrain,teachers'` and its own teacher sections; the shipped base), in its own workdir:

  flow_grpo     configs/mini/grpo.py:<task>                  every task
  grpo_guard    configs/mini/grpo_guard.py:<task>            every task (differs only in algorithm)
  nft           configs/mini/nft.py:composition              the mini world's NFT options
  nft_upstream  configs/mini/nft.py:composition,upstream     upstream DiffusionNFT's options

Every teacher and the base are then evaluated on every task's held-out prompts (the recipe's
report evaluation: 40-step Euler ODE, each model at its own CFG, the same noise for every model),
and each teacher's gain over the base is the paired per-prompt difference ± its standard error
(opd_jax.eval.paired) — on its own task (the gain) and on the other tasks (over-optimisation).
Results: benchmarks/results/teacher_algorithms.{md,json}. Nothing is tuned here: every variant
runs its config file's settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')

from configs import opd as recipe_config              # noqa: E402
from configs.mini import common, grpo, grpo_guard, nft  # noqa: E402
from opd_jax.recipe.report import gain_text, z_text  # noqa: E402

VARIANTS = {
    'flow_grpo': {t: (grpo.get_config, t) for t in common.TASKS},
    'grpo_guard': {t: (grpo_guard.get_config, t) for t in common.TASKS},
    'nft': {'composition': (nft.get_config, 'composition')},
    'nft_upstream': {'composition': (nft.get_config, 'composition,upstream')},
}
# The comparisons written out: (title, variant A, variant B, tasks).
COMPARISONS = (('GRPO-Guard vs Flow-GRPO', 'flow_grpo', 'grpo_guard', common.TASKS),
               ('upstream NFT options vs the mini world\'s', 'nft', 'nft_upstream',
                ('composition',)))


def variant_config(variant: str, seed: int):
  import ml_collections
  c = recipe_config.get_config()
  c.seed = seed
  teachers = {t: make(arg) for t, (make, arg) in VARIANTS[variant].items()}
  c.tasks = tuple(teachers)
  c.teachers = ml_collections.ConfigDict(teachers)
  c.stages = 'pretrain,teachers'
  return c


def run_seed(seed: int, workroot: str) -> dict:
  """Trains every variant's teachers (cached stages are skipped) and scores them per sample."""
  from opd_jax.recipe.evaluation import evaluator
  from opd_jax.mini_world import artifacts
  from opd_jax.recipe.mini_world import mini_world_stages, run_mini_world
  from opd_jax.recipe.stages import Recipe
  scores, seconds, ev, base_scores = {}, {}, None, None
  for variant in VARIANTS:
    c = variant_config(variant, seed)
    workdir = os.path.join(workroot, f'seed{seed}', variant)
    run_mini_world(c, workdir)
    recipe = Recipe(c, workdir, mini_world_stages(tuple(c.tasks)))
    if ev is None:   # every variant starts from the same (shipped) base
      ev = evaluator(recipe, c.report.eval)
      base_scores = ev.scores(None, float(c.report.base_cfg_scale))
    for task in c.tasks:
      record = recipe.result(f'teacher_{task}')
      adapter = artifacts.load_adapter(record['artifact'])
      scores[f'{variant}/{task}'] = ev.scores(adapter, adapter.cfg_scale)
      seconds[f'{variant}/{task}'] = float(record['train_seconds'])
  return {'base': base_scores, 'teachers': scores, 'train_seconds': seconds}


def gains(seed_run: dict) -> dict:
  """{variant/task: {eval task: paired gain over the base}} of one seed."""
  from opd_jax.eval.paired import paired_gain
  base = seed_run['base']
  return {name: {t: paired_gain(base[t]['headline'], s[t]['headline'], base[t]['prompt'])
                 for t in s} for name, s in seed_run['teachers'].items()}


def differences(seed_run: dict) -> dict:
  """{title: {task: paired difference B − A on the task}} of one seed, for each comparison."""
  from opd_jax.eval.paired import paired_gain
  t = seed_run['teachers']
  prompt = {task: s['prompt'] for task, s in seed_run['base'].items()}
  return {title: {task: paired_gain(t[f'{a}/{task}'][task]['headline'],
                                    t[f'{b}/{task}'][task]['headline'], prompt[task])
                  for task in tasks}
          for title, a, b, tasks in COMPARISONS}


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x


def _arrays(x):
  if isinstance(x, dict):
    return {k: _arrays(v) for k, v in x.items()}
  return np.asarray(x) if isinstance(x, list) else x


def markdown(per_seed: dict, meta: dict) -> str:
  seeds = sorted(per_seed)
  lines = ['# Stage-1 algorithms on the mini world', '',
           f'Command: `{meta["command"]}`  ',
           f'Commit: `{meta["commit"]}`  ',
           f'Machine: {meta["machine"]}  ',
           f'Seeds: {seeds}. Held-out prompts per task: {meta["prompts"]}; composition = strict '
           'accuracy, text / aesthetics = mean reward; gain = paired per-prompt difference '
           'teacher − base ± its standard error; z = gain / SE. train s: the teacher stage\'s '
           'training seconds.', '']
  if meta.get('note'):
    lines += [meta['note'], '']
  for title, a, b, tasks in COMPARISONS:
    lines += [f'## {title}', '',
              '| teacher task | algorithm | ' + ' | '.join(f'seed {s}: own gain (z)'
                                                         for s in seeds) +
              ' | mean own gain | other tasks\' gains (mean over seeds) | train s |',
              '|---|---|' + '---|' * (len(seeds) + 3)]
    for task in tasks:
      for variant in (a, b):
        name = f'{variant}/{task}'
        cells, own, others, secs = [], [], {}, []
        for s in seeds:
          g = per_seed[s]['gains'][name]
          own.append(g[task]['mean'])
          cells.append(f'{gain_text(g[task])} ({z_text(g[task])})')
          for u in g:
            if u != task:
              others.setdefault(u, []).append(g[u]['mean'])
          secs.append(per_seed[s]['train_seconds'][name])
        other = ', '.join(f'{u} {np.mean(v):+.3f}' for u, v in others.items())
        lines.append(f'| {task} | {variant} | ' + ' | '.join(cells) +
                     f' | {np.mean(own):+.3f} ± {np.std(own, ddof=1) if len(own) > 1 else 0:.3f}'
                     f' | {other} | {np.mean(secs):.0f} |')
    lines += ['', f'Paired difference {b} − {a} on the teacher\'s own task, per seed (± SE):', '']
    for task in tasks:
      cells = [f'seed {s} {gain_text(d)}'
               for s in seeds for d in [per_seed[s]['differences'][title][task]]]
      lines.append(f'- {task}: ' + ', '.join(cells))
    lines.append('')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--workroot', default=os.path.join(ROOT, 'runs', 'teacher_algorithms'))
  p.add_argument('--reuse', action='store_true',
                 help='aggregate the scores saved by earlier runs of these seeds')
  p.add_argument('--note', default='', help='a line on the conditions of the run, written out')
  args = p.parse_args(argv)
  os.chdir(ROOT)   # the configs' data directory is relative to the repository
  per_seed = {}
  for seed in args.seeds:
    path = os.path.join(args.workroot, f'seed{seed}', 'scores.json')
    if args.reuse and os.path.exists(path):
      with open(path) as f:
        run = _arrays(json.load(f))
    else:
      run = run_seed(seed, args.workroot)
      with open(path, 'w') as f:
        json.dump(_jsonable(run), f)
    per_seed[seed] = {'gains': gains(run), 'differences': differences(run),
                      'train_seconds': run['train_seconds']}
  commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
  first = next(iter(per_seed.values()))['gains']
  meta = {'command': 'python benchmarks/teacher_algorithms.py --seeds ' +
                     ' '.join(map(str, args.seeds)),
          'commit': commit,
          'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, no GPU',
          'prompts': next(iter(next(iter(first.values())).values()))['n'], 'note': args.note}
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, 'teacher_algorithms.json'), 'w') as f:
    json.dump({'meta': meta, 'per_seed': {str(s): v for s, v in per_seed.items()}}, f, indent=1)
  text = markdown(per_seed, meta)
  with open(os.path.join(RESULTS, 'teacher_algorithms.md'), 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
