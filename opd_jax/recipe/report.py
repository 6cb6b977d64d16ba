"""The mini Table 1: held-out scores of every model, normalised Average, curves and sample grids.

report.md leads with the verdict (`verdict_markdown`): per task the teacher's paired gain over
the base ± SE and the OPD student's recovered fraction with its 95 % bootstrap interval, and every
model's Average with its interval (figures.paired in report.json, `paired_figures`).

report.json schema (issue #3):
  {"rows": {NAME: {"rewards": {TASK: float}, "average": float, "train_seconds": float, ...}},
   "tasks": [...], "normalisation": {TASK: {"min": float, "max": float}, "method": str}, ...}
with NAME in base, teacher/<task>, multitask_rl, cascade_rl, opd (rows of stages that have not
run are absent). Single-teacher students (optional stages opd_single_<task>) go to
"extra_rows" as opd_single/<task>, normalised with the same bounds. Composition is
GenEval-style strict accuracy, the other tasks mean reward.

The Average follows the paper's "mean of min–max normalised metrics": each task's scores are
mapped to [0, 1] with the lowest and highest score of that task over the table's rows (bounds
written in the report), then averaged over tasks.

Curves of the student and the baselines come from cheaper probes (fewer prompts and steps than
the table), so their Average is normalised with their own bounds: min–max over every probe point
of every curve ("curve_normalisation"). Two times are read off a curve, in training seconds:
"seconds to 90 % of the final Average" (the first probe at or above 0.9 × the last probe's
Average; an early probe can already qualify, since the stage starts from the base) and
"seconds to 90 % of the gain" (the first probe at or above first + 0.9 × (last − first)).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from opd_jax.eval import paired
from opd_jax.eval.mini_world import summary
from opd_jax.mini_world import artifacts
from opd_jax.recipe.evaluation import evaluator

# The stages that record a reward-vs-wall-clock curve, and the probe settings that shape it
# (part of those stages' keys: opd_jax.recipe.mini_world).
CURVE_STAGES = ('opd', 'multitask_rl', 'cascade_rl')
CURVE_SETTINGS = ('report.curve_points', 'report.curve_eval')
# The times read off the curves: figures key → what is reached.
TIME_FIGURES = {'seconds_to_90pct_of_final_average': '90 % of the final Average',
                'seconds_to_90pct_of_gain': '90 % of the gain over the first probe'}


def normalisation(rows: dict[str, dict], tasks: Sequence[str]) -> dict[str, dict]:
  bounds = {}
  for t in tasks:
    values = [r['rewards'][t] for r in rows.values()]
    bounds[t] = {'min': float(min(values)), 'max': float(max(values))}
  return bounds


def normalised_average(rewards: dict[str, float], bounds: dict[str, dict]) -> float:
  parts = []
  for t, b in bounds.items():
    span = b['max'] - b['min']
    parts.append(0.0 if span <= 0 else (rewards[t] - b['min']) / span)
  return float(np.mean(parts))


def curve_normalisation(curves: dict[str, list], tasks: Sequence[str]) -> dict[str, dict]:
  """Per-task min–max over every probe point of every curve."""
  return normalisation({str(i): {'rewards': p} for i, p in
                        enumerate(p for curve in curves.values() for p in curve)}, tasks)


def seconds_to_fraction(curve: list[dict], tasks: Sequence[str], bounds: dict,
                        fraction: float = 0.9, of_gain: bool = False) -> float | None:
  """Training seconds of the first probe whose Average reaches `fraction` × the final one.

  With `of_gain`, of the way from the first probe's Average to the final one instead.
  """
  if not curve:
    return None
  averages = [normalised_average({t: p[t] for t in tasks}, bounds) for p in curve]
  start = averages[0] if of_gain else 0.0
  target = start + fraction * (averages[-1] - start)
  for point, avg in zip(curve, averages):
    if avg >= target:
      return float(point['train_seconds'])
  return None


def build_table(evals: dict[str, dict], seconds: dict[str, float], tasks: Sequence[str]
                ) -> dict[str, Any]:
  """report.json content from per-model evaluations ({name: Evaluator output})."""
  rows = {name: {'rewards': {t: float(e[t]) for t in tasks},
                 'dense_rewards': {t: float(e[f'reward/{t}']) for t in tasks},
                 'train_seconds': float(seconds.get(name, 0.0))}
          for name, e in evals.items()}
  bounds = normalisation(rows, tasks)
  for r in rows.values():
    r['average'] = normalised_average(r['rewards'], bounds)
  return {'rows': rows, 'tasks': list(tasks),
          'normalisation': {**bounds, 'method': 'min-max over the rows of this table, per task'}}


def derived_figures(table: dict, curves: dict[str, list]) -> dict[str, Any]:
  """Teacher gains and cross-task effects, OPD's recovered fraction, time to 90 %."""
  tasks, rows = table['tasks'], table['rows']
  out: dict[str, Any] = {}
  if 'base' not in rows:
    return out
  base = rows['base']['rewards']
  gains = {}
  for t in tasks:
    name = f'teacher/{t}'
    if name in rows:
      gains[t] = {u: rows[name]['rewards'][u] - base[u] for u in tasks}
  out['teacher_gain_over_base'] = gains
  if 'opd' in rows:
    opd = rows['opd']['rewards']
    out['opd_recovered_fraction'] = {
        t: (opd[t] - base[t]) / g[t] if abs(g[t]) > 1e-9 else None
        for t, g in gains.items()}
  curves = {name: curve for name, curve in curves.items() if curve}
  if not curves:
    return out
  bounds = curve_normalisation(curves, tasks)
  out['curve_normalisation'] = bounds
  out['seconds_to_90pct_of_final_average'] = {
      name: seconds_to_fraction(curve, tasks, bounds) for name, curve in curves.items()}
  out['seconds_to_90pct_of_gain'] = {
      name: seconds_to_fraction(curve, tasks, bounds, of_gain=True)
      for name, curve in curves.items()}
  out['curve_final_average'] = {
      name: normalised_average({t: curve[-1][t] for t in tasks}, bounds)
      for name, curve in curves.items()}
  return out


def paired_figures(scores: dict[str, dict], tasks: Sequence[str], bound_rows: Sequence[str]
                   ) -> dict[str, Any]:
  """The verdict's statistics from per-sample scores (opd_jax.eval.paired).

  Args:
    scores: {row: Evaluator.scores output}, every row on the same prompts and noise.
    bound_rows: the table's rows (their min–max per task normalises the Average).

  Returns:
    'teacher_gain': {teacher task: {task: paired gain over the base ± SE, z}};
    'recovered': {student row: {task: fraction of that task's teacher gain, 95 % interval}} for
      'opd' (every task) and 'opd_single/<task>' (its own task);
    'average_interval': {row: [low, high]}, the 95 % bootstrap interval of its Average.
  """
  if 'base' not in scores:
    return {}
  head = lambda row, t: scores[row][t]['headline']
  prompt = {t: scores['base'][t]['prompt'] for t in tasks}
  teachers = [t for t in tasks if f'teacher/{t}' in scores]
  out: dict[str, Any] = {'teacher_gain': {
      t: {u: paired.paired_gain(head('base', u), head(f'teacher/{t}', u), prompt[u])
          for u in tasks} for t in teachers}}
  students = {'opd': teachers, **{f'opd_single/{t}': [t] for t in teachers}}
  out['recovered'] = {
      row: {t: paired.recovered_fraction(head('base', t), head(f'teacher/{t}', t), head(row, t),
                                         prompt[t]) for t in own}
      for row, own in students.items() if row in scores}
  means = {row: {t: paired.prompt_means(head(row, t), prompt[t]) for t in tasks}
           for row in scores}
  out['average_interval'] = {row: list(v) for row, v in
                             paired.average_interval(means, list(bound_rows)).items()}
  return out


def gain_text(g: dict) -> str:
  """A paired gain (`paired.paired_gain`) as '+mean ± SE'."""
  return f'{g["mean"]:+.3f} ± {g["se"]:.3f}'


def z_text(g: dict) -> str:
  """A paired gain's z = mean / SE, or '—' where the SE is zero."""
  return '—' if g['z'] is None else f'{g["z"]:+.1f}'


def fraction_text(r: dict, short: bool = False) -> str:
  """A recovered fraction (`paired.recovered_fraction`) with its interval; `short` for wide
  tables (the reason for a missing or unbounded interval left out)."""
  if r['value'] is None:
    return '—' if short else '— (no teacher gain)'
  if r['low'] is None:
    return f'{r["value"]:.2f} [unbounded' + (']' if short else
                                              ': the teacher\'s gain is within noise]')
  return f'{r["value"]:.2f} [{r["low"]:.2f}, {r["high"]:.2f}]'


def verdict_markdown(table: dict, paired_stats: dict) -> list[str]:
  """The report's leading table: per task the teacher's gain ± SE and what the students keep."""
  tasks = table['tasks']
  gains, recovered = paired_stats['teacher_gain'], paired_stats['recovered']
  singles = [r for r in recovered if r.startswith('opd_single/')]
  lines = ['## Verdict', '',
           'Per task: the teacher\'s gain over the base on its own task (paired per-prompt '
           'difference ± its standard error, z = gain / SE), and the fraction of that gain the '
           'OPD student keeps ((student − base) / (teacher − base), 95 % bootstrap interval over '
           'prompts).', '',
           '| task | teacher gain ± SE | z | OPD recovered [95 % CI] |' +
           (' single-teacher OPD recovered [95 % CI] |' if singles else ''),
           '|---|---|---|---|' + ('---|' if singles else '')]
  for t in tasks:
    if t not in gains:
      continue
    g = gains[t][t]
    cells = [gain_text(g), z_text(g),
             fraction_text(recovered['opd'][t]) if 'opd' in recovered else '—']
    if singles:
      row = recovered.get(f'opd_single/{t}')
      cells.append(fraction_text(row[t]) if row else '—')
    lines.append(f'| {t} | ' + ' | '.join(cells) + ' |')
  rows = list(table['rows']) + list(table.get('extra_rows', {}))
  intervals = paired_stats['average_interval']
  lines += ['', 'Average (mean of min–max normalised task scores) with its 95 % bootstrap '
            'interval (each task\'s prompts resampled, bounds recomputed): ' +
            ', '.join(f'{r} {_row(table, r)["average"]:.3f} [{intervals[r][0]:.3f}, '
                      f'{intervals[r][1]:.3f}]' for r in rows if r in intervals) + '.', '']
  return lines


def _row(table: dict, name: str) -> dict:
  return table['rows'].get(name) or table['extra_rows'][name]


def _fmt(x, digits=3):
  return '—' if x is None else f'{x:.{digits}f}'


def markdown(table: dict, figures: dict, meta: dict) -> str:
  tasks, rows = table['tasks'], table['rows']
  lines = ['# Mini-world DiffusionOPD report', '',
           f'Held-out prompts ({meta["eval"]}); seed {meta["seed"]}; machine: {meta["machine"]}.',
           'Composition = GenEval-style strict accuracy; text, aesthetics = mean reward.', '']
  if 'base' in meta:
    lines.insert(4, f'Base: {meta["base"]}.')
  if figures.get('paired', {}).get('teacher_gain'):
    lines += verdict_markdown(table, figures['paired'])
  lines += ['## Every model', '', '| model | ' + ' | '.join(tasks) + ' | Average | train s |',
            '|---|' + '---|' * (len(tasks) + 2)]
  for name, r in list(rows.items()) + list(table.get('extra_rows', {}).items()):
    lines.append(f'| {name} | ' + ' | '.join(_fmt(r['rewards'][t]) for t in tasks) +
                 f' | {_fmt(r["average"])} | {r["train_seconds"]:.0f} |')
  lines += ['', 'Normalisation bounds (min–max over the rows, per task): ' +
            ', '.join(f'{t} [{_fmt(table["normalisation"][t]["min"])}, '
                      f'{_fmt(table["normalisation"][t]["max"])}]' for t in tasks), '']
  gains = figures.get('teacher_gain_over_base', {})
  if gains:
    lines += ['Teacher gain over base (row: teacher, column: task evaluated):', '',
              '| teacher | ' + ' | '.join(tasks) + ' |', '|---|' + '---|' * len(tasks)]
    for t, g in gains.items():
      lines.append(f'| {t} | ' + ' | '.join(f'{g[u]:+.3f}' for u in tasks) + ' |')
    lines.append('')
  rec = figures.get('opd_recovered_fraction')
  if rec:
    lines.append('OPD student, recovered fraction of each teacher\'s own-task gain: ' +
                 ', '.join(f'{t} {_fmt(v, 2)}' for t, v in rec.items()) + '.')
    lines.append('')
  for key, what in TIME_FIGURES.items():
    t90 = figures.get(key, {})
    if t90:
      lines += [f'Training seconds to reach {what} (probe curves, normalised over their '
                'points): ' + ', '.join(f'{n} {_fmt(v, 0)}' for n, v in t90.items()) + '.', '']
  lines.append('samples_<task>.png: one row per model, top to bottom ' +
               ', '.join(list(rows) + list(table.get('extra_rows', {}))) +
               '; one column per held-out prompt, the same initial noise in every row.')
  return '\n'.join(lines) + '\n'


def plot_curves(curves: dict[str, list], tasks: Sequence[str], bounds: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4 * (len(tasks) + 1), 3.2))
  for name, curve in curves.items():
    if not curve:
      continue
    x = [p['train_seconds'] for p in curve]
    for ax, t in zip(axes, tasks):
      ax.plot(x, [p[t] for p in curve], marker='o', ms=3, label=name)
    axes[-1].plot(x, [normalised_average({t: p[t] for t in tasks}, bounds) for p in curve],
                  marker='o', ms=3, label=name)
  for ax, title in zip(axes, list(tasks) + ['Average (normalised over the curves)']):
    ax.set_title(title)
    ax.set_xlabel('training seconds')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def save_grid(images_by_model: dict[str, np.ndarray], path: str, scale: int = 4) -> None:
  """One row per model, one column per prompt (same noise in every row)."""
  from PIL import Image
  rows = []
  for images in images_by_model.values():
    row = np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=1.0)
                          for im in images], axis=1)
    rows.append(row)
  grid = np.concatenate(rows, axis=0)
  grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  Image.fromarray((np.clip(grid, 0, 1) * 255).astype(np.uint8)).save(path)


def _machine() -> str:
  import platform
  return f'{platform.machine()} {os.cpu_count()}-core CPU ({platform.platform(terse=True)})'


def write_report(recipe, directory: str) -> dict:
  """Evaluates every model whose stage has run and writes report.json/md and the PNGs."""
  c = recipe.config.report
  ev = evaluator(recipe, c.eval)
  models: dict[str, tuple[Any, float]] = {'base': (None, float(c.base_cfg_scale))}
  seconds = {'base': recipe.result('pretrain')['train_seconds']}
  for name, stage in ([(f'teacher/{t}', f'teacher_{t}') for t in recipe.tasks] +
                      [('multitask_rl', 'multitask_rl'), ('cascade_rl', 'cascade_rl'),
                       ('opd', 'opd')]):
    record = recipe.cached(stage)
    if record is None:
      continue
    adapter = artifacts.load_adapter(record['artifact'])
    models[name] = (adapter, adapter.cfg_scale)
    seconds[name] = record['train_seconds']
  scores, evals, samples = {}, {}, {}
  for name, (adapter, cfg) in models.items():
    images: dict = {}
    scores[name] = ev.scores(adapter, cfg_scale=cfg, images_out=images)
    evals[name] = summary(scores[name])
    # The first sample of each of the first grid_prompts prompts (images come prompt-major).
    samples[name] = {t: images[t][0][::ev.samples_per_prompt(t)][:c.grid_prompts]
                     for t in recipe.tasks}
  extra = {}
  for t in recipe.tasks:
    record = recipe.cached(f'opd_single_{t}')
    if record is not None:
      adapter = artifacts.load_adapter(record['artifact'])
      name = f'opd_single/{t}'
      scores[name] = ev.scores(adapter, cfg_scale=adapter.cfg_scale)
      extra[name] = (summary(scores[name]), record['train_seconds'])
  table = build_table(evals, seconds, recipe.tasks)
  if extra:   # single-teacher students: same bounds, kept apart from the Table-1 rows
    bounds = {t: table['normalisation'][t] for t in recipe.tasks}
    table['extra_rows'] = {}
    for name, (e, secs) in extra.items():
      row = build_table({name: e}, {name: secs}, recipe.tasks)['rows'][name]
      row['average'] = normalised_average(row['rewards'], bounds)
      table['extra_rows'][name] = row
  curves = {s: recipe.cached(s).get('curve', []) for s in CURVE_STAGES
            if recipe.cached(s) is not None}
  figures = derived_figures(table, curves)
  figures['paired'] = paired_figures(scores, recipe.tasks, list(table['rows']))
  per_prompt = ', '.join(f'{t} {ev.samples_per_prompt(t)}' for t in recipe.tasks)
  meta = {'eval': f'{c.eval.split} split, samples per prompt: {per_prompt}, '
                  f'{c.eval.num_steps}-step Euler ODE, each model at its '
                  'own CFG, EMA weights',
          'seed': int(recipe.config.seed), 'machine': _machine(),
          'cfg_scales': {n: m[1] for n, m in models.items()},
          'base': ('the shipped base (opd_jax/assets/mini_world_base.json); its train s were '
                   'measured when it was made' if recipe.result('pretrain').get('shipped')
                   else 'pretrained in this run')}
  report = {**table, 'figures': figures, 'curves': curves, 'meta': meta}
  with open(os.path.join(recipe.workdir, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(recipe.workdir, 'report.md'), 'w') as f:
    f.write(markdown(table, figures, meta))
  if figures.get('curve_normalisation'):
    plot_curves(curves, recipe.tasks, figures['curve_normalisation'],
                os.path.join(recipe.workdir, 'reward_vs_wallclock.png'))
  for t in recipe.tasks:
    save_grid({n: s[t] for n, s in samples.items()},
              os.path.join(recipe.workdir, f'samples_{t}.png'))
  return {'report': os.path.join(recipe.workdir, 'report.json'), 'train_seconds': 0.0}
