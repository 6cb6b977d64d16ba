"""Paired statistics over held-out prompts (opd_jax.eval.paired) against direct formulas."""

import numpy as np
import pytest

from opd_jax.eval import paired


def test_paired_gain_averages_samples_per_prompt_then_differences():
  prompt = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  base = np.array([0., 1., 1., 1., 0., 0., 1., 0.])
  model = np.array([1., 1., 1., 1., 1., 0., 1., 1.])
  g = paired.paired_gain(base, model, prompt)
  d = np.array([1.0 - 0.5, 1.0 - 1.0, 0.5 - 0.0, 1.0 - 0.5])   # per-prompt means, by hand
  assert g['n'] == 4
  assert g['mean'] == pytest.approx(d.mean())
  assert g['se'] == pytest.approx(np.sqrt(np.sum((d - d.mean()) ** 2) / 3 / 4))
  assert g['z'] == pytest.approx(d.mean() / g['se'])


def test_paired_se_is_smaller_than_unpaired_when_prompts_vary():
  rng = np.random.default_rng(0)
  difficulty = rng.normal(size=200)
  prompt = np.arange(200)
  base = difficulty + 0.1 * rng.normal(size=200)
  model = difficulty + 0.2 + 0.1 * rng.normal(size=200)
  g = paired.paired_gain(base, model, prompt)
  unpaired = np.sqrt(base.var(ddof=1) / 200 + model.var(ddof=1) / 200)
  assert g['se'] < unpaired / 5
  assert abs(g['mean'] - 0.2) < 4 * g['se']


def test_recovered_fraction_and_its_bootstrap_interval():
  rng = np.random.default_rng(1)
  n = 400
  prompt = np.arange(n)
  base = rng.normal(size=n)
  teacher = base + 1.0 + 0.3 * rng.normal(size=n)
  student = base + 0.8 + 0.3 * rng.normal(size=n)
  r = paired.recovered_fraction(base, teacher, student, prompt, resamples=1000)
  assert r['value'] == pytest.approx(np.mean(student - base) / np.mean(teacher - base))
  assert r['low'] < r['value'] < r['high']
  assert r['low'] < 0.8 < r['high'] and r['high'] - r['low'] < 0.2 and not r['unbounded']
  # Half the prompts: the interval widens by about √2.
  half = paired.recovered_fraction(base[:200], teacher[:200], student[:200], prompt[:200],
                                   resamples=1000)
  assert 1.1 < (half['high'] - half['low']) / (r['high'] - r['low']) < 1.9


def test_no_fraction_without_a_teacher_gain_and_bad_alignment_is_refused():
  prompt = np.array([0, 1])
  r = paired.recovered_fraction(np.zeros(2), np.zeros(2), np.ones(2), prompt)
  assert r == {'value': None, 'low': None, 'high': None, 'unbounded': True}
  # A teacher gain within noise: its resamples cross zero, so the fraction's interval is unbounded.
  rng = np.random.default_rng(3)
  base = rng.normal(size=100)
  noisy = paired.recovered_fraction(base, base + 0.02 + rng.normal(size=100),
                                    base + 0.01 + 0.1 * rng.normal(size=100), np.arange(100))
  assert noisy['value'] is not None and noisy['unbounded']
  assert noisy['low'] is None and noisy['high'] is None
  with pytest.raises(ValueError, match='aligned'):
    paired.prompt_means(np.zeros(3), prompt)
  with pytest.raises(ValueError, match='aligned'):
    paired.prompt_means(np.zeros(2), np.array([0, 2]))   # prompt 1 has no sample


def test_average_interval_brackets_the_average_and_uses_the_table_rows_bounds():
  rng = np.random.default_rng(2)
  n = 300
  truth = {'lo': (0.2, 0.3), 'mid': (0.5, 0.5), 'hi': (0.8, 0.6), 'extra': (0.9, 0.1)}
  scores = {r: {'a': rng.normal(m[0], 0.3, n), 'b': rng.normal(m[1], 0.3, n)}
            for r, m in truth.items()}
  iv = paired.average_interval(scores, ['lo', 'mid', 'hi'], resamples=500)
  # Point Averages by the definition: per task, (x − min) / (max − min) over the bound rows.
  def average(r):
    parts = []
    for t in ('a', 'b'):
      means = {q: scores[q][t].mean() for q in ('lo', 'mid', 'hi')}
      lo, hi = min(means.values()), max(means.values())
      parts.append((scores[r][t].mean() - lo) / (hi - lo))
    return np.mean(parts)
  for r in truth:
    low, high = iv[r]
    assert low <= average(r) <= high, r
  assert iv['lo'][1] < 0.1 and iv['hi'][0] > 0.9       # extremes stay near 0 and 1
  # A row outside the bound rows does not move the others' bounds (same resamples).
  without = paired.average_interval({r: scores[r] for r in ('lo', 'mid', 'hi')},
                                    ['lo', 'mid', 'hi'], resamples=500)
  assert all(np.allclose(without[r], iv[r]) for r in without)
  assert iv['mid'][1] - iv['mid'][0] > 0.05
