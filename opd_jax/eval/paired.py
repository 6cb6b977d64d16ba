"""Paired statistics over held-out prompts: a model's gain over another, and a recovered fraction.

Every model is evaluated on the same prompts with the same initial noise (opd_jax.eval.mini_world),
so two models are compared prompt by prompt: the per-prompt difference d_i (each prompt's mean
over its samples) removes the between-prompt variance that an unpaired comparison would carry.

  gain      mean_i d_i, with standard error std(d, ddof=1) / √n over the n prompts;
  fraction  (student − base) / (teacher − base), the share of a teacher's gain a student keeps,
            with a 95 % percentile-bootstrap interval that resamples prompts (all three models'
            scores of a prompt move together, so the ratio's correlation is kept);
  Average   the paper's mean of min–max normalised task scores (opd_jax.recipe.report), with a
            bootstrap interval that resamples each task's prompts, bounds recomputed each time.
"""

from __future__ import annotations

import numpy as np


def prompt_means(values: np.ndarray, prompt: np.ndarray) -> np.ndarray:
  """Mean of `values` per prompt index (prompts 0..max(prompt)), float64 [num_prompts]."""
  values, prompt = np.asarray(values, np.float64), np.asarray(prompt)
  counts = np.bincount(prompt)
  if values.shape != prompt.shape or np.any(counts == 0):
    raise ValueError('values and prompt must be aligned, every prompt index with a sample')
  return np.bincount(prompt, weights=values) / counts


def paired_gain(base: np.ndarray, model: np.ndarray, prompt: np.ndarray) -> dict:
  """Mean per-prompt difference model − base, its standard error, n and z = mean / SE."""
  d = prompt_means(model, prompt) - prompt_means(base, prompt)
  n = d.size
  se = float(np.std(d, ddof=1) / np.sqrt(n)) if n > 1 else float('nan')
  mean = float(np.mean(d))
  return {'mean': mean, 'se': se, 'n': n, 'z': mean / se if se > 0 else None}


def recovered_fraction(base: np.ndarray, teacher: np.ndarray, student: np.ndarray,
                       prompt: np.ndarray, resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> dict:
  """(student − base) / (teacher − base) over prompts, with a bootstrap interval.

  Returns {'value', 'low', 'high', 'unbounded'}. value is None where the teacher's gain is
  exactly zero (no fraction is defined). The interval is unbounded (low = high = None,
  unbounded = True) when more than a tail's share of the resamples give the teacher a gain of
  zero or of the other sign: the denominator then crosses zero and the ratio takes every value
  (Fieller's case). Otherwise it is the percentile interval of the resamples whose teacher gain
  has the sign of the observed one.
  """
  b, t, s = (prompt_means(x, prompt) for x in (base, teacher, student))
  gain = float(np.mean(t - b))
  value = float(np.mean(s - b)) / gain if gain != 0 else None
  if value is None:
    return {'value': None, 'low': None, 'high': None, 'unbounded': True}
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, b.size, size=(resamples, b.size))
  teacher_gain = np.mean(t[idx] - b[idx], axis=1)
  student_gain = np.mean(s[idx] - b[idx], axis=1)
  same_sign = np.sign(teacher_gain) == np.sign(gain)
  tail = (1 - level) / 2
  if np.mean(~same_sign) > tail:
    return {'value': value, 'low': None, 'high': None, 'unbounded': True}
  ratios = student_gain[same_sign] / teacher_gain[same_sign]
  low, high = np.percentile(ratios, [tail * 100, 100 - tail * 100])
  return {'value': value, 'low': float(low), 'high': float(high), 'unbounded': False}


def average_interval(prompt_scores: dict[str, dict[str, np.ndarray]], bound_rows: list[str],
                     resamples: int = 2000, level: float = 0.95, seed: int = 0
                     ) -> dict[str, tuple[float, float]]:
  """Bootstrap interval of every row's normalised Average.

  Args:
    prompt_scores: {row: {task: per-prompt means [P_task]}}, the same prompts in every row.
    bound_rows: the rows whose min and max per task give the normalisation (the table's rows;
      other rows, e.g. single-teacher students, are normalised with those bounds).

  Returns {row: (low, high)}: each task's prompts resampled with replacement (jointly for all
  rows), per-task means, min–max bounds over `bound_rows`, the Average per row, percentiles.
  """
  rows = list(prompt_scores)
  tasks = list(prompt_scores[rows[0]])
  rng = np.random.default_rng(seed)
  parts = []
  for t in tasks:
    table = np.stack([prompt_scores[r][t] for r in rows])              # [M, P]
    idx = rng.integers(0, table.shape[1], size=(resamples, table.shape[1]))
    means = table[:, idx].mean(axis=-1)                                # [M, R]
    bounds = means[[rows.index(r) for r in bound_rows]]
    low, span = bounds.min(axis=0), bounds.max(axis=0) - bounds.min(axis=0)
    parts.append(np.where(span > 0, (means - low) / np.where(span > 0, span, 1), 0.0))
  averages = np.mean(parts, axis=0)                                    # [M, R]
  tail = (1 - level) / 2 * 100
  return {r: tuple(float(v) for v in np.percentile(averages[i], [tail, 100 - tail]))
          for i, r in enumerate(rows)}
