"""The teacher-settings benchmark (benchmarks/teacher_settings.py): candidates and their record.

Training and scoring are the recipe's and the evaluator's (tested in test_recipe and
test_mini_eval); here: how a candidate's overrides become the recipe config, and that every
round of candidates stays on file.
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import teacher_settings  # noqa: E402


def test_candidate_overrides_become_the_teacher_config():
  c = teacher_settings.candidate_config('text', 'train.num_steps=7,optimizer.lr=3e-3', seed=2)
  assert c.seed == 2 and c.tasks == ('text',) and c.stages == 'pretrain,teachers'
  assert list(c.teachers) == ['text']
  t = c.teachers.text
  assert t.trainer == 'grpo_guard' and t.train.num_steps == 7 and t.optimizer.lr == 3e-3
  assert isinstance(t.train.num_steps, int) and isinstance(t.optimizer.lr, float)
  # `trainer=` swaps the algorithm first; the other overrides apply to the new config.
  # (the algorithm's own defaults, not the recipe's settings of its teacher).
  c = teacher_settings.candidate_config('composition', 'trainer=nft,train.num_steps=5', 0)
  assert c.teachers.composition.trainer == 'nft'
  assert c.teachers.composition.data.tasks == ('composition',)
  assert c.teachers.composition.train.num_steps == 5
  c = teacher_settings.candidate_config('composition', 'trainer=grpo_guard', 0)
  assert c.teachers.composition.data.group_size == 8
  # The empty candidate is the recipe's own teacher.
  c = teacher_settings.candidate_config('composition', '', 0)
  assert c.teachers.composition.trainer == 'grpo_guard'
  assert c.teachers.composition.data.group_size == 16


def test_bad_overrides_fail_before_any_training():
  with pytest.raises((KeyError, AttributeError)):
    teacher_settings.candidate_config('text', 'train.no_such_field=1', 0)
  with pytest.raises(ValueError):
    teacher_settings.candidate_config('text', 'train.num_steps=many', 0)
  with pytest.raises(KeyError):
    teacher_settings.candidate_config('text', 'trainer=ppo', 0)


def test_rounds_are_appended_to_the_record(tmp_path, monkeypatch):
  calls = []

  def fake_run(task, candidates, seeds, max_prompts, workroot, samples_per_prompt):
    calls.append((task, dict(candidates), list(seeds), max_prompts, samples_per_prompt))
    gain = {'mean': 0.05, 'se': 0.01, 'n': 4, 'z': 5.0}
    return {n: {s: {'gain': gain, 'score': 0.9, 'base': 0.85, 'train_seconds': 3.0}
                for s in seeds} for n in candidates}

  monkeypatch.setattr(teacher_settings, 'run', fake_run)
  out = str(tmp_path / 'ts')
  teacher_settings.main(['--task', 'text', '--candidate', 'a=', '--out', out])
  teacher_settings.main(['--task', 'text', '--candidate', 'b=train.num_steps=40', '--seeds', '0',
                         '1', '--out', out, '--max_prompts', '16', '--samples_per_prompt', '2'])
  assert calls[0][4] == 0     # 0: the report's own number of samples
  assert calls[1] == ('text', {'b': 'train.num_steps=40'}, [0, 1], 16, 2)
  with open(out + '.json') as f:
    runs = json.load(f)['runs']
  assert [list(r['candidates']) for r in runs] == [['a'], ['b']]
  assert runs[1]['results']['b']['1']['gain']['z'] == 5.0
  with open(out + '.md') as f:
    md = f.read()
  assert md.count('# Teacher settings for `text`, scored on the train split') == 2
  assert '| b | `train.num_steps=40` | 1 | 0.850 | 0.900 | +0.050 ± 0.010 | +5.0 | 3 |' in md
  assert 'the first 16 of the train split (never the held-out test split), 2 samples each' in md
