"""Mini-world scores of one model at several CFG scales: how the recipe's CFG scales are chosen.

    python benchmarks/mini_world_cfg.py                  # the shipped base, train split, CFG 1-4
    python benchmarks/mini_world_cfg.py --adapter=runs/opd/teacher_text/teacher --split=test

The model is the shipped base (opd_jax/assets/mini_world_base.*) or --base_dir, plus an optional
LoRA adapter artifact; it is sampled like the report (opd_jax.eval.mini_world: 40-step Euler
ODE, the same noise at every scale) on the first --max_prompts prompts of every task. The
default run, on the train split so that no held-out prompt informs a choice, is the one behind
configs/opd.py's `report.base_cfg_scale`; with --out it writes {out}.md and {out}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs.mini import common                   # noqa: E402
from opd_jax.eval.mini_world import Evaluator      # noqa: E402
from opd_jax.mini_world import artifacts                # noqa: E402
from opd_jax.mini_world import shipped_base             # noqa: E402


def load_model(base_dir: str | None, adapter_dir: str | None):
  """(base, adapter or None, description) of the model a mini-world benchmark samples: the base
  artifact at `base_dir` (default: the shipped base), plus the LoRA adapter at `adapter_dir`."""
  base = artifacts.load_base(base_dir) if base_dir else shipped_base.load()[0]
  adapter = artifacts.load_adapter(adapter_dir) if adapter_dir else None
  return base, adapter, (base_dir or 'the shipped base') + (f' + {adapter_dir}' if adapter_dir
                                                           else '')


def machine() -> str:
  return f'{platform.machine()}, {os.cpu_count()} CPU cores'


def write_results(prefix: str, text: str, payload: dict) -> None:
  """{prefix}.md (the markdown `text`) and {prefix}.json (`payload`)."""
  with open(prefix + '.md', 'w') as f:
    f.write(text)
  with open(prefix + '.json', 'w') as f:
    json.dump(payload, f, indent=2)


def sweep(base: artifacts.BaseModel, adapter: artifacts.Adapter | None, scales, *, split: str,
          max_prompts: int, data_dir: str, dataset_config: str = 'default') -> dict:
  """Scores per scale: {'rows': {w: {task: score, 'mean_score': ...}}, 'best': {task: w}, ...}."""
  e = common.evaluation()
  e.split = split
  e.max_prompts = max_prompts
  ev = Evaluator(base, e, data_dir, dataset_config)
  rows = {}
  for w in scales:
    out = ev(adapter, cfg_scale=float(w))
    rows[float(w)] = {k: float(out[k]) for k in (*e.tasks, 'mean_score')}
  best = {k: max(rows, key=lambda w: rows[w][k]) for k in e.tasks}
  return {'tasks': list(e.tasks), 'rows': rows, 'best': best,
          'best_mean': max(rows, key=lambda w: rows[w]['mean_score'])}


def markdown(result: dict, meta: dict) -> str:
  tasks = result['tasks']
  lines = ['# Mini-world scores against CFG scale', '',
           f'Command: `{meta["command"]}`  ', f'Model: {meta["model"]}  ',
           f'Prompts: first {meta["max_prompts"]} of each task\'s {meta["split"]} split; '
           '40-step Euler ODE; composition is strict accuracy  ',
           f'Machine: {meta["machine"]}', '',
           '| CFG | ' + ' | '.join(tasks) + ' | mean |', '|---|' + '---|' * (len(tasks) + 1)]
  for w, r in result['rows'].items():
    lines.append(f'| {w:g} | ' + ' | '.join(f'{r[t]:.3f}' for t in tasks) +
                 f' | {r["mean_score"]:.3f} |')
  lines += ['', f'Highest mean: CFG {result["best_mean"]:g}; per task: ' +
            ', '.join(f'{t} {w:g}' for t, w in result['best'].items()) + '.']
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--base_dir', default=None, help='a base artifact (default: the shipped base)')
  p.add_argument('--adapter', default=None, help='a LoRA adapter artifact directory')
  p.add_argument('--scales', type=float, nargs='+', default=[1.0, 2.0, 3.0, 4.0])
  p.add_argument('--split', choices=('train', 'test'), default='train')
  p.add_argument('--max_prompts', type=int, default=128)
  p.add_argument('--data_dir', default=common.DATA_DIR)
  p.add_argument('--dataset_config', default='default')
  p.add_argument('--out', default=None, help='path prefix for .md / .json')
  args = p.parse_args(argv)
  if args.max_prompts < 1:
    p.error('--max_prompts must be >= 1')
  base, adapter, model = load_model(args.base_dir, args.adapter)
  result = sweep(base, adapter, args.scales, split=args.split, max_prompts=args.max_prompts,
                 data_dir=args.data_dir, dataset_config=args.dataset_config)
  meta = {'command': 'python benchmarks/mini_world_cfg.py ' + ' '.join(argv or []),
          'model': model, 'split': args.split, 'max_prompts': args.max_prompts,
          'machine': machine()}
  text = markdown(result, meta)
  print(text)
  if args.out:
    write_results(args.out, text, {**result, 'rows': {str(w): r for w, r in result['rows'].items()},
                                   'meta': meta})
  return result


if __name__ == '__main__':
  main(sys.argv[1:])
