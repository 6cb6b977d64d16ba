"""The MMDiT's mixed-precision options: no-ops in float32, and in bfloat16 they keep the small
teacher − student velocity gap that the ODE loss is made of (benchmarks/precision_gap.py)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.models.lora import split_model
from opd_jax.models.mmdit import MMDiT, MMDiTConfig

CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
              caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=8,
              dual_attention_layers=[0], qk_norm='rms_norm')
FLAGS = dict(float32_residual=True, float32_output=True, float32_matmul_output=True)


def _model(dtype, **flags):
  return MMDiT(MMDiTConfig.from_dict(CONFIG), rngs=nnx.Rngs(0), lora_rank=4, lora_alpha=4.0,
               dtype=dtype, param_dtype=jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32,
               **flags)


def _inputs(n=4):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((n, 8, 8, 4)), jnp.float32), jnp.full((n,), 700.0),
          jnp.asarray(rng.standard_normal((n, 6, 24)), jnp.float32),
          jnp.asarray(rng.standard_normal((n, 16)), jnp.float32))


def test_flags_change_nothing_in_float32():
  args = _inputs()
  outputs = []
  for flags in ({}, FLAGS):
    graphdef, state = nnx.split(_model(jnp.float32, **flags))
    outputs.append(jax.jit(lambda s, g=graphdef: nnx.merge(g, s)(*args))(state))
  np.testing.assert_array_equal(*outputs)


def test_flags_keep_the_teacher_student_gap_in_bfloat16():
  args = _inputs()
  _, base, adapter = split_model(_model(jnp.float32))
  base, student = nnx.to_pure_dict(base), nnx.to_pure_dict(adapter)
  leaves, treedef = jax.tree.flatten(student)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(student)[0]]
  teacher = jax.tree.unflatten(treedef, [
      x + (0.05 * jax.random.normal(k, x.shape) if 'lora_b' in p else 0)
      for k, x, p in zip(keys, leaves, paths)])

  def gap(dtype, **flags):
    graphdef, _, _ = split_model(_model(dtype, **flags))
    cast = jax.tree.map(lambda x: x.astype(dtype), base)
    run = jax.jit(lambda a: nnx.merge(graphdef, cast, a)(*args))
    return run(teacher) - run(student)

  exact = gap(jnp.float32)
  rel = lambda g: float(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact))
  plain, kept = rel(gap(jnp.bfloat16)), rel(gap(jnp.bfloat16, **FLAGS))
  assert kept < 0.5 * plain, (kept, plain)
