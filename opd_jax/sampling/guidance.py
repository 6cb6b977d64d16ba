"""Classifier-free guidance (spec §2): v = v_uncond + w·(v_cond − v_uncond).

Conditioning is a dict pytree ({'context', 'pooled', optionally 'context_mask'}) with a leading
batch axis; the unconditional branch is the empty-prompt embedding broadcast to the batch. Both
branches run as one network call on a 2B batch, as diffusers does.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Cond = dict[str, jax.Array]
VelocityFn = Callable[[jax.Array, jax.Array, Cond], jax.Array]


def guided_velocity(velocity_fn: VelocityFn, x: jax.Array, timestep: jax.Array, cond: Cond,
                    uncond: Cond | None, cfg_scale: Any) -> jax.Array:
  """CFG velocity in float32. `uncond=None` or w = 1 means no guidance: one B-batch call.

  `cfg_scale` may be a traced scalar (per-teacher scales selected inside jit, e.g. a CFG-free
  teacher at 1.0 beside guided ones): then a `lax.cond` runs the conditional branch alone when
  it is 1 — as diffusers does (no unconditional pass at w = 1) — and the 2B batch otherwise.
  """
  def conditional():
    return velocity_fn(x, timestep, cond).astype(jnp.float32)

  def guided():
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
    v = velocity_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([timestep, timestep]),
                    both)
    v_cond, v_uncond = jnp.split(v.astype(jnp.float32), 2, axis=0)
    return v_uncond + jnp.asarray(cfg_scale, jnp.float32) * (v_cond - v_uncond)

  if uncond is None:
    return conditional()
  try:
    w = float(cfg_scale)             # known while tracing: choose here
  except (TypeError, jax.errors.ConcretizationTypeError):
    return jax.lax.cond(jnp.asarray(cfg_scale) == 1, conditional, guided)
  return conditional() if w == 1 else guided()


def broadcast_uncond(negative: Cond, batch_size: int) -> Cond:
  """Tiles a single empty-prompt embedding (leading axis 1) to the batch."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch_size,) + x.shape[1:]), negative)
