"""The SD3.5 recipe end to end on tiny random models (configs/opd_sd35m.py), all built here.

A tiny SD3.5-architecture pipeline (dual attention + RMS qk-norm) is saved as a diffusers
folder; three tiny PEFT teacher LoRAs are written by peft; the prompt-embedding cache is made by
`python -m opd_jax.tools.encode_prompts` from prompt files. OPD then runs a few rounds from those
files (loss goes down), resumes from its checkpoint, and exports the EMA student in PEFT format,
which diffusers + peft load to give the JAX student's outputs.
"""

import json
import os

import jax
import numpy as np
import pytest

from configs.opd_sd35m import get_config
from opd_jax.errors import ConfigError
from opd_jax.opd.trainer import prepare, train_opd
from opd_jax.parallel.mesh import make_mesh
from opd_jax.sampling.schedule import flow_match_sigmas

import sd3_testing

TASKS = ('composition', 'text', 'aesthetics')
PROMPTS = {'composition': ['a photo of a cat', 'two dogs left of a car', 'a red cup'],
           'text': ['a sign that says "OPEN"', 'the word "cat" on a wall', 'a label "7"'],
           'aesthetics': ['a calm lake at dawn', 'a colourful garden', 'a misty forest']}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('sd35')
  sd3_testing.save_sd35(root)
  teachers = sd3_testing.write_teachers(root / 'sd35', root, TASKS)
  return {'base': str(root / 'sd35'), 'teachers': tuple(teachers[t] for t in TASKS),
          'cache': sd3_testing.encode_prompt_files(root, PROMPTS)}


def _config(files, rounds):
  c = get_config()
  c.base.path = files['base']
  for task, path in zip(TASKS, files['teachers']):
    c.teachers.tasks[task].path = path
  c.data.embeddings_dir = files['cache']
  c.model.update(latent_size=8, latent_channels=4, dtype='float32', param_dtype='float32')
  c.lora.update(rank=4, alpha=8.0)
  c.data.batch_size_per_device = 2
  c.train.num_microbatches = 2       # the shipped 3 does not split 2 prompts per device
  c.optimizer.lr = 2e-2
  c.ema.update(every=1, updates_per_step=1)
  c.train.update(num_steps=rounds, checkpoint_every=3, async_checkpoints=False)
  return c


def _mesh():
  return make_mesh({'data': 2}, jax.devices()[:2])


@pytest.mark.slow
def test_sd35_recipe_trains_resumes_and_exports(files, tmp_path):
  state, _ = train_opd(_config(files, 6), str(tmp_path), mesh=_mesh())
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == list(range(1, 7))
  losses = [r['loss'] for r in rows]
  assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']

  state, _ = train_opd(_config(files, 8), str(tmp_path), mesh=_mesh())
  assert int(state.step) == 8
  assert [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')] == list(range(1, 9))

  # The exported EMA student, loaded by diffusers + peft, gives the JAX student's outputs.
  sd3_testing.assert_peft_matches(files['base'], state.ema_params, str(tmp_path / 'student_peft'),
                                  rank=4, alpha=8.0)


@pytest.mark.parametrize('field', ['base.path', 'teachers.tasks.text.path',
                                   'data.embeddings_dir'])
def test_missing_paths_name_the_field(files, tmp_path, field):
  c = _config(files, 1)
  *parents, leaf = field.split('.')
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = ''
  with pytest.raises(ConfigError, match='config\\.' + field.replace('.', '\\.')):
    train_opd(c, str(tmp_path), mesh=_mesh())
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_the_schedule_shift_comes_from_the_checkpoint(files, tmp_path):
  """rollout.shift = 0 (the SD3.5-M default) reads scheduler/scheduler_config.json's shift."""
  import shutil
  folder = tmp_path / 'sd35'
  shutil.copytree(files['base'], folder)
  config_path = folder / 'scheduler' / 'scheduler_config.json'
  scheduler = json.loads(config_path.read_text())
  for shift in (scheduler.get('shift', 1.0), 3.0):
    scheduler['shift'] = shift
    config_path.write_text(json.dumps(scheduler))
    c = _config(files, 1)
    c.base.path = str(folder)
    assert c.rollout.shift == 0.0
    trainer = prepare(c, _mesh())
    assert trainer.config.rollout.shift == shift
    np.testing.assert_allclose(trainer.setup.spec.sigmas, flow_match_sigmas(10, shift),
                               rtol=1e-6)


def test_variants():
  sde = get_config('sde')
  assert (sde.rollout.kernel, sde.rollout.noise_level) == ('flow_grpo', 0.7)
  single = get_config('single:text')
  assert single.data.tasks == ('text',)
  assert list(single.teachers.tasks.keys()) == ['text']
  assert single.teachers.tasks.text.cfg_scale == 4.5
  full = get_config()
  assert {t: full.teachers.tasks[t].cfg_scale for t in TASKS} == {
      'composition': 1.0, 'text': 4.5, 'aesthetics': 4.5}
  assert (full.ema.every, full.ema.updates_per_step, full.ema.max_decay) == (8, 3, 0.9)
  with pytest.raises(ValueError, match='single:<task>'):
    get_config('single:ocr')
