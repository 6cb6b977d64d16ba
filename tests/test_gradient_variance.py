"""The gradient-estimator benchmark: exact toy gradient vs each estimator's mean; result schema."""

import json
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import gradient_variance as gv  # noqa: E402
from opd_jax.sampling.step import KernelSpec  # noqa: E402
from opd_jax.sampling.schedule import flow_match_sigmas  # noqa: E402


@pytest.mark.parametrize('kernel', ['flow_grpo', 'ode'])
def test_toy_exact_gradient_matches_estimator_means(kernel):
  ws, wt = gv.toy_params(0)
  sigmas = flow_match_sigmas(6, 3.0)
  spec = KernelSpec(kernel, 0.7 if kernel == 'flow_grpo' else 0.0)
  exact = gv.toy_exact_gradient(ws, wt, sigmas, spec, 5)
  keys = jax.random.split(jax.random.PRNGKey(1), 20000)
  names = gv.ESTIMATORS if kernel == 'flow_grpo' else ('analytic',)
  stats_of = {}
  for name in names:
    grads = gv.toy_gradients(name, ws, wt, sigmas, spec, 5, keys)
    stats = stats_of[name] = gv.summarise(grads, exact, 0.0)
    if name == 'detached_advantage':
      # Zero expected gradient: its mean sits near 0, far from g in units of its own noise.
      assert stats['bias_test_ratio'] > 10 and stats['max_abs_z'] > 6
      assert np.linalg.norm(grads.mean(0)) < 0.2 * np.linalg.norm(exact)
    else:
      # every coordinate within 4.5 standard errors (Bonferroni over 16 coordinates)
      assert stats['max_abs_z'] < 4.5, (name, stats)
      assert stats['cosine_of_mean'] > 0.95, (name, stats)
  if kernel == 'flow_grpo':   # the score-function term costs variance
    ppo, ana = stats_of['ppo_sampled_logratio'], stats_of['analytic']
    assert ppo['cov_trace_per_sample'] > 5 * ana['cov_trace_per_sample']


@pytest.mark.slow
def test_quick_run_writes_well_formed_results(tmp_path):
  result = gv.main(['--quick', '--noise_levels', '0.7', '--toy_samples', '256',
                    '--mini_samples', '4', '--out_dir', str(tmp_path)])
  saved = json.load(open(tmp_path / 'gradient_variance_quick.json'))
  assert set(saved) == {'toy', 'mini_world', 'meta'}
  for study in ('toy', 'mini_world'):
    rows = saved[study]['rows']
    assert set(rows) == {'ode', 'a=0.7'}
    expected = gv.ESTIMATORS if study == 'toy' else ('analytic', 'ppo_sampled_logratio')
    assert set(rows['a=0.7']) == set(expected) and set(rows['ode']) == {'analytic'}
    for per in rows.values():
      for r in per.values():
        assert {'cov_trace_per_sample', 'variance_ratio_to_analytic', 'relative_error_of_mean',
                'cosine_of_mean', 'samples_to_cosine_0.9', 'seconds_per_estimate'} <= set(r)
        assert np.isfinite(r['cov_trace_per_sample'])
  assert saved['meta']['quick'] and saved['meta']['command'].startswith('python benchmarks/')
  assert (tmp_path / 'gradient_variance_quick.md').read_text().startswith('# Gradient')
  assert result['toy']['rows']['a=0.7']['analytic']['variance_ratio_to_analytic'] == 1.0
