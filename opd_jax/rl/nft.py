"""DiffusionNFT (spec §7): RL on the forward process with any black-box sampler, CFG-free.

Each iteration:
  1. draw prompts of the active task(s) (joint or cascade, as in Flow-GRPO), G images each,
     sampled by the *old* policy θ_old with any sampler (config.rollout; the Euler ODE here);
  2. score the images on the host with each prompt's task reward, normalise per prompt group
     (`rl_setup.group_advantages`) and map to an optimality weight r = clip(½ + ½·A/A_max, 0, 1);
  3. re-noise the clean samples x_t = (1 − t)·x0 + t·ε at fresh t ~ U(t_min, t_max) and train
     on the flow-matching loss of an implicit positive and negative policy

        v+ = β·v_θ + (1 − β)·v_old,   v− = (1 + β)·v_old − β·v_θ     (v_old = v_{θ_old}, detached)
        L  = mean_b [ r_b·‖v+ − (ε − x0)‖² + (1 − r_b)·‖v− − (ε − x0)‖² ] / β
             (+ kl_beta·‖v_θ − v_ref‖², v_ref the base: LoRA disabled)

     — pushing v_θ toward high-reward samples and away from low-reward ones, with no likelihood,
     no ratio and no CFG (the teacher is queried at CFG 1.0). The 1/β keeps the gradient scale
     independent of β (∂L/∂v_θ = 2r(v+ − target) + …);
  4. θ_old ← η·θ_old + (1 − η)·θ (η = nft.old_decay; 0: sample with the current policy).

The inner loop (epochs × minibatches) is one jitted call with donated state.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from opd_jax.models.policy import Policy
from opd_jax.parallel import sharding as shd
from opd_jax.parallel.mesh import make_mesh
from opd_jax.sampling.schedule import NUM_TRAIN_TIMESTEPS
from opd_jax.mini_world import artifacts
from opd_jax.rl import setup as rl_setup
from opd_jax.train.probe import Probe
from opd_jax.train.state import TrainState, ema_update


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
  ema_max_decay: float
  ema_every: int


def nft_spec(config) -> NFTSpec:
  n, t = config.nft, config.train
  if not 0 < n.beta <= 1:
    raise ValueError(f'config.nft.beta must be in (0, 1], got {n.beta}')
  if not 0 <= n.t_min < n.t_max <= 1:
    raise ValueError(f'config.nft needs 0 <= t_min < t_max <= 1, got {n.t_min}, {n.t_max}')
  if config.rollout.cfg_scale != 1.0:
    raise ValueError('DiffusionNFT is CFG-free: set rollout.cfg_scale = 1.0')
  return NFTSpec(float(n.beta), float(n.adv_clip), float(n.kl_beta), n.timesteps_per_sample,
                 float(n.t_min), float(n.t_max), t.num_minibatches, t.inner_epochs,
                 float(n.old_decay), config.ema.max_decay, config.ema.every)


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
  """(state, old, frozen, ref_adapter, batch, iteration) → (state, old, metrics)."""

  def update(state: TrainState, old_params: Any, frozen: dict, ref_adapter: Any, batch: dict,
             iteration: jax.Array):
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
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema, _ = ema_update(state.ema_params, params, step, spec.ema_max_decay, spec.ema_every)
      return (state.replace(step=step, params=params, opt_state=opt_state, ema_params=ema),
              {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux})

    num = spec.inner_epochs * spec.num_minibatches
    state, per = jax.lax.scan(inner, state, (jnp.arange(num), idx))
    new_old = jax.tree.map(lambda o, p: spec.old_decay * o + (1 - spec.old_decay) * p,
                           old_params, state.params)
    return state, new_old, {k: jnp.mean(v) for k, v in per.items()}

  return update


def run_nft(config: ml_collections.ConfigDict, workdir: str,
            base: str | artifacts.BaseModel, *, mesh=None,
            probe: Probe | None = None) -> dict:
  """Trains a DiffusionNFT LoRA teacher on config.data.tasks; saves it under workdir/teacher.

  Args:
    config: a `configs/mini/nft.py` (or multitask_rl / cascade_rl :nft) config.
    workdir: output directory (metrics.jsonl, tensorboard/, teacher/).
    base: the pretrained base artifact (or its directory).
    mesh: optional device mesh (default: from config.mesh.shape).
    probe: optional evaluation during training, off the clock (`opd_jax.train.probe`).

  Returns:
    {'teacher_dir', 'wall_s', 'steps', 'metrics', 'reward_history'} as `run_grpo`.
  """
  start = time.time()
  mesh = mesh or make_mesh(config.mesh.shape.to_dict())
  base = artifacts.load_base(base) if isinstance(base, str) else base
  rl_setup.check_batch(config, mesh)
  spec = nft_spec(config)
  setup = rl_setup.build_rl(config, mesh, base)
  prompts = rl_setup.load_rl_prompts(config, base, setup.nets)
  rep = shd.replicated(mesh)
  adapter_sh = setup.state_shardings.params
  batch_sh = {'x0': shd.batch_sharding(mesh, len(setup.latent_shape) + 1),
              'r': shd.batch_sharding(mesh, 1),
              'cond': jax.tree.map(lambda x: shd.batch_sharding(mesh, np.ndim(x)),
                                   prompts.sets[0].cond)}
  update_fn = jax.jit(make_nft_update(spec, setup.policy, setup.tx),
                      in_shardings=(setup.state_shardings, adapter_sh, setup.frozen_shardings,
                                    adapter_sh, batch_sh, rep),
                      out_shardings=(setup.state_shardings, adapter_sh, rep),
                      donate_argnums=(0, 1))

  def update(carry, traj, cond, adv, it):
    state, old = carry
    batch = {'x0': traj.latents[-1],
             'r': rl_setup.put_batch(mesh, optimality(adv, spec.adv_clip)), 'cond': cond}
    state, old, metrics = update_fn(state, old, setup.frozen, setup.zero_adapter, batch,
                                    jnp.int32(it))
    return (state, old), metrics

  state = setup.init_state()
  old = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=adapter_sh)(state.params)
  # Samples come from the old policy θ_old (a soft copy of θ; equal to θ when old_decay = 0).
  (state, _), history, metrics = rl_setup.run_iterations(
      config, workdir, setup, prompts, name='nft', carry=(state, old),
      sampler_params=lambda c: c[1], rng=jax.device_get(state.rng), update=update, start=start,
      eval_params=lambda c: rl_setup.saved_params(c[0], config), probe=probe)
  teacher_dir = rl_setup.save_teacher(os.path.join(workdir, 'teacher'), state, config, 'nft',
                                      config.rollout.cfg_scale)
  return {'teacher_dir': teacher_dir, 'wall_s': time.time() - start,
          'steps': config.train.num_steps, 'metrics': metrics, 'reward_history': history}
