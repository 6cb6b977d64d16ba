"""The mini-world recipe over several seeds: the README's Table-1 figures with their spread.

    python benchmarks/mini_world_recipe.py                       # seeds 0 1 2, runs/opd_seed<S>
    python benchmarks/mini_world_recipe.py --seeds 0 --reuse     # aggregate existing runs only

For each seed it runs the main command (`python -m opd_jax.main --config=configs/opd.py
--config.seed=S --workdir=runs/opd_seed<S>`, timed end to end; cached stages are skipped, so a
re-run costs only the report) and then aggregates the seeds' report.json files into
benchmarks/results/mini_world_recipe.{md,json}: mean ± standard deviation over seeds of every
row's held-out scores and Average, each teacher's gain over the base, the OPD student's
recovered fraction of every teacher's gain, and the training seconds to reach 90 % of the final
Average for the student and the baselines. The plot and sample grids of the first seed are
copied next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

from opd_jax.recipe.report import TIME_FIGURES, fraction_text, gain_text, z_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')


def run_seed(seed: int, workdir: str, extra: list[str]) -> float:
  cmd = [sys.executable, '-m', 'opd_jax.main', '--config=configs/opd.py',
         f'--config.seed={seed}', f'--workdir={workdir}', *extra]
  print('$', ' '.join(cmd[1:]), flush=True)
  began = time.time()
  subprocess.run(cmd, cwd=ROOT, check=True)
  return time.time() - began


def _stats(values):
  values = [v for v in values if v is not None]
  if not values:
    return None
  return {'mean': float(np.mean(values)), 'std': float(np.std(values, ddof=1))
          if len(values) > 1 else 0.0, 'n': len(values)}


def aggregate(reports: list[dict], walls: list[float | None]) -> dict:
  tasks = reports[0]['tasks']
  names = [n for n in reports[0]['rows'] if all(n in r['rows'] for r in reports)]
  rows = {}
  for n in names:
    rows[n] = {'rewards': {t: _stats([r['rows'][n]['rewards'][t] for r in reports])
                           for t in tasks},
               'average': _stats([r['rows'][n]['average'] for r in reports]),
               'train_seconds': _stats([r['rows'][n]['train_seconds'] for r in reports])}
  figures = [r['figures'] for r in reports]
  gains = {t: {u: _stats([f['teacher_gain_over_base'][t][u] for f in figures]) for u in tasks}
           for t in figures[0].get('teacher_gain_over_base', {})}
  recovered = {t: _stats([f['opd_recovered_fraction'][t] for f in figures])
               for t in figures[0].get('opd_recovered_fraction', {})}
  times = {key: {n: _stats([f[key].get(n) for f in figures]) for n in figures[0].get(key, {})}
           for key in TIME_FIGURES}
  # The verdict per seed (issue #16 asks for every seed, not the mean): reports that carry the
  # paired per-prompt statistics (opd_jax.recipe.report.paired_figures).
  verdicts = [f['paired'] for f in figures if f.get('paired', {}).get('teacher_gain')]
  return {'tasks': tasks, 'rows': rows, 'teacher_gain_over_base': gains,
          'opd_recovered_fraction': recovered, **times,
          'main_command_seconds': _stats(walls), 'seeds': len(reports),
          'verdict_per_seed': verdicts if len(verdicts) == len(reports) else []}


def _pm(s, digits=3):
  if s is None:
    return '—'
  return f'{s["mean"]:.{digits}f} ± {s["std"]:.{digits}f}'


def markdown(agg: dict, meta: dict) -> str:
  tasks = agg['tasks']
  out = ['# Mini-world recipe over seeds', '',
         f'Command: `{meta["command"]}`  ', f'Commit: `{meta["commit"]}`  ',
         f'Machine: {meta["machine"]}  ', f'Seeds: {meta["seeds"]} (mean ± std over seeds)', '',
         'Held-out scores (composition: strict accuracy; text, aesthetics: mean reward) and the '
         'Average of min–max normalised scores (bounds per seed over that seed\'s rows):', '',
         '| model | ' + ' | '.join(tasks) + ' | Average | train s |',
         '|---|' + '---|' * (len(tasks) + 2)]
  for n, r in agg['rows'].items():
    out.append(f'| {n} | ' + ' | '.join(_pm(r['rewards'][t]) for t in tasks) +
               f' | {_pm(r["average"])} | {_pm(r["train_seconds"], 0)} |')
  out += ['', 'Teacher gain over base (row: teacher; column: task evaluated):', '',
          '| teacher | ' + ' | '.join(tasks) + ' |', '|---|' + '---|' * len(tasks)]
  for t, g in agg['teacher_gain_over_base'].items():
    out.append(f'| {t} | ' + ' | '.join(_pm(g[u]) for u in tasks) + ' |')
  out += ['', 'OPD student, recovered fraction of each teacher\'s own-task gain '
          '((opd − base) / (teacher − base)): ' +
          ', '.join(f'{t} {_pm(v, 2)}' for t, v in agg['opd_recovered_fraction'].items()), '']
  out += verdict_markdown(agg, meta['seeds'])
  for key, what in TIME_FIGURES.items():
    out += [f'Training seconds to reach {what} (probe curves, normalised over their points): ' +
            ', '.join(f'{n} {_pm(v, 0)}' for n, v in agg.get(key, {}).items()), '']
  if agg['main_command_seconds']:
    out.append(f'Main command wall-clock per seed, every stage not cached (the shipped base is '
               f'reused when its settings match): {_pm(agg["main_command_seconds"], 0)} s.')
  out += ['', f'Plot and grids of seed {meta["first_seed"]}: mini_world_reward_vs_wallclock.png, '
          'mini_world_samples_<task>.png.']
  return '\n'.join(out) + '\n'


def verdict_markdown(agg: dict, seeds: list[int]) -> list[str]:
  """Per seed: each teacher's own-task gain ± paired SE (z), the OPD student's recovered
  fraction [95 % bootstrap interval], and the Averages of OPD and the baselines [interval]."""
  if not agg['verdict_per_seed']:
    return []
  tasks = agg['tasks']
  out = ['Per seed (paired over held-out prompts; report.md of each seed has the details): '
         'teacher gain on its own task ± SE (z), the OPD student\'s recovered fraction [95 % '
         'interval], Averages [95 % interval]:', '',
         '| seed | ' + ' | '.join(f'{t} gain (z) | {t} recovered' for t in tasks) +
         ' | Average: opd | multitask_rl | cascade_rl |',
         '|---|' + '---|---|' * len(tasks) + '---|---|---|']
  for seed, v in zip(seeds, agg['verdict_per_seed']):
    cells = []
    for t in tasks:
      g = v['teacher_gain'].get(t, {}).get(t)
      cells.append('—' if g is None else f'{gain_text(g)} ({z_text(g)})')
      cells.append(fraction_text(v['recovered']['opd'][t], short=True)
                   if t in v['recovered'].get('opd', {})
                   else '—')
    for row in ('opd', 'multitask_rl', 'cascade_rl'):
      iv = v['average_interval'].get(row)
      cells.append('—' if iv is None else f'[{iv[0]:.2f}, {iv[1]:.2f}]')
    out.append(f'| {seed} | ' + ' | '.join(cells) + ' |')
  return out + ['']


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--workdir_prefix', default='runs/opd_seed')
  p.add_argument('--reuse', action='store_true', help='only aggregate existing report.json files')
  p.add_argument('overrides', nargs='*', help='extra --config.x=y flags for every seed')
  args = p.parse_args()
  reports, walls = [], []
  for seed in args.seeds:
    workdir = os.path.join(ROOT, f'{args.workdir_prefix}{seed}')
    fresh = not os.path.exists(workdir)
    wall = None if args.reuse else run_seed(seed, workdir, args.overrides)
    walls.append(wall if fresh else None)
    with open(os.path.join(workdir, 'report.json')) as f:
      reports.append(json.load(f))
  agg = aggregate(reports, walls)
  commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
  meta = {'command': 'python benchmarks/mini_world_recipe.py ' + ' '.join(sys.argv[1:]),
          'commit': commit, 'seeds': args.seeds, 'first_seed': args.seeds[0],
          'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, no GPU'}
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, 'mini_world_recipe.json'), 'w') as f:
    json.dump({**agg, 'meta': meta}, f, indent=2)
  with open(os.path.join(RESULTS, 'mini_world_recipe.md'), 'w') as f:
    f.write(markdown(agg, meta))
  first = os.path.join(ROOT, f'{args.workdir_prefix}{args.seeds[0]}')
  for name in os.listdir(first):
    if name.endswith('.png'):
      shutil.copy(os.path.join(first, name), os.path.join(RESULTS, f'mini_world_{name}'))
  print(markdown(agg, meta))


if __name__ == '__main__':
  main()
