"""scan_layers: the MMDiT as lax.scans over runs of identical blocks equals the unrolled one."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.models.mmdit import MMDiT, MMDiTConfig

CFG = MMDiTConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=5,
                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                  caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=8,
                  dual_attention_layers=(0, 1), qk_norm='rms_norm')


def test_scanned_equals_unrolled_forward_and_gradient():
  plain = MMDiT(CFG, rngs=nnx.Rngs(0), lora_rank=2)
  # SD3.5 layout: 2 MMDiT-X blocks, 2 plain blocks, the context_pre_only block.
  assert [len(states) for _, states in plain.block_runs()] == [2, 2, 1]
  graphdef, state = nnx.split(plain)
  # Every weight perturbed (the LoRA B factors start at zero), on the host: a jax.random draw
  # per leaf would compile one program per shape (~11 s for these 269 leaves).
  noise = np.random.default_rng(1)
  state = jax.tree.map(lambda x: np.asarray(x) + np.float32(0.05) * noise.standard_normal(
      x.shape, np.float32), state)
  # The scanned network's graph alone: its weights are `state` (the same per-block layout).
  scanned, _ = nnx.split(nnx.eval_shape(lambda: MMDiT(CFG, rngs=nnx.Rngs(0), lora_rank=2,
                                                      scan_layers=True, remat=True)))
  k = jax.random.split(jax.random.PRNGKey(2), 3)
  x = jax.random.normal(k[0], (2, 8, 8, 4))
  ctx, pooled = jax.random.normal(k[1], (2, 5, 12)), jax.random.normal(k[2], (2, 10))
  ts = jnp.array([900.0, 100.0])

  def loss(gd):
    return jax.jit(jax.value_and_grad(
        lambda s: jnp.mean(nnx.merge(gd, s)(x, ts, ctx, pooled) ** 2)))

  (la, ga), (lb, gb) = loss(graphdef)(state), loss(scanned)(state)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
