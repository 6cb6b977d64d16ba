"""How the mini-world teachers' settings are chosen: candidates scored on the TRAIN split.

    python benchmarks/teacher_settings.py --task text \
        --candidate default= --candidate its40=train.num_steps=40

Each candidate is a name and config overrides of the task's recipe teacher (configs/opd.py's
`teachers.<task>`, dotted fields, comma-separated; `trainer=nft|grpo_guard|grpo` first swaps the
teacher for that algorithm's config file). Per seed, each candidate trains its teacher through the
recipe (`stages='pretrain,teachers'`, the shipped base, its own workdir) and is scored against the
base on the first --max_prompts prompts of the task's train split — never the held-out test split
the report uses — with the report's sampler (40-step Euler ODE, each model at its own CFG, the
same noise for every model). The gain is the paired per-prompt difference ± its standard error
(opd_jax.eval.paired). Results: benchmarks/results/teacher_settings_<task>.{md,json}; each run
adds its table, with its command, machine and commit, to what is there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')

from configs import opd as recipe_config              # noqa: E402
from configs.mini import grpo, grpo_guard, nft        # noqa: E402
from opd_jax.recipe.report import gain_text, z_text  # noqa: E402

ALGORITHMS = {'nft': nft.get_config, 'grpo_guard': grpo_guard.get_config, 'grpo': grpo.get_config}


def override_value(text: str, like):
  """`text` parsed as the type of the field it replaces."""
  if isinstance(like, bool):
    if text not in ('True', 'False'):
      raise ValueError(f'expected True or False, got {text!r}')
    return text == 'True'
  return type(like)(text) if like is not None else text


def candidate_config(task: str, overrides: str, seed: int):
  """The recipe config that trains only `task`'s teacher, with the candidate's overrides."""
  c = recipe_config.get_config()
  c.seed = seed
  c.tasks = (task,)
  c.stages = 'pretrain,teachers'
  pairs = [kv.split('=', 1) for kv in overrides.split(',') if kv]
  teacher = c.teachers[task]
  for key, value in pairs:
    if key == 'trainer':
      teacher = ALGORITHMS[value](task)
  for key, value in pairs:
    if key == 'trainer':
      continue
    *parents, leaf = key.split('.')
    node = teacher
    for p in parents:
      node = node[p]
    node[leaf] = override_value(value, node[leaf])
  for other in [t for t in c.teachers if t != task]:
    del c.teachers[other]
  c.teachers[task] = teacher
  return c


def run(task: str, candidates: dict[str, str], seeds, max_prompts: int, workroot: str,
        samples_per_prompt: int = 0) -> dict:
  from opd_jax.eval.paired import paired_gain
  from opd_jax.mini_world import artifacts
  from opd_jax.recipe.evaluation import evaluator
  from opd_jax.recipe.mini_world import mini_world_stages, run_mini_world
  from opd_jax.recipe.stages import Recipe
  out, ev, base = {}, None, None
  for seed in seeds:
    for name, overrides in candidates.items():
      c = candidate_config(task, overrides, seed)
      workdir = os.path.join(workroot, task, f'seed{seed}', name)
      run_mini_world(c, workdir)
      recipe = Recipe(c, workdir, mini_world_stages(tuple(c.tasks)))
      if ev is None:   # every candidate starts from the same (shipped) base
        e = c.report.eval
        e.tasks = (task,)
        e.split = 'train'
        e.max_prompts = max_prompts
        if samples_per_prompt:   # for this task, over the report's own count of it too
          e.samples_per_prompt = samples_per_prompt
          e.task_samples_per_prompt[task] = 0
        ev = evaluator(recipe, e)
        base = ev.scores(None, float(c.report.base_cfg_scale))[task]
      record = recipe.result(f'teacher_{task}')
      adapter = artifacts.load_adapter(record['artifact'])
      s = ev.scores(adapter, adapter.cfg_scale)[task]
      out.setdefault(name, {})[seed] = {
          'gain': paired_gain(base['headline'], s['headline'], base['prompt']),
          'score': float(s['headline'].mean()), 'base': float(base['headline'].mean()),
          'train_seconds': float(record['train_seconds'])}
  return out


def markdown(task, candidates, results, meta) -> str:
  lines = [f'# Teacher settings for `{task}`, scored on the train split', '',
           f'Command: `{meta["command"]}`  ',
           f'Machine: {meta["machine"]}; commit {meta["commit"]}  ',
           f'Prompts: the first {meta["max_prompts"]} of the train split (never the held-out '
           f'test split), {meta.get("samples_per_prompt", 4)} samples each; 40-step Euler ODE, each model at its own CFG, the same noise for every '
           'model; gain = paired per-prompt difference over the base ± SE.', '',
           '| candidate | overrides | seed | base | teacher | gain ± SE | z | train s |',
           '|---|---|---|---|---|---|---|---|']
  for name, per_seed in results.items():
    for seed, r in per_seed.items():
      lines.append(f'| {name} | `{candidates[name] or "(recipe)"}` | {seed} | {r["base"]:.3f} | '
                   f'{r["score"]:.3f} | {gain_text(r["gain"])} | {z_text(r["gain"])} | '
                   f'{r["train_seconds"]:.0f} |')
  return '\n'.join(lines) + '\n'


def round_meta(script: str, argv, **more) -> dict:
  """A round's command (benchmarks/<script> and its arguments), machine and commit."""
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip()
  return {'command': f'python benchmarks/{script} ' + ' '.join(
              a if ' ' not in a else repr(a) for a in (argv or sys.argv[1:])),
          'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores', 'commit': commit,
          **more}


def append_round(prefix: str, meta: dict, candidates: dict, results: dict, text: str) -> None:
  """Adds one round (its table `text`, command and results) to prefix.{md,json}: settings are
  chosen over several rounds of candidates, and every round stays on file."""
  runs = []
  if os.path.exists(prefix + '.json'):
    with open(prefix + '.json') as f:
      runs = json.load(f)['runs']
  runs.append({'meta': meta, 'candidates': candidates,
               'results': {n: {str(s): r for s, r in v.items()} for n, v in results.items()}})
  with open(prefix + '.md', 'a' if len(runs) > 1 else 'w') as f:
    f.write(('\n' if len(runs) > 1 else '') + text)
  with open(prefix + '.json', 'w') as f:
    json.dump({'runs': runs}, f, indent=1, default=float)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--task', required=True, choices=recipe_config.get_config().tasks)
  p.add_argument('--candidate', action='append', required=True,
                 help='NAME=OVERRIDES, e.g. its40=train.num_steps=40 (empty: the recipe as is)')
  p.add_argument('--seeds', type=int, nargs='+', default=[0])
  p.add_argument('--max_prompts', type=int, default=128)
  p.add_argument('--samples_per_prompt', type=int, default=0,
                 help='samples per prompt (0: the report\'s, report.eval.samples_per_prompt)')
  p.add_argument('--workroot', default=os.path.join(ROOT, 'runs', 'teacher_settings'))
  p.add_argument('--out', default=None, help='path prefix (default: results/teacher_settings_TASK)')
  args = p.parse_args(argv)
  candidates = dict(c.split('=', 1) for c in args.candidate)
  for name, overrides in candidates.items():   # fail on a bad field before any training
    candidate_config(args.task, overrides, 0)
  results = run(args.task, candidates, args.seeds, args.max_prompts, args.workroot,
                args.samples_per_prompt)
  meta = round_meta('teacher_settings.py', argv, max_prompts=args.max_prompts,
                    samples_per_prompt=args.samples_per_prompt or
                    recipe_config.get_config().report.eval.samples_per_prompt)
  text = markdown(args.task, candidates, results, meta)
  append_round(args.out or os.path.join(RESULTS, f'teacher_settings_{args.task}'), meta,
               candidates, results, text)
  print(text)


if __name__ == '__main__':
  main()
