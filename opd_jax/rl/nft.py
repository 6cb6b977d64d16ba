"""DiffusionNFT (spec §7): RL on the forward process with any black-box sampler, CFG-free.

Each iteration:
  1. draw prompts of the active task(s) (joint or cascade, as in Flow-GRPO), G images each,
     sampled by the *old* policy θ_old with any sampler (config.rollout; the Euler ODE here);
  2. score the images on the host with each prompt's task reward, normalise per prompt group
     (`advantages.group_advantages`) and map to an optimality weight r = clip(½ + ½·A/A_max, 0, 1);
  3. re-noise the clean samples x_t = (1 − t)·x0 + t·ε at fresh t ~ U(t_min, t_max) and train
     on the flow-matching loss of an implicit positive and negative policy

        v+ = β·v_θ + (1 − β)·v_old,   v− = (1 + β)·v_old − β·v_θ     (v_old = v_{θ_old}, detached)
        L  = mean_b [ r_b·‖v+ − (ε − x0)‖² + (1 − r_b)·‖v− − (ε − x0)‖² ] / β
             (+ kl_beta·‖v_θ − v_ref‖², v_ref the base: LoRA disabled)

     — pushing v_θ toward high-reward samples and away from low-reward ones, with no likelihood,
     no ratio and no CFG (the teacher is queried at CFG 1.0). The 1/β keeps the gradient scale
     independent of β (∂L/∂v_θ = 2r(v+ − target) + …);
  4. θ_old ← η·θ_old + (1 − η)·θ (η = nft.old_decay; 0: sample with the current policy).

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
from opd_jax.rl.setup import RLSetup, jit_update, put_batch
from opd_jax.sampling.schedule import NUM_TRAIN_TIMESTEPS
from opd_jax.train.state import EMARule, TrainState


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


def nft_spec(config) -> NFTSpec:
  n, t = config.nft, config.train
  if not 0 < n.beta <= 1:
    raise ConfigError(f'config.nft.beta: must be in (0, 1], got {n.beta}')
  if not 0 <= n.t_min < n.t_max <= 1:
    raise ConfigError(f'config.nft.t_min: needs 0 <= t_min < t_max <= 1, got {n.t_min}, '
                      f'{n.t_max}')
  if config.rollout.cfg_scale != 1.0:
    raise ConfigError('config.rollout.cfg_scale: DiffusionNFT is CFG-free; set it to 1.0')
  return NFTSpec(float(n.beta), float(n.adv_clip), float(n.kl_beta), n.timesteps_per_sample,
                 float(n.t_min), float(n.t_max), t.num_minibatches, t.inner_epochs,
                 float(n.old_decay), EMARule.from_config(config.ema))


def optimality(advantages: np.ndarray, adv_clip: float) -> np.ndarray:
  """r = clip(½ + ½·A/A_max, 0, 1): 1 for clearly good samples, 0 for clearly bad ones."""
  return np.clip(0.5 + 0.5 * np.asarray(advantages) / adv_clip, 0.0, 1.0).astype(np.float32)


def nft_loss(spec: NFTSpec, policy: Policy, params: Any, old_params: Any, frozen: dict,
             ref_adapter: Any, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
  """The DiffusionNFT loss on one minibatch {'x0' [B, ...], 'r' [B], 'cond' (batch B)}."""
  x0, r, cond = batch['x0'], batch['r'], batch['cond']
  k, b = spec.timesteps_per_sample, x0.shape[0]
  k_t, k_eps = jax.random.split(key)
  t = jax.random.uniform(k_t, (k, b), minval=spec.t_min, maxval=spec.t_max)
  eps = jax.random.normal(k_eps, (k,) + x0.shape, jnp.float32)
  tb = t.reshape((k, b) + (1,) * (x0.ndim - 1))
  x_t = ((1 - tb) * x0[None] + tb * eps).reshape((k * b,) + x0.shape[1:])
  target = (eps - x0[None]).reshape(x_t.shape)
  timestep = t.reshape(-1) * NUM_TRAIN_TIMESTEPS
  cond_k = jax.tree.map(lambda c: jnp.tile(c, (k,) + (1,) * (c.ndim - 1)), cond)
  v = policy.student_velocity(params, frozen)(x_t, timestep, cond_k)
  v_old = jax.lax.stop_gradient(policy.student_velocity(old_params, frozen)(x_t, timestep,
                                                                           cond_k))
  v_pos = spec.beta * v + (1 - spec.beta) * v_old
  v_neg = (1 + spec.beta) * v_old - spec.beta * v
  mse = lambda a: jnp.mean(jnp.square(a - target), axis=tuple(range(1, a.ndim)))
  r_k = jnp.tile(r, k)
  pos, neg = mse(v_pos), mse(v_neg)
  policy_loss = jnp.mean(r_k * pos + (1 - r_k) * neg) / spec.beta
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
      mbatch = {'x0': jnp.take(batch['x0'], rows, axis=0), 'r': jnp.take(batch['r'], rows),
                'cond': jax.tree.map(lambda x: jnp.take(x, rows, axis=0), batch['cond'])}
      with jax.named_scope('nft_loss'):
        (loss, aux), grads = jax.value_and_grad(
            lambda p: nft_loss(spec, policy, p, old_params, frozen, ref_adapter, mbatch,
                               jax.random.fold_in(k_noise, i)), has_aux=True)(state.params)
      with jax.named_scope('update'):
        state, update_metrics = state.apply_gradients(grads, tx, spec.ema)
      return state, {'loss': loss, **aux, **update_metrics}

    num = spec.inner_epochs * spec.num_minibatches
    state, per = jax.lax.scan(inner, state, (jnp.arange(num), idx))
    new_old = jax.tree.map(lambda o, p: spec.old_decay * o + (1 - spec.old_decay) * p,
                           old_params, state.params)
    metrics = {k: jnp.mean(v) for k, v in per.items()
               if k not in ('finite', 'param_norm', 'ema_decay')}
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
