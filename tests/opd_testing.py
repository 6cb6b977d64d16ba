"""Shared builders for OPD tests: a tiny config, meshes and one round on a given mesh."""

import jax

from configs.mini.opd import get_config
from opd_jax.data.prompt_source import RandomEmbeddingPrompts
from opd_jax.parallel.mesh import make_mesh
from opd_jax.opd.setup import build_opd, device_batch

from mini_testing import override


def tiny_config(**overrides):
  c = get_config('standin,smoke')
  c.model.dim = 16
  c.model.num_heads = 2
  c.model.context_dim = 8
  c.model.pooled_dim = 8
  c.model.latent_size = 4
  c.model.latent_channels = 2
  c.lora.rank = 4
  c.data.context_length = 4
  c.rollout.num_steps = 4
  c.objective.timestep_fraction = 0.75
  c.teachers.random_scale = 0.3
  c.optimizer.lr = 1e-2
  c.ema.every = 1
  c.ema.updates_per_step = 1
  return override(c, **overrides)


def mesh_of(data, fsdp=1):
  return make_mesh({'data': data, 'fsdp': fsdp}, jax.devices()[:data * fsdp])


def run_rounds(config, mesh, rounds, batch_per_task=8):
  """Runs `rounds` OPD rounds; returns (host params, list of host metrics, setup)."""
  source = RandomEmbeddingPrompts(len(config.data.tasks), config.data.num_prompts,
                                  config.data.context_length, config.model.context_dim,
                                  config.model.pooled_dim, batch_per_task, seed=config.seed)
  setup = build_opd(config, mesh, source.negative())
  state = setup.init_state()
  metrics = []
  for _ in range(rounds):
    state, m = setup.round_fn(state, setup.frozen, device_batch(mesh, source.next_batch(),
                                                                 setup.teacher_index))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics, setup
