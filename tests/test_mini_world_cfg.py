"""The CFG sweep benchmark (benchmarks/mini_world_cfg.py) on the tiny base."""

import json
import os
import sys

import pytest

import mini_testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import mini_world_cfg  # noqa: E402


def test_sweep_scores_every_scale_and_writes_results(tmp_path):
  out = str(tmp_path / 'cfg')
  result = mini_world_cfg.main(['--base_dir', mini_testing.tiny_base_dir(), '--scales', '1', '3',
                                '--max_prompts', '2', '--data_dir', mini_testing.data_dir(),
                                '--dataset_config', 'small', '--out', out])
  rows = result['rows']
  assert list(rows) == [1.0, 3.0]
  for r in rows.values():
    assert set(r) == {*result['tasks'], 'mean_score'}
    assert all(0.0 <= r[t] <= 1.0 for t in result['tasks'])
  # Guidance changes the samples, so the dense-reward tasks score differently per scale.
  assert rows[1.0]['aesthetics'] != rows[3.0]['aesthetics']
  assert rows[result['best_mean']]['mean_score'] == max(r['mean_score'] for r in rows.values())
  for task, w in result['best'].items():
    assert rows[w][task] == max(r[task] for r in rows.values())
  with open(out + '.json') as f:
    saved = json.load(f)
  assert saved['rows']['3.0'] == pytest.approx(rows[3.0])
  with open(out + '.md') as f:
    md = f.read()
  assert f'| 3 | {rows[3.0]["composition"]:.3f} |' in md


def test_sweep_rejects_an_empty_prompt_budget():
  with pytest.raises(SystemExit):
    mini_world_cfg.main(['--max_prompts', '0'])
