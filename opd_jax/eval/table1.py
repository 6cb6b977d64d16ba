"""Table 1 of the paper from per-image score records: metrics per model, the Average, the files.

Metrics (spec §4), in raw units:
  GenEval      overall (mean over the six tags of per-tag accuracy; GenEval's own score) and
               image accuracy (fraction of correct images); strict and partial-score variants
               are kept in eval.json
  OCR          mean OCR reward over the OCR prompts (1 − normalised edit distance)
  DrawBench    mean of each model-based reward over the DrawBench images (PickScore raw,
               CLIPScore cos, HPSv2.1 cos, LAION aesthetic raw)
Average (ours; the paper's cannot be rebuilt from its table): for each metric, the models'
values min–max normalised over the models of this evaluation (best 1, worst 0; every model 1 when
all are equal), then averaged over the metrics the model has. Bounds [0, 1]; it ranks the models
of one evaluation and is not comparable across evaluations. With one model it is not defined.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from opd_jax.eval import geneval

# Table columns: (metric key, header). GenEval image accuracy is reported, not averaged (it is a
# second view of the same column).
COLUMNS = (('geneval', 'GenEval'), ('geneval_image_accuracy', 'GenEval img acc'),
           ('ocr', 'OCR'), ('pickscore', 'PickScore'), ('clipscore', 'CLIPScore'),
           ('hpsv2', 'HPSv2.1'), ('aesthetic', 'Aesthetic'))
AVERAGED = ('geneval', 'ocr', 'pickscore', 'clipscore', 'hpsv2', 'aesthetic')
AVERAGE_DEFINITION = (
    'Average: per metric (GenEval overall, OCR, PickScore, CLIPScore, HPSv2.1, Aesthetic), the '
    'models\' values min–max normalised over the models of this evaluation (best 1, worst 0; all '
    '1 when equal), averaged over the metrics a model has. Bounds [0, 1]; it ranks the models of '
    'this file only. Not defined for a single model.')


def geneval_metrics(records: Sequence[Mapping[str, Any]]) -> dict:
  """GenEval summary of score records (each an `ImageResult.as_dict()` plus 'index')."""
  fields = {f for f in geneval.ImageResult.__dataclass_fields__}
  results = [geneval.ImageResult(**{k: v for k, v in r.items() if k in fields}) for r in records]
  summary = geneval.summarize(results)
  return {'geneval': summary.overall, 'geneval_image_accuracy': summary.image_accuracy,
          'geneval_summary': summary.as_dict()}


def mean_metrics(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict:
  """The mean of each named per-image score."""
  return {name: float(np.mean([r[name] for r in records])) for name in names}


def average(table: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
  """model → Average (module docstring); None for every model when there is only one."""
  models = list(table)
  if len(models) < 2:
    return {m: None for m in models}
  normalised: dict[str, list[float]] = {m: [] for m in models}
  for metric in AVERAGED:
    have = [m for m in models if table[m].get(metric) is not None]
    if len(have) < 2:
      continue
    values = np.asarray([table[m][metric] for m in have], np.float64)
    lo, hi = values.min(), values.max()
    for m, v in zip(have, values):
      normalised[m].append(1.0 if hi == lo else float((v - lo) / (hi - lo)))
  return {m: (float(np.mean(v)) if v else None) for m, v in normalised.items()}


def _cell(value: Any) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return '—'
  return f'{value:.4f}' if abs(value) < 10 else f'{value:.3f}'


def markdown(table: Mapping[str, Mapping[str, float]], averages: Mapping[str, float | None],
             meta: Mapping[str, Any]) -> str:
  columns = [c for c in COLUMNS if any(c[0] in row for row in table.values())]
  lines = ['# Evaluation (Table 1 protocol)', '',
           f'Command: `{meta.get("command", "")}`  ', f'Settings: {meta.get("settings", "")}  ',
           f'Machine: {meta.get("machine", "")}', '',
           '| model | ' + ' | '.join(h for _, h in columns) + ' | Average |',
           '|---|' + '---|' * (len(columns) + 1)]
  for model, row in table.items():
    lines.append(f'| {model} | ' + ' | '.join(_cell(row.get(k)) for k, _ in columns)
                 + f' | {_cell(averages.get(model))} |')
  lines += ['', 'Units: raw. GenEval: overall = mean over tags of per-tag accuracy; img acc = '
            'fraction of correct images. OCR: mean reward. DrawBench rewards: means over its '
            'images.', '', AVERAGE_DEFINITION, '']
  counts = meta.get('images')
  if counts:
    lines.append('Images scored per cell: ' + '; '.join(
        f'{m}: ' + ', '.join(f'{b} {n}' for b, n in cells.items()) for m, cells in counts.items()))
  return '\n'.join(lines) + '\n'


def write_report(out_dir: str, table: Mapping[str, Mapping[str, Any]],
                 details: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[str, str]:
  """eval.json (everything) and eval.md (the table) in `out_dir`; returns their paths."""
  averages = average(table)
  doc = {'table': table, 'average': averages, 'average_definition': AVERAGE_DEFINITION,
         'details': details, 'meta': dict(meta)}
  paths = os.path.join(out_dir, 'eval.json'), os.path.join(out_dir, 'eval.md')
  for path, text in zip(paths, (json.dumps(doc, indent=2, sort_keys=True),
                                markdown(table, averages, meta))):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  return paths


def image_grid(images: np.ndarray, columns: int = 4) -> np.ndarray:
  """uint8 [N, H, W, 3] → one uint8 grid image, `columns` wide, blank cells black."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.zeros((rows * h, columns * w, c), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid
