"""Config validation fails fast with one message naming the field; the CLI exits non-zero."""

import os

import pytest

from configs.mini.opd import get_config
from opd_jax.errors import ConfigError
from opd_jax.opd.config import validate as validate_opd_config

from cli_testing import run_main


def test_default_and_smoke_configs_are_valid():
  validate_opd_config(get_config())
  validate_opd_config(get_config('smoke'))
  validate_opd_config(get_config('standin,smoke'))


@pytest.mark.parametrize('field,value,message', [
    ('rollout.kernel', 'heun', 'config.rollout.kernel'),
    ('rollout.num_steps', 0, 'config.rollout.num_steps'),
    ('rollout.noise_level', -0.1, 'config.rollout.noise_level'),
    ('objective.kl_reduction', 'max', 'config.objective.kl_reduction'),
    ('objective.kl_normaliser', 'paper', 'config.objective.kl_normaliser'),
    ('objective.timestep_fraction', 0.05, 'config.objective.timestep_fraction'),
    ('train.timestep_chunks', 4, 'config.train.timestep_chunks'),
    ('train.num_microbatches', 2, 'config.train.num_microbatches'),
    ('objective.name', 'ppo', 'config.objective.name'),
    ('objective.name', 'ppo_sampled_logratio', 'config.objective.name'),
    ('objective.discount', 2.0, 'config.objective.discount'),
    ('optimizer.lr', -1.0, 'config.optimizer.lr'),
    ('optimizer.b2', 1.0, 'config.optimizer.b2'),
    ('ema.max_decay', 1.5, 'config.ema.max_decay'),
    ('model.num_heads', 5, 'config.model.num_heads'),
    ('model.patch_size', 3, 'config.model.patch_size'),
    ('model.dtype', 'int8', 'config.model.dtype'),
    ('lora.rank', 0, 'config.lora.rank'),
    ('student.kind', 'qlora', 'config.student.kind'),
    ('rollout.cfg_scale', -1.0, 'config.rollout.cfg_scale'),
    ('data.batch_size', 4, 'config.data.batch_size'),
    ('ema.every', 0, 'config.ema.every'),
    ('ema.updates_per_step', 0, 'config.ema.updates_per_step'),
    ('train.checkpoint_every', 0, 'config.train.checkpoint_every'),
])
def test_bad_values_name_the_field(field, value, message):
  c = get_config()
  section, leaf = field.split('.')
  c[section][leaf] = value
  with pytest.raises(ConfigError, match=message.replace('.', r'\.')):
    validate_opd_config(c)


@pytest.mark.parametrize('overrides,message', [
    ({'objective.name': 'ppo_analytic_advantage', 'rollout.kernel': 'flow_grpo',
      'rollout.noise_level': 0.7}, 'config.train.fused_vjp'),
    ({'train.timestep_chunks': 3}, 'config.train.timestep_chunks'),
])
def test_fused_vjp_needs_the_analytic_objective_in_one_chunk(overrides, message):
  c = get_config()
  c.train.fused_vjp = True
  for field, value in overrides.items():
    section, leaf = field.split('.')
    c[section][leaf] = value
  with pytest.raises(ConfigError, match=message.replace('.', r'\.')):
    validate_opd_config(c)


def test_teachers_are_declared_for_exactly_the_tasks():
  c = get_config()
  c.data.tasks = ('composition', 'text')
  with pytest.raises(ConfigError, match=r"config\.teachers\.tasks: teacher\(s\) \['aesthetics'\]"):
    validate_opd_config(c)
  c = get_config()
  c.teachers.tasks.text.cfg_scale = 0.5
  with pytest.raises(ConfigError, match=r'config\.teachers\.tasks\.text\.cfg_scale'):
    validate_opd_config(c)


def test_bad_mesh_shape():
  from opd_jax.parallel.mesh import resolve_mesh_shape
  with pytest.raises(ValueError, match='config.mesh.shape'):
    resolve_mesh_shape({'data': 3, 'fsdp': 1}, 8)
  with pytest.raises(ValueError, match='at most one axis'):
    resolve_mesh_shape({'data': -1, 'fsdp': -1}, 8)
  assert resolve_mesh_shape({'data': -1, 'fsdp': 2}, 8) == {'data': 4, 'fsdp': 2, 'tensor': 1}


def test_cli_rejects_a_bad_override_with_one_line(tmp_path):
  proc = run_main('configs/mini/opd.py:standin,smoke', tmp_path, '--config.rollout.kernel=heun',
                  timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith('error: config.rollout.kernel')
  assert not os.path.exists(tmp_path / 'checkpoints')


@pytest.mark.parametrize('field,value,message', [
    ('base.source', 'hub', 'config.base.source'),
    ('base.path', '/nonexistent/base', 'config.base.path'),
    ('teachers.source', 'hub', 'config.teachers.source'),
    ('data.source', 'laion', 'config.data.source'),
])
def test_bad_input_sources_name_the_field(field, value, message):
  from opd_jax.opd.sources import load_inputs
  c = get_config('standin,smoke')
  if field == 'base.path':
    c.base.source = 'mini_world'
  section, leaf = field.split('.')
  c[section][leaf] = value
  with pytest.raises(ConfigError, match=message.replace('.', r'\.')):
    load_inputs(c, batch_per_task=2)


def test_missing_teacher_paths_name_the_field():
  from opd_jax.opd.sources import load_inputs
  c = get_config('standin,smoke')
  c.teachers.source = 'artifacts'
  with pytest.raises(ConfigError, match=r'config\.teachers\.tasks\.\w+\.path: no path'):
    load_inputs(c, batch_per_task=2)


def test_cli_runs_a_single_rl_stage_config_and_needs_its_base(tmp_path):
  proc = run_main('configs/mini/grpo.py:text,smoke', tmp_path, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith('error: config.base.path')


def test_sd35m_tpu_variants_set_the_micro_batches_that_fit():
  from configs import opd_sd35m
  assert opd_sd35m.get_config().train.num_microbatches == 3          # v5e-8 (16 GiB chips)
  assert opd_sd35m.get_config('v6e').train.num_microbatches == 1
  combined = opd_sd35m.get_config('sde,v5p')
  assert combined.rollout.kernel == 'flow_grpo' and combined.train.num_microbatches == 1
  for variant in ('', 'v4', 'v6e', 'sde,v6e'):
    validate_opd_config(opd_sd35m.get_config(variant))
  with pytest.raises(ValueError, match='unknown variant'):
    opd_sd35m.get_config('v7')
