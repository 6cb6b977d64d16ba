"""The round compiled ahead of time from shapes (opd_jax/opd/aot.py) is build_opd's round."""

import jax
import numpy as np
import pytest

from opd_jax.data.prompt_source import RandomEmbeddingPrompts
from opd_jax.opd import aot
from opd_jax.opd.config import check_global_batch
from opd_jax.opd.setup import build_opd, device_batch

from opd_testing import mesh_of, tiny_config


def _described(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype), x.sharding.spec), tree)


def test_compiled_from_shapes_equals_the_built_round():
  config = tiny_config()
  mesh = mesh_of(4, 2)
  prompts = check_global_batch(config, 8)
  source = RandomEmbeddingPrompts(len(config.data.tasks), config.data.num_prompts,
                                  config.data.context_length, config.model.context_dim,
                                  config.model.pooled_dim, prompts, seed=config.seed)
  setup = build_opd(config, mesh, source.negative())
  batch = device_batch(mesh, source.next_batch(), setup.teacher_index)

  shapes = aot.abstract_round(config, mesh, source.negative())
  assert _described(shapes.state) == _described(setup.abstract_state)
  assert _described(shapes.frozen) == _described(setup.frozen)
  assert _described(shapes.batch) == _described(batch)

  compiled = shapes.lower().compile()
  expected_state, expected = setup.round_fn(setup.init_state(), setup.frozen, batch)
  state, metrics = compiled(setup.init_state(), setup.frozen, batch)
  for a, b in zip(jax.tree.leaves((expected_state, expected)), jax.tree.leaves((state, metrics))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  memory = aot.memory_per_device(compiled)
  state_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(expected_state))
  assert memory['argument'] >= state_bytes > 0
  assert memory['alias'] > 0     # the state is donated
  assert memory['total'] == (memory['argument'] + memory['output'] - memory['alias'] +
                             memory['temp'])


class _Refused:
  """A lowered program the compiler refuses, as the TPU compiler does when HBM is short."""
  def compile(self):
    raise RuntimeError('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory '
                       'in memory space hbm. Used 149.86G of 15.75G hbm.\nmore detail')


class _Broken:
  def compile(self):
    raise RuntimeError('INTERNAL: a compiler bug')


def test_compile_within_memory_turns_a_refused_compile_into_one_line():
  from opd_jax.errors import ConfigError
  devices = jax.devices()[:1]
  with pytest.raises(ConfigError) as e:
    aot.compile_within_memory(_Refused(), devices)
  assert 'config.train.num_microbatches' in str(e.value) and '149.86G' in str(e.value)
  assert '\n' not in str(e.value) and 'train.fused_vjp=True' in str(e.value)
  with pytest.raises(RuntimeError, match='compiler bug'):   # not a memory error: a bug, re-raised
    aot.compile_within_memory(_Broken(), devices)
  assert aot.device_memory_limit(devices) is None           # the CPU runtime states no limit


def test_fsdp_keeps_the_activations_batch_sharded():
  """On an fsdp-only mesh a device holds about what one device holds for its share of the batch
  (without `Policy.batch_sharding` XLA kept the activations replicated over fsdp: ~3×)."""
  temps = []
  for devices in (1, 8):
    c = tiny_config(**{'train.fused_vjp': True})     # the SD3.5-M default round
    c.model.latent_size = 16
    c.data.batch_size, c.data.batch_size_per_device = 8 * devices, 0
    negative = RandomEmbeddingPrompts(3, 8, c.data.context_length, c.model.context_dim,
                                      c.model.pooled_dim, 4, seed=0).negative()
    compiled = aot.compile_round(c, mesh_of(1, devices), negative)
    temps.append(aot.memory_per_device(compiled)['temp'])
  assert temps[1] < 1.3 * temps[0], temps
