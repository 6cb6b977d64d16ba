"""Two local CPU processes (gloo) run the same OPD command as one process and agree with it.

Each process owns 4 of the 8 devices; the mesh, the global batch and every round's update are
the same as in a single 8-device process, so the logged losses must match, and a two-process run
must resume from the checkpoint it wrote.
"""

import json
import os
import socket
import subprocess

import numpy as np
import pytest

from cli_testing import ROOT, child_env, main_command, run_main

CONFIG = 'configs/mini/opd.py:standin,smoke'
FLAGS = ('--config.data.batch_size_per_device=1', '--config.train.checkpoint_every=2',
         '--config.train.async_checkpoints=False',
         # the cheapest round to compile: a 2-step rollout with one trained step
         '--config.rollout.num_steps=2', '--config.objective.timestep_fraction=0.5')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _single(workdir, rounds):
  proc = run_main(CONFIG, workdir, *FLAGS, f'--config.train.num_steps={rounds}', devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _pair(workdir, rounds):
  port = _free_port()
  procs = [subprocess.Popen(main_command(CONFIG, workdir, *FLAGS,
                                          f'--config.train.num_steps={rounds}',
                                          '--distributed',
                                          f'--coordinator_address=127.0.0.1:{port}',
                                          '--num_processes=2', f'--process_id={i}'),
                            cwd=ROOT, env=child_env(4), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for i, p in enumerate(procs):
    try:
      out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append((p.returncode, out, err))
  for i, (rc, out, err) in enumerate(outs):
    assert rc == 0, f'process {i} failed:\n{err[-3000:]}\nother:\n{outs[1 - i][2][-2000:]}'
  return outs


def _metrics(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.mark.slow
def test_two_processes_agree_with_one_and_resume(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  _single(one, 4)
  _pair(two, 2)
  outs = _pair(two, 4)
  assert '[opd] resumed from step 2' in outs[0][1]
  ref, got = _metrics(one), _metrics(two)
  assert [r['step'] for r in got] == [1, 2, 3, 4]
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-5,
                               err_msg=key)
  assert sorted(os.listdir(two / 'checkpoints')) == ['2', '4']
