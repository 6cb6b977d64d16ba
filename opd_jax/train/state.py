"""The train state, the optimizer and the EMA rule: where every trainer applies its gradients.

`TrainState` holds only what changes during training — trainable parameters, optimizer state, EMA
parameters, the optimizer-step counter, the RNG key and `extra` (trainer-specific state that must
survive a resume, e.g. DiffusionNFT's old policy). Frozen base and teacher parameters live in
their own pytree and are never in the optimizer or the checkpoint.

`TrainState.apply_gradients` is the one place an optimizer step and the EMA happen, for OPD, the
RL trainers and pretraining alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@dataclasses.dataclass(frozen=True)
class EMARule:
  """The EMA of the released recipes (spec §5; teachers_rewards_eval.md §1), static under jit.

  After optimizer step k (k = the new step count), when (k + 1) % every == 0 the EMA moves
  `updates_per_step` times towards the new parameters θ_k with decay
  d_k = min((1 + k)/(10 + k), max_decay):

      ema ← d_k·ema + (1 − d_k)·θ_k,   repeated updates_per_step times  (= d_k^u·ema + (1 − d_k^u)·θ_k)

  This is Flow-GRPO's EMAModuleWrapper as the released DiffusionOPD code calls it: `ema.step`
  after each of a round's micro-batches (3, one per task) with the optimizer-step count, active
  on (count + 1) % 8 == 0. Averaging little early on (small d_k) lets the EMA follow the fast
  first moves of the weights.
  """
  max_decay: float = 0.9
  every: int = 1
  updates_per_step: int = 1

  @classmethod
  def from_config(cls, ema_cfg) -> 'EMARule':
    return cls(float(ema_cfg.max_decay), int(ema_cfg.every), int(ema_cfg.updates_per_step))

  def decay(self, step: jax.Array) -> jax.Array:
    """d_k = min((1 + k)/(10 + k), max_decay)."""
    s = jnp.asarray(step).astype(jnp.float32)
    return jnp.minimum((1 + s) / (10 + s), self.max_decay)

  def active(self, step: jax.Array) -> jax.Array:
    return (jnp.asarray(step) + 1) % self.every == 0

  def update(self, ema: Any, params: Any, step: jax.Array) -> tuple[Any, jax.Array]:
    """(new EMA, the decay applied per update, 0 when inactive) after optimizer step `step`."""
    d = self.decay(step)
    keep = d ** self.updates_per_step
    active = self.active(step)
    new = jax.tree.map(lambda e, p: jnp.where(active, keep * e + (1 - keep) * p, e), ema, params)
    return new, jnp.where(active, d, 0.0)


@struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimizer steps taken
  params: Any            # trainable parameters (pure dict)
  opt_state: Any
  ema_params: Any
  rng: jax.Array         # uint32[2] raw PRNG key, folded with the step where randomness is used
  extra: Any = struct.field(default_factory=dict)   # trainer state that must survive a resume

  def apply_gradients(self, grads: Any, tx: optax.GradientTransformation,
                      ema: EMARule) -> tuple['TrainState', dict]:
    """One optimizer step, then the EMA rule. Returns (state, metrics).

    metrics: grad_norm, param_norm, ema_decay and `finite` (loss aside, whether the new
    parameters and EMA are all finite: the loop never checkpoints a state where it is False).
    """
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    step = self.step + 1
    ema_params, decay = ema.update(self.ema_params, params, step)
    param_norm = optax.tree.norm(params)
    metrics = {'grad_norm': optax.tree.norm(grads), 'param_norm': param_norm,
               'ema_decay': decay,
               'finite': jnp.isfinite(param_norm) & jnp.isfinite(optax.tree.norm(ema_params))}
    return self.replace(step=step, params=params, opt_state=opt_state,
                        ema_params=ema_params), metrics


def learning_rate(opt_cfg, num_steps: int):
  """A float (constant, no warmup) or an optax schedule: linear warmup, then constant/cosine."""
  if opt_cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, opt_cfg.lr, opt_cfg.warmup_steps,
                                              max(num_steps, opt_cfg.warmup_steps + 1))
  if opt_cfg.warmup_steps == 0:
    return opt_cfg.lr
  return optax.join_schedules([optax.linear_schedule(0.0, opt_cfg.lr, opt_cfg.warmup_steps),
                               optax.constant_schedule(opt_cfg.lr)], [opt_cfg.warmup_steps])


def make_optimizer(opt_cfg, num_steps: int = 0) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (spec §5: lr 3e-4, β (0.9, 0.999), wd 1e-4, clip 1.0)."""
  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.grad_clip),
      optax.adamw(learning_rate(opt_cfg, num_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                  eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay))


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int,
                       extra: Any = None) -> TrainState:
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.PRNGKey(seed),
                    extra={} if extra is None else extra)


def sharded_train_state(params: Any, param_shardings: Any, tx: optax.GradientTransformation,
                        seed: int, replicated: Any, extra: Any = None,
                        extra_shardings: Any = None):
  """Shardings and a jitted factory for a TrainState whose parameters shard as given.

  Optimizer moments mirror the parameters (via `optax.tree_map_params`); `extra` shards as
  `extra_shardings`; everything else is replicated. Returns (init_state () → TrainState,
  state shardings, abstract state with shardings — the restore target).
  """
  make = lambda: create_train_state(params, tx, seed, extra)
  # `params` as an argument: arrays or ShapeDtypeStructs (an ahead-of-time compile) alike.
  abstract = jax.eval_shape(lambda p: create_train_state(p, tx, seed, extra), params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated)
  state_sh = TrainState(step=replicated, params=param_shardings, opt_state=opt_sh,
                        ema_params=param_shardings, rng=replicated,
                        extra={} if extra is None else extra_shardings)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_sh)
  return jax.jit(make, out_shardings=state_sh), state_sh, abstract
