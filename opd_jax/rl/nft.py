"""DiffusionNFT (spec §7; teachers_rewards_eval.md §1): RL on the forward process with any
black-box sampler, CFG-free.

Each iteration:
  1. draw prompts of the active task(s) (joint or cascade, as in Flow-GRPO), G images each,
     sampled by the *old* policy θ_old with any sampler (config.rollout; the Euler ODE here);
  2. score the images on the host with each prompt's task reward, normalise per prompt group
     (`advantages.group_advantages`) and map to an optimality weight r = clip(½ + ½·A/A_max, 0, 1);
  3. re-noise the clean samples x_t = (1 − t)·x0 + t·ε at fresh t (`training_timesteps`:
     t ~ U(t_min, t_max), or upstream's: the sampler's own schedule, shuffled per sample) and
     train on the flow-matching loss of an implicit positive and negative policy

        v+ = β·v_θ + (1 − β)·v_old,   v− = (1 + β)·v_old − β·v_θ     (v_old = v_{θ_old}, detached)
        L  = mean_b [ r_b·e(v+) + (1 − r_b)·e(v−) ] / β  (·A_max if nft.scale_by_adv_clip)
             + kl_beta·mean ‖v_θ − v_ref‖²   (v_ref the base: LoRA disabled)

     with e the per-sample error: 'velocity' mean (v± − (ε − x0))², or upstream's 'adaptive_x0'
     mean (x̂0 − x0)² / sg(mean |x̂0 − x0|), x̂0 = x_t − t·v± (`adaptive_x0_error`)
     — pushing v_θ toward high-reward samples and away from low-reward ones, with no likelihood,
     no ratio and no CFG (the teacher is queried at CFG 1.0). The 1/β keeps the gradient scale
     independent of β (∂L/∂v_θ = 2r(v+ − target) + …);
  4. θ_old ← η·θ_old + (1 − η)·θ, η = nft.old_decay ('constant') or upstream's schedule
     min(rate·(step − flat), max) of the optimizer-step count ('linear', `old_policy_decay`);
     η = 0 samples with the current policy.

Upstream: NVlabs/DiffusionNFT scripts/train_nft_sd3.py and config/nft.py (adv_clip_max 5, β 1,
KL β 1e-4, 9 of 10 schedule timesteps per sample, decay_type 1 = min(0.001·step, 0.5)).
θ_old lives in the TrainState's `extra`, so it is checkpointed and restored with the adapter.
The inner loop (epochs × minibatches) is one jitted call with donated state; iterations,
checkpoints and resume are the shared RL trainer's (`opd_jax.rl.trainer`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from opd_jax.errors import ConfigError
from opd_jax.models.policy import Policy
from opd_jax.parallel import sharding as shd
from opd_jax.rl.setup import RLSetup, jit_update, microbatched_value_and_grad, put_batch
from opd_jax.sampling.schedule import NUM_TRAIN_TIMESTEPS, flow_match_sigmas
from opd_jax.train import config_check as cc
from opd_jax.train.state import EMARule, TrainState

WEIGHTINGS = ('velocity', 'adaptive_x0')
TIMESTEP_SAMPLINGS = ('uniform', 'sampler_schedule')
OLD_DECAY_SCHEDULES = ('constant', 'linear')
X0_WEIGHT_FLOOR = 1e-5      # upstream clips the adaptive weight's denominator from below


@dataclasses.dataclass(frozen=True)
class NFTSpec:
  beta: float
  adv_clip: float
  kl_beta: float
  timesteps_per_sample: int
  t_min: float
  t_max: float
  num_minibatches: int
  inner_epochs: int
  old_decay: float
  ema: EMARule
  weighting: str = 'velocity'              # 'velocity' | 'adaptive_x0'
  timesteps: str = 'uniform'               # 'uniform' | 'sampler_schedule'
  schedule: tuple[float, ...] = ()         # the sampler's t_0..t_{N−1} ('sampler_schedule')
  old_decay_schedule: str = 'constant'     # 'constant' (old_decay) | 'linear'
  old_decay_flat: int = 0
  old_decay_rate: float = 0.0
  old_decay_max: float = 0.0
  scale_by_adv_clip: bool = False
  num_microbatches: int = 1                # gradient accumulation inside a minibatch


def nft_spec(config) -> NFTSpec:
  n, t, r = config.nft, config.train, config.rollout
  cc.choice(n.weighting, 'nft.weighting', WEIGHTINGS)
  cc.choice(n.timesteps, 'nft.timesteps', TIMESTEP_SAMPLINGS)
  cc.choice(n.old_decay_schedule, 'nft.old_decay_schedule', OLD_DECAY_SCHEDULES)
  cc.integer(n.old_decay_flat, 'nft.old_decay_flat', 0)
  cc.non_negative(n.old_decay_rate, 'nft.old_decay_rate')
  cc.check(isinstance(n.old_decay_max, (int, float)) and 0 <= n.old_decay_max < 1,
           'nft.old_decay_max', f'must be in [0, 1), got {n.old_decay_max!r}')
  cc.check(isinstance(n.scale_by_adv_clip, bool), 'nft.scale_by_adv_clip',
           f'must be True or False, got {n.scale_by_adv_clip!r}')
  if n.timesteps == 'sampler_schedule':
    cc.check(n.timesteps_per_sample <= r.num_steps, 'nft.timesteps_per_sample',
             f'{n.timesteps_per_sample} exceeds the {r.num_steps} timesteps of the sampler '
             "schedule (nft.timesteps = 'sampler_schedule' draws each at most once per sample)")
  if not 0 < n.beta <= 1:
    raise ConfigError(f'config.nft.beta: must be in (0, 1], got {n.beta}')
  if not 0 <= n.t_min < n.t_max <= 1:
    raise ConfigError(f'config.nft.t_min: needs 0 <= t_min < t_max <= 1, got {n.t_min}, '
                      f'{n.t_max}')
  if config.rollout.cfg_scale != 1.0:
    raise ConfigError('config.rollout.cfg_scale: DiffusionNFT is CFG-free; set it to 1.0')
  # rollout.shift = 0 (an SD3 base's own shift) is resolved when the base loads; the config is
  # validated again then, and the spec built from the resolved value.
  schedule = (tuple(float(x) for x in flow_match_sigmas(r.num_steps, r.shift)[:-1])
              if r.shift > 0 else ())
  return NFTSpec(float(n.beta), float(n.adv_clip), float(n.kl_beta), n.timesteps_per_sample,
                 float(n.t_min), float(n.t_max), t.num_minibatches, t.inner_epochs,
                 float(n.old_decay), EMARule.from_config(config.ema), n.weighting, n.timesteps,
                 schedule, n.old_decay_schedule, int(n.old_decay_flat), float(n.old_decay_rate),
                 float(n.old_decay_max), bool(n.scale_by_adv_clip), t.num_microbatches)


def optimality(advantages: np.ndarray, adv_clip: float) -> np.ndarray:
  """r = clip(½ + ½·A/A_max, 0, 1): 1 for clearly good samples, 0 for clearly bad ones."""
  return np.clip(0.5 + 0.5 * np.asarray(advantages) / adv_clip, 0.0, 1.0).astype(np.float32)


def implicit_policies(v: jax.Array, v_old: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
  """DiffusionNFT's implicit positive and negative policies (spec §1):
  v+ = β·v_θ + (1 − β)·v_old,  v− = (1 + β)·v_old − β·v_θ."""
  return beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v


def velocity_error(v: jax.Array, target: jax.Array) -> jax.Array:
  """Per-sample flow-matching error mean over latent elements of (v − (ε − x0))² [B]."""
  return jnp.mean(jnp.square(v - target), axis=tuple(range(1, v.ndim)))


def adaptive_x0_error(v: jax.Array, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  """DiffusionNFT's adaptively weighted x0-space error per sample [B] (spec §1;
  NVlabs/DiffusionNFT scripts/train_nft_sd3.py, "adaptive weighting").

      x̂0 = x_t − t·v,   e = mean (x̂0 − x0)² / sg(max(mean |x̂0 − x0|, 1e-5))

  Since x̂0 − x0 = −t·(v − (ε − x0)), the net weight on the velocity error is
  t / mean |v − (ε − x0)|: large errors and small t count less.

  Args:
    v: [B, ...] a predicted velocity (v+ or v−); x_t, x0: [B, ...]; t: [B] noise levels.
  """
  axes = tuple(range(1, v.ndim))
  tb = t.reshape(t.shape + (1,) * (v.ndim - 1))
  err = (x_t - tb * v) - x0
  weight = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(err), axis=axes),
                                             X0_WEIGHT_FLOOR))
  return jnp.mean(jnp.square(err), axis=axes) / weight


def nft_policy_loss(positive: jax.Array, negative: jax.Array, r: jax.Array, beta: float,
                    adv_clip: float, scale_by_adv_clip: bool) -> jax.Array:
  """mean(r·e+ + (1 − r)·e−) / β, times A_max when `scale_by_adv_clip` (upstream multiplies the
  policy loss — not the KL — by adv_clip_max: scripts/train_nft_sd3.py; spec §1)."""
  loss = jnp.mean(r * positive + (1 - r) * negative) / beta
  return loss * adv_clip if scale_by_adv_clip else loss


def schedule_timesteps(key: jax.Array, schedule: Any, k: int, b: int) -> jax.Array:
  """t [k, b]: per sample, the first k entries of its own shuffle of the sampler schedule
  t_0..t_{N−1} (the final 0 excluded) — DiffusionNFT's training timesteps (spec §1; upstream
  permutes `scheduler.timesteps` per sample and trains on int(N·timestep_fraction) of them)."""
  schedule = jnp.asarray(schedule, jnp.float32)
  n = schedule.shape[0]
  idx = jax.vmap(lambda kk: jax.random.permutation(kk, n)[:k])(jax.random.split(key, b))
  return schedule[idx].T


def training_timesteps(spec: NFTSpec, key: jax.Array, b: int) -> jax.Array:
  """t [k, b] of one minibatch: U(t_min, t_max) or the shuffled sampler schedule."""
  k = spec.timesteps_per_sample
  if spec.timesteps == 'sampler_schedule':
    return schedule_timesteps(key, spec.schedule, k, b)
  return jax.random.uniform(key, (k, b), minval=spec.t_min, maxval=spec.t_max)


def old_policy_decay(spec: NFTSpec, step: jax.Array) -> float | jax.Array:
  """η of θ_old ← η·θ_old + (1 − η)·θ after an iteration ending at optimizer step `step`.

  'constant': nft.old_decay. 'linear': DiffusionNFT's `return_decay` (spec §1;
  scripts/train_nft_sd3.py): 0 before `flat` steps, then min(rate·(step − flat), max) —
  upstream's decay_type 1 is (flat, rate, max) = (0, 0.001, 0.5), type 2 (75, 0.0075, 0.999).
  """
  if spec.old_decay_schedule == 'constant':
    return spec.old_decay      # a Python float: the update's arithmetic is as before the schedule
  s = jnp.asarray(step, jnp.float32) - spec.old_decay_flat
  return jnp.where(s < 0, 0.0, jnp.minimum(s * spec.old_decay_rate,
                                           spec.old_decay_max)).astype(jnp.float32)


def nft_loss(spec: NFTSpec, policy: Policy, params: Any, old_params: Any, frozen: dict,
             ref_adapter: Any, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
  """The DiffusionNFT loss on one minibatch {'x0' [B, ...], 'r' [B], 'cond' (batch B)}."""
  x0, r, cond = batch['x0'], batch['r'], batch['cond']
  k, b = spec.timesteps_per_sample, x0.shape[0]
  k_t, k_eps = jax.random.split(key)
  t = training_timesteps(spec, k_t, b)
  eps = jax.random.normal(k_eps, (k,) + x0.shape, jnp.float32)
  tb = t.reshape((k, b) + (1,) * (x0.ndim - 1))
  x_t = ((1 - tb) * x0[None] + tb * eps).reshape((k * b,) + x0.shape[1:])
  target = (eps - x0[None]).reshape(x_t.shape)
  timestep = t.reshape(-1) * NUM_TRAIN_TIMESTEPS
  cond_k = jax.tree.map(lambda c: jnp.tile(c, (k,) + (1,) * (c.ndim - 1)), cond)
  v = policy.student_velocity(params, frozen)(x_t, timestep, cond_k)
  v_old = jax.lax.stop_gradient(policy.student_velocity(old_params, frozen)(x_t, timestep,
                                                                           cond_k))
  v_pos, v_neg = implicit_policies(v, v_old, spec.beta)
  r_k = jnp.tile(r, k)
  if spec.weighting == 'adaptive_x0':
    x0_k, t_k = jnp.tile(x0, (k,) + (1,) * (x0.ndim - 1)), t.reshape(-1)
    pos = adaptive_x0_error(v_pos, x_t, t_k, x0_k)
    neg = adaptive_x0_error(v_neg, x_t, t_k, x0_k)
  else:
    pos, neg = velocity_error(v_pos, target), velocity_error(v_neg, target)
  policy_loss = nft_policy_loss(pos, neg, r_k, spec.beta, spec.adv_clip, spec.scale_by_adv_clip)
  kl = jnp.zeros(())
  if spec.kl_beta > 0:
    v_ref = jax.lax.stop_gradient(policy.velocity(frozen['base'], ref_adapter)(x_t, timestep,
                                                                               cond_k))
    kl = jnp.mean(jnp.square(v - v_ref))
  loss = policy_loss + spec.kl_beta * kl
  return loss, {'policy_loss': policy_loss, 'kl': kl, 'positive_loss': jnp.mean(pos),
                'negative_loss': jnp.mean(neg)}


def make_nft_update(spec: NFTSpec, policy: Policy, tx: optax.GradientTransformation):
  """(state, frozen, ref_adapter, batch, iteration) → (state, metrics); θ_old in state.extra."""

  def update(state: TrainState, frozen: dict, ref_adapter: Any, batch: dict,
             iteration: jax.Array):
    old_params = state.extra['old']
    b = batch['r'].shape[0]
    mb = b // spec.num_minibatches
    key = jax.random.fold_in(jax.random.fold_in(state.rng, iteration), 2)
    k_perm, k_noise = jax.random.split(key)
    perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(k_perm, e), b))(
        jnp.arange(spec.inner_epochs))
    idx = perms.reshape(spec.inner_epochs * spec.num_minibatches, mb)

    def inner(state, xs):
      i, rows = xs
      take = lambda r: {'x0': jnp.take(batch['x0'], r, axis=0), 'r': jnp.take(batch['r'], r),
                        'cond': jax.tree.map(lambda x: jnp.take(x, r, axis=0), batch['cond'])}
      # Micro-batch j > 0 draws its own noise; j = 0 (the only one by default) that of the
      # whole minibatch.
      key_of = lambda j: jax.lax.select(j == 0, jax.random.fold_in(k_noise, i),
                                        jax.random.fold_in(jax.random.fold_in(k_noise, i), j))
      with jax.named_scope('nft_loss'):
        loss, aux, grads = microbatched_value_and_grad(
            lambda p, rows_j, j: nft_loss(spec, policy, p, old_params, frozen, ref_adapter,
                                          take(rows_j), key_of(j)),
            state.params, rows, spec.num_microbatches)
      aux = jax.tree.map(jnp.mean, aux)
      with jax.named_scope('update'):
        state, update_metrics = state.apply_gradients(grads, tx, spec.ema)
      return state, {'loss': loss, **aux, **update_metrics}

    num = spec.inner_epochs * spec.num_minibatches
    state, per = jax.lax.scan(inner, state, (jnp.arange(num), idx))
    decay = old_policy_decay(spec, state.step)   # upstream: the step count after the updates
    new_old = jax.tree.map(lambda o, p: decay * o + (1 - decay) * p, old_params, state.params)
    metrics = {k: jnp.mean(v) for k, v in per.items()
               if k not in ('finite', 'param_norm', 'ema_decay')}
    metrics['old_decay'] = jnp.asarray(decay, jnp.float32)
    metrics['param_norm'] = per['param_norm'][-1]
    metrics['finite'] = jnp.all(per['finite']) & jnp.all(jnp.isfinite(per['loss']))
    return state.replace(extra={'old': new_old}), metrics

  return update


def extra_init(adapter: Any) -> dict:
  """NFT's state beyond the TrainState: θ_old, initialised to θ (or its shardings, given θ's)."""
  return {'old': adapter}


@dataclasses.dataclass
class NFT:
  """DiffusionNFT as an algorithm of the RL trainer: samples with θ_old, regresses on x0."""
  spec: NFTSpec
  setup: RLSetup
  update_fn: Any

  def sampler_params(self, state: TrainState) -> Any:
    return state.extra['old']     # samples come from θ_old (= θ when old_decay = 0)

  def update(self, state: TrainState, traj, cond, adv: np.ndarray, iteration: int):
    batch = {'x0': traj.latents[-1],
             'r': put_batch(self.setup.mesh, optimality(adv, self.spec.adv_clip)), 'cond': cond}
    return self.update_fn(state, self.setup.frozen, self.setup.zero_adapter, batch,
                          jnp.int32(iteration))


def build(config, setup: RLSetup, cond_example: dict) -> NFT:
  """The jitted, sharded DiffusionNFT update for `setup` (state donated)."""
  spec = nft_spec(config)
  mesh = setup.mesh
  batch_sh = {'x0': shd.batch_sharding(mesh, len(setup.latent_shape) + 1),
              'r': shd.batch_sharding(mesh, 1),
              'cond': jax.tree.map(lambda x: shd.batch_sharding(mesh, np.ndim(x)), cond_example)}
  return NFT(spec, setup, jit_update(setup, make_nft_update(spec, setup.policy, setup.tx),
                                     batch_sh))
