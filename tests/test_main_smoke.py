"""End to end: the main command runs OPD rounds, writes metrics and checkpoints, and resumes."""

import json
import os

import pytest

from cli_testing import run_main


def _main(workdir, *overrides):
  return run_main('configs/mini/opd.py:standin,smoke', workdir, *overrides)


@pytest.mark.slow
def test_main_runs_and_resumes(tmp_path):
  first = _main(tmp_path)
  assert first.returncode == 0, first.stderr[-2000:]
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2, 3]
  assert all(r['loss'] >= 0 for r in rows) and 'kl_per_task/text' in rows[0]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '3']
  assert os.listdir(tmp_path / 'tensorboard')
  second = _main(tmp_path, '--config.train.num_steps=5')
  assert second.returncode == 0, second.stderr[-2000:]
  assert 'resumed from step 3' in second.stdout
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5]
