"""The round compiled ahead of time from shapes (opd_jax/opd/aot.py) is build_opd's round."""

import jax
import numpy as np

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
