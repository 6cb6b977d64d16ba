"""The OPD-settings benchmark (benchmarks/opd_settings.py): candidates and their record.

Training and scoring are the recipe's and the evaluator's (tested in test_recipe and
test_mini_eval); here: how a candidate's overrides become the recipe config, the kept fraction
in the table, and that every round stays on file.
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import opd_settings  # noqa: E402


def test_candidate_overrides_become_the_opd_config():
  c = opd_settings.candidate_config('train.num_steps=180,optimizer.lr=1e-3', seed=2)
  assert c.seed == 2 and c.stages == 'pretrain,teachers,opd'
  assert c.opd.train.num_steps == 180 and isinstance(c.opd.train.num_steps, int)
  assert c.opd.optimizer.lr == 1e-3
  assert opd_settings.candidate_config('', 0).opd.train.num_steps == (
      opd_settings.recipe_config.get_config().opd.train.num_steps)
  with pytest.raises((KeyError, AttributeError)):
    opd_settings.candidate_config('train.no_such_field=1', 0)
  with pytest.raises(ValueError):
    opd_settings.candidate_config('train.num_steps=many', 0)


def test_rounds_are_appended_with_the_kept_fraction(tmp_path, monkeypatch):
  def fake_run(candidates, seeds, max_prompts, workroot):
    row = {'train_seconds': 40.0,
           'composition': {'base': 0.12, 'teacher': 0.05, 'student': 0.10, 'keeps': None},
           'text': {'base': 0.80, 'teacher': 0.90, 'student': 0.89, 'keeps': 0.9},
           'aesthetics': {'base': 0.70, 'teacher': 0.80, 'student': 0.81, 'keeps': 1.1}}
    return {n: {s: row for s in seeds} for n in candidates}

  monkeypatch.setattr(opd_settings, 'run', fake_run)
  out = str(tmp_path / 'os')
  opd_settings.main(['--candidate', 'r60=train.num_steps=60', '--out', out])
  opd_settings.main(['--candidate', 'r180=train.num_steps=180', '--seeds', '0', '2', '--out', out])
  with open(out + '.json') as f:
    runs = json.load(f)['runs']
  assert [list(r['candidates']) for r in runs] == [['r60'], ['r180']]
  assert runs[1]['results']['r180']['2']['text']['keeps'] == 0.9
  with open(out + '.md') as f:
    md = f.read()
  assert md.count('# OPD settings, scored on the train split') == 2
  assert ('| r180 | `train.num_steps=180` | 2 | 0.120 / 0.050 / 0.100 | — | 0.800 / 0.900 / '
          '0.890 | 0.90 | 0.700 / 0.800 / 0.810 | 1.10 | 40 |') in md
