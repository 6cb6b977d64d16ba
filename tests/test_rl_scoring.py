"""The RL trainers' reward scoring (opd_jax/rl/scoring.py): per-task dispatch, the worker thread
that scores one chunk while the next samples, each process's own rows, and its errors."""

import threading

import jax
import ml_collections
import numpy as np
import pytest

from opd_jax.errors import ConfigError
from opd_jax.parallel import sharding as shd
from opd_jax.parallel.mesh import make_mesh
from opd_jax.rl import scoring


def _rewards(**fns):
  names = tuple(fns)
  return scoring.TaskRewards(names, tuple(fns.values()), names)


def test_each_image_is_scored_by_its_own_tasks_reward():
  seen = {}

  def by(name, offset):
    def fn(images, prompts, metadata):
      seen[name] = (list(prompts), list(metadata))
      return images[:, 0, 0, 0] + offset
    return fn
  rewards = _rewards(a=by('a', 0.0), b=by('b', 100.0))
  images = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1) * np.ones((6, 2, 2, 3), np.float32)
  task = np.array([0, 1, 0, 1, 1, 0])
  out = rewards(images, [f'p{i}' for i in range(6)], [{'i': i} for i in range(6)], task)
  np.testing.assert_array_equal(out, [0, 101, 2, 103, 104, 5])
  assert seen['a'] == (['p0', 'p2', 'p5'], [{'i': 0}, {'i': 2}, {'i': 5}])


@pytest.mark.parametrize('bad', [np.array([1.0, np.nan]), np.array([1.0])])
def test_a_reward_returning_non_finite_or_missing_values_stops_with_the_task(bad):
  rewards = _rewards(text=lambda images, prompts, metadata: bad)
  with pytest.raises(FloatingPointError, match='config.rewards.tasks.text'):
    rewards(np.zeros((2, 1, 1, 3)), ['x', 'y'], [{}, {}], np.zeros(2, np.int64))


def test_local_rows_reads_each_row_once_in_batch_order():
  """Batch over data × fsdp, replicated over tensor: 8 shards, 4 distinct row blocks."""
  mesh = make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2}, jax.devices()[:8])
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  arr = jax.device_put(x, shd.batch_sharding(mesh, 2))
  assert len(arr.addressable_shards) == 8
  rows, host = scoring.local_rows(arr)
  np.testing.assert_array_equal(rows, np.arange(8))
  np.testing.assert_array_equal(host, x)
  rows, host = scoring.local_rows(x)            # host arrays are all local
  np.testing.assert_array_equal(rows, np.arange(8))


def test_async_scorer_scores_chunks_in_a_worker_thread_and_returns_batch_order():
  threads = set()

  def fn(images, prompts, metadata):
    threads.add(threading.current_thread().name)
    return images[:, 0, 0, 0].astype(np.float32)
  scorer = scoring.AsyncScorer(_rewards(a=fn))
  images = np.arange(8, dtype=np.float32)[:, None, None, None] * np.ones((8, 1, 1, 3))
  prompts, metadata, task = [str(i) for i in range(8)], [{}] * 8, np.zeros(8, np.int64)
  for start in (4, 0):                           # chunks may arrive in any order
    scorer.submit(jax.device_put(images[start:start + 4]), start, prompts, metadata, task)
  np.testing.assert_array_equal(scorer.collect(8), np.arange(8))
  assert threads and all(t.startswith('rewards') for t in threads)
  scorer.submit(images[:4], 0, prompts, metadata, task)   # a row left unscored is an error
  with pytest.raises(RuntimeError, match='scored by no process'):
    scorer.collect(8)

  def broken(images, prompts, metadata):
    raise ConnectionError('OCR service: no answer after 3 attempts')
  failing = scoring.AsyncScorer(_rewards(a=broken))
  failing.submit(images, 0, prompts, metadata, task)
  with pytest.raises(ConnectionError, match='3 attempts'):   # never a silent 0
    failing.collect(8)
  scorer.close()
  failing.close()


def _config(**tasks):
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict({'tasks': tuple(tasks)})
  c.rewards = ml_collections.ConfigDict({'tasks': tasks, 'pickscore': '', 'clip': '',
                                         'batch_size': 4})
  return c


def test_reward_loading_errors_name_the_field():
  with pytest.raises(ConfigError, match='config.rewards.tasks.a: unknown reward'):
    scoring.load_task_rewards(_config(a='nope'))
  with pytest.raises(ConfigError, match='config.rewards.pickscore'):
    scoring.load_task_rewards(_config(a='pickscore'))
  rule = scoring.load_task_rewards(_config(text='text'))
  assert rule.names == ('text',)


_TWO_PROCESS_SCRIPT = r'''
import json
import sys
import jax
import numpy as np
from opd_jax.parallel import distributed, sharding as shd
from opd_jax.parallel.mesh import make_mesh
from opd_jax.rl import scoring
distributed.initialize(f'127.0.0.1:{sys.argv[1]}', 2, int(sys.argv[2]))
mesh = make_mesh({'data': 4, 'fsdp': 2}, jax.devices())
images = np.arange(16 * 2, dtype=np.float32).reshape(16, 1, 1, 2) * np.ones((16, 2, 2, 2))
arr = jax.make_array_from_callback(images.shape, shd.batch_sharding(mesh, 4),
                                   lambda idx: images[idx])
rewards = scoring.TaskRewards(('a',), (lambda im, p, m: im[:, 0, 0, 0] * 10.0,), ('a',))
scorer = scoring.AsyncScorer(rewards)
scorer.submit(arr, 0, [str(i) for i in range(16)], [{}] * 16, np.zeros(16, np.int64))
rows, _ = scoring.local_rows(arr)
out = scorer.collect(16)
print('RESULT ' + json.dumps({'rows': sorted(rows.tolist()), 'out': out.tolist()}))
'''


@pytest.mark.slow
def test_each_process_scores_its_own_rows_and_all_get_every_score(tmp_path):
  """Two CPU processes (gloo), 4 devices each: each scores only the 8 rows its devices hold and
  both end with the 16 scores of the batch in order."""
  import json
  import subprocess
  import sys
  from cli_testing import ROOT, child_env
  from test_multiprocess import _free_port
  script = tmp_path / 'gather.py'
  script.write_text(_TWO_PROCESS_SCRIPT)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i)], cwd=ROOT,
                            env=child_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  rows = []
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    result = json.loads([l for l in out.splitlines() if l.startswith('RESULT ')][0][7:])
    assert len(result['rows']) == 8
    rows += result['rows']
    np.testing.assert_array_equal(result['out'], np.arange(16) * 20.0)
  assert sorted(rows) == list(range(16))      # the processes split the batch between them
