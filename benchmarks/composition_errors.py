"""What a mini-world model gets wrong in composition: the error profile behind its strict accuracy.

    python benchmarks/composition_errors.py                 # the shipped base, train split, CFG 1, 3
    python benchmarks/composition_errors.py --adapter=runs/opd/teacher_composition/teacher --scales 1

Samples the model like the report (opd_jax.eval.mini_world: 40-step Euler ODE, the same noise at
every scale) on the first --max_prompts composition prompts of --split, --samples each, and
counts with the composition reward's own detector (opd_jax.rewards.composition.detect):
- strict accuracy per prompt kind (single, counting, two_object, position);
- detected minus named objects per sample (−2 or fewer … +3 or more): too few or too many;
- objects the pretraining data never draws (render places objects in fixed, non-touching cells
  of the patch grid: render.SLOTS): two detections in neighbouring cells (diagonals included),
  and blobs larger than one object (more than OBJECT_SIZE² pixels: touching objects of one
  colour, merged);
- of those, named duplicates: more detections of a named (colour, shape) than the prompt asks
  for, two of them in neighbouring cells.
Train split by default, so that no held-out prompt informs a choice; --out writes {out}.md/.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import mini_world_cfg                              # noqa: E402
from configs.mini import common                   # noqa: E402
from opd_jax.eval.mini_world import Evaluator      # noqa: E402
from opd_jax.mini_world import grammar             # noqa: E402
from opd_jax.mini_world import lexicon             # noqa: E402
from opd_jax.mini_world import render              # noqa: E402
from opd_jax.mini_world import sprites             # noqa: E402
from opd_jax.rewards import composition            # noqa: E402

COUNT_BINS = (-2, -1, 0, 1, 2, 3)   # detected − named, clipped to [−2, 3]


def _neighbours(det: composition.Detections, rows: np.ndarray) -> bool:
  """Whether two of the detections `rows` lie in neighbouring cells (diagonals included)."""
  cells = np.stack([det.cy[rows], det.cx[rows]], axis=1) // render.CELL
  gap = np.abs(cells[:, None] - cells[None]).max(-1)
  return bool((gap[np.triu_indices(len(rows), 1)] <= 1).any())


def _has_neighbouring_duplicate(spec: grammar.CompositionSpec, det: composition.Detections,
                                index: int) -> bool:
  """More detections of a named object than its count, two of them in neighbouring cells."""
  in_image = det.image == index
  for group in spec.objects:
    match = np.flatnonzero(in_image & (det.color == composition.COLOR_NAMES.index(group.color)) &
                           (det.shape == lexicon.SHAPES.index(group.shape)))
    if len(match) > group.count and _neighbours(det, match):
      return True
  return False


def error_profile(images: np.ndarray, prompts: list[str]) -> dict:
  """The error profile of composition images (float [N, H, W, 3] in [0, 1]) for `prompts`."""
  specs = [grammar.parse(p) for p in prompts]
  strict = composition.composition_strict(images, prompts)
  det = composition.detect(images)
  detected = np.bincount(det.image, minlength=len(prompts))
  named = np.array([sum(g.count for g in s.objects) for s in specs])
  diff = np.clip(detected - named, COUNT_BINS[0], COUNT_BINS[-1])
  kinds = np.array([s.kind for s in specs])
  index = range(len(prompts))
  return {
      'samples': len(prompts),
      'strict': float(strict.mean()),
      'strict_by_kind': {k: float(strict[kinds == k].mean()) for k in grammar.COMPOSITION_KINDS
                         if (kinds == k).any()},
      'samples_by_kind': {k: int((kinds == k).sum()) for k in grammar.COMPOSITION_KINDS
                          if (kinds == k).any()},
      'count_difference': {str(b): float((diff == b).mean()) for b in COUNT_BINS},
      'neighbouring_objects': float(np.mean([_neighbours(det, np.flatnonzero(det.image == i))
                                             for i in index])),
      'merged_blobs': float(np.mean([(det.area[det.image == i] > sprites.OBJECT_SIZE ** 2).any()
                                     for i in index])),
      'neighbouring_duplicates': float(np.mean([_has_neighbouring_duplicate(s, det, i)
                                                for i, s in enumerate(specs)])),
  }


def profiles(base, adapter, scales, *, split: str, max_prompts: int, samples: int,
             data_dir: str, dataset_config: str = 'default') -> dict:
  """{cfg scale: error_profile} of base (+ adapter) on the split's composition prompts."""
  e = common.evaluation()
  e.tasks = ('composition',)
  e.split, e.max_prompts, e.samples_per_prompt = split, max_prompts, samples
  ev = Evaluator(base, e, data_dir, dataset_config)
  return {float(w): error_profile(*ev.generate('composition', adapter, float(w)))
          for w in scales}


def markdown(rows: dict, meta: dict) -> str:
  kinds = [k for k in grammar.COMPOSITION_KINDS if k in next(iter(rows.values()))['strict_by_kind']]
  lines = ['# Mini-world composition: error profile', '',
           f'Command: `{meta["command"]}`  ', f'Model: {meta["model"]}  ',
           f'Prompts: first {meta["max_prompts"]} composition prompts of the {meta["split"]} '
           f'split × {meta["samples"]} samples; 40-step Euler ODE  ',
           f'Machine: {meta["machine"]}', '',
           'Strict accuracy, overall and per prompt kind (samples of that kind):', '',
           '| CFG | strict | ' + ' | '.join(kinds) + ' |', '|---|---|' + '---|' * len(kinds)]
  for w, r in rows.items():
    lines.append(f'| {w:g} | {r["strict"]:.3f} | ' + ' | '.join(
        f'{r["strict_by_kind"][k]:.3f} ({r["samples_by_kind"][k]})' for k in kinds) + ' |')
  lines += ['', 'Share of samples by detected − named objects; with two objects in neighbouring '
            'cells, a blob larger than one object, a named object twice in neighbouring cells '
            '(none of which the pretraining data draws):', '',
            '| CFG | ≤ −2 | −1 | 0 | +1 | +2 | ≥ +3 | neighbouring objects | merged blobs | '
            'named duplicates |', '|---|---|---|---|---|---|---|---|---|---|']
  for w, r in rows.items():
    lines.append(f'| {w:g} | ' + ' | '.join(f'{r["count_difference"][str(b)]:.3f}'
                                            for b in COUNT_BINS) +
                 f' | {r["neighbouring_objects"]:.3f} | {r["merged_blobs"]:.3f} | '
                 f'{r["neighbouring_duplicates"]:.3f} |')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--base_dir', default=None, help='a base artifact (default: the shipped base)')
  p.add_argument('--adapter', default=None, help='a LoRA adapter artifact directory')
  p.add_argument('--scales', type=float, nargs='+', default=[1.0, 3.0])
  p.add_argument('--split', choices=('train', 'test'), default='train')
  p.add_argument('--max_prompts', type=int, default=128)
  p.add_argument('--samples', type=int, default=2, help='samples per prompt')
  p.add_argument('--data_dir', default=common.DATA_DIR)
  p.add_argument('--dataset_config', default='default')
  p.add_argument('--out', default=None, help='path prefix for .md / .json')
  args = p.parse_args(argv)
  if args.max_prompts < 1 or args.samples < 1:
    p.error('--max_prompts and --samples must be >= 1')
  base, adapter, model = mini_world_cfg.load_model(args.base_dir, args.adapter)
  rows = profiles(base, adapter, args.scales, split=args.split, max_prompts=args.max_prompts,
                  samples=args.samples, data_dir=args.data_dir,
                  dataset_config=args.dataset_config)
  meta = {'command': 'python benchmarks/composition_errors.py ' + ' '.join(argv or []),
          'model': model, 'split': args.split, 'max_prompts': args.max_prompts,
          'samples': args.samples, 'machine': mini_world_cfg.machine()}
  text = markdown(rows, meta)
  print(text)
  if args.out:
    mini_world_cfg.write_results(args.out, text,
                                 {'rows': {str(w): r for w, r in rows.items()}, 'meta': meta})
  return rows


if __name__ == '__main__':
  main(sys.argv[1:])
