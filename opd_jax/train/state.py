"""The train state pytree, the optimizer and the recipe's EMA (spec §5).

TrainState holds only what changes during training — student parameters, optimizer state, EMA
parameters, the step and the RNG key. Frozen base and teacher parameters live in their own
pytree and are never in the optimizer or the checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimizer steps taken (= rounds)
  params: Any            # trainable student parameters (pure dict)
  opt_state: Any
  ema_params: Any
  rng: jax.Array         # uint32[2] raw PRNG key, folded with the step each round


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and a constant learning rate (spec §5)."""
  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.grad_clip),
      optax.adamw(opt_cfg.lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay))


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params),
                    rng=jax.random.PRNGKey(seed))


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
  """min((1 + s)/(10 + s), max_decay): averages little early on, when weights move fast."""
  s = step.astype(jnp.float32)
  return jnp.minimum((1 + s) / (10 + s), max_decay)


def ema_update(ema: Any, params: Any, step: jax.Array, max_decay: float, every: int):
  """EMA update applied only on steps divisible by `every` (a mask, not a Python branch)."""
  decay = ema_decay(step, max_decay)
  active = (step % every) == 0
  new = jax.tree.map(lambda e, p: jnp.where(active, decay * e + (1 - decay) * p, e), ema, params)
  return new, jnp.where(active, decay, 0.0)


def sharded_train_state(params: Any, param_shardings: Any, tx: optax.GradientTransformation,
                        seed: int, replicated: Any):
  """Shardings and a jitted factory for a TrainState whose parameters shard as given.

  Optimizer moments mirror the parameters (via `optax.tree_map_params`); everything else is
  replicated. Returns (init_state () → TrainState, state shardings, abstract state).
  """
  make = lambda: create_train_state(params, tx, seed)
  abstract = jax.eval_shape(make)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated)
  state_sh = TrainState(step=replicated, params=param_shardings, opt_state=opt_sh,
                        ema_params=param_shardings, rng=replicated)
  return jax.jit(make, out_shardings=state_sh), state_sh, abstract
