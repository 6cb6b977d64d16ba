"""How the mini-world OPD student's length is chosen: the fraction of each teacher's gain it keeps,
on the TRAIN split.

    python benchmarks/opd_settings.py --seeds 0 2 --candidate r60=train.num_steps=60 \
        --candidate r180=train.num_steps=180

Per seed, the recipe (configs/opd.py: the shipped base, its three teachers) runs the stages
`pretrain,teachers,opd` in one workdir per seed, once per candidate (overrides of the `opd`
section; the base and teachers are trained once and reused). Base, teachers and each candidate's
student are scored on the first --max_prompts prompts of each task's train split — never the
held-out split the report uses — with the report's sampler (40-step Euler ODE, each model at its
own CFG, the same noise for every model). Per task with a teacher that gains on the base, the
student keeps (student − base) / (teacher − base) of it (means over samples). Results:
benchmarks/results/opd_settings.{md,json}; each run adds its table, command, machine and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')

from configs import opd as recipe_config    # noqa: E402
from teacher_settings import append_round, override_value, round_meta   # noqa: E402

TASKS = ('composition', 'text', 'aesthetics')


def candidate_config(overrides: str, seed: int):
  """The recipe config (stages pretrain, teachers, opd) with the candidate's `opd` overrides."""
  c = recipe_config.get_config()
  c.seed = seed
  c.stages = 'pretrain,teachers,opd'
  for key, value in (kv.split('=', 1) for kv in overrides.split(',') if kv):
    *parents, leaf = key.split('.')
    node = c.opd
    for p in parents:
      node = node[p]
    node[leaf] = override_value(value, node[leaf])
  return c


def run(candidates: dict[str, str], seeds, max_prompts: int, workroot: str) -> dict:
  from opd_jax.mini_world import artifacts
  from opd_jax.recipe.evaluation import evaluator
  from opd_jax.recipe.mini_world import mini_world_stages, run_mini_world
  from opd_jax.recipe.stages import Recipe
  out = {}
  for seed in seeds:
    workdir = os.path.join(workroot, f'seed{seed}')
    ev = base = teachers = None
    for name, overrides in candidates.items():
      c = candidate_config(overrides, seed)
      run_mini_world(c, workdir)
      recipe = Recipe(c, workdir, mini_world_stages(tuple(c.tasks)))
      if ev is None:   # base and teachers are the same for every candidate of this seed
        e = c.report.eval
        e.split = 'train'
        e.max_prompts = max_prompts
        ev = evaluator(recipe, e)
        base = ev.scores(None, float(c.report.base_cfg_scale))
        teachers = {}
        for task in c.tasks:
          a = artifacts.load_adapter(recipe.result(f'teacher_{task}')['artifact'])
          teachers[task] = float(ev.scores(a, a.cfg_scale)[task]['headline'].mean())
      record = recipe.result('opd')
      student = artifacts.load_adapter(record['artifact'])
      s = ev.scores(student, student.cfg_scale)
      row = {'train_seconds': float(record['train_seconds'])}
      for task in c.tasks:
        b = float(base[task]['headline'].mean())
        st = float(s[task]['headline'].mean())
        gain = teachers[task] - b
        row[task] = {'base': b, 'teacher': teachers[task], 'student': st,
                     'keeps': (st - b) / gain if gain > 0 else None}
      out.setdefault(name, {})[seed] = row
      print(f'seed {seed} {name}: ' + json.dumps(row), flush=True)
  return out


def markdown(candidates, results, meta) -> str:
  lines = ['# OPD settings, scored on the train split', '',
           f'Command: `{meta["command"]}`  ',
           f'Machine: {meta["machine"]}; commit {meta["commit"]}  ',
           f'Prompts: the first {meta["max_prompts"]} of each task\'s train split (never the '
           'held-out test split); 40-step Euler ODE, each model at its own CFG, the same noise '
           'for every model. keeps = (student − base) / (teacher − base), for a teacher that '
           'gains (— where it does not).', '',
           '| candidate | overrides | seed | ' + ' | '.join(
               f'{t} base / teacher / student | keeps' for t in TASKS) + ' | train s |',
           '|---|---|---|' + '---|---|' * len(TASKS) + '---|']
  for name, per_seed in results.items():
    for seed, r in per_seed.items():
      cells = []
      for t in TASKS:
        x = r[t]
        cells.append(f'{x["base"]:.3f} / {x["teacher"]:.3f} / {x["student"]:.3f}')
        cells.append('—' if x['keeps'] is None else f'{x["keeps"]:.2f}')
      lines.append(f'| {name} | `{candidates[name] or "(recipe)"}` | {seed} | '
                   + ' | '.join(cells) + f' | {r["train_seconds"]:.0f} |')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--candidate', action='append', required=True,
                 help='NAME=OVERRIDES of the opd section, e.g. r180=train.num_steps=180')
  p.add_argument('--seeds', type=int, nargs='+', default=[0])
  p.add_argument('--max_prompts', type=int, default=128)
  p.add_argument('--workroot', default=os.path.join(ROOT, 'runs', 'opd_settings'))
  p.add_argument('--out', default=os.path.join(RESULTS, 'opd_settings'))
  args = p.parse_args(argv)
  candidates = dict(c.split('=', 1) for c in args.candidate)
  for overrides in candidates.values():   # fail on a bad field before any training
    candidate_config(overrides, 0)
  results = run(candidates, args.seeds, args.max_prompts, args.workroot)
  meta = round_meta('opd_settings.py', argv, max_prompts=args.max_prompts)
  text = markdown(candidates, results, meta)
  append_round(args.out, meta, candidates, results, text)
  print(text)


if __name__ == '__main__':
  main()
