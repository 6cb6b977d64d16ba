"""Flow-GRPO (spec §2, §7): RL of a LoRA adapter on SDE rollouts, one or several tasks.

Each iteration:
  1. draw prompts of the active task(s) (`rl_setup.active_tasks`: joint multi-task or cascade),
     each repeated G times (a group), and roll the current policy out with the Flow-GRPO SDE
     kernel at noise level a and CFG w, recording every step's log-prob — on the first
     rollout.sde_steps transitions, with Euler ODE steps after them (`rl_setup.mixed_rollout`;
     in pixel space last-step SDE noise would stay in the image);
  2. score the final images on the host with each prompt's own task reward and normalise
     advantages per prompt group (std per group, or per task: `rl_setup.group_advantages`);
  3. `inner_epochs` passes over the batch in `num_minibatches` shuffled minibatches, one AdamW
     step each, on the PPO clipped surrogate over the trained transitions j:

        ρ_j = exp(log π_θ(x_{j+1}|x_j) − log π_old(x_{j+1}|x_j))
        L   = mean_{j,b} max(−A_b·ρ_j, −A_b·clip(ρ_j, 1 − ε, 1 + ε)) + β·mean_{j,b} KL_j

     with KL_j the closed-form Gaussian KL to the reference (the base: LoRA disabled), the same
     mean-matching form as the OPD objective (`per_step_kl.kernel_mean` / `gaussian_kl`).
     log π_θ is recomputed at the recorded states with the same kernel and CFG, so on the first
     minibatch (θ = θ_old) the ratio is exactly 1 up to float rounding.

The whole inner loop (epochs × minibatches) is one jitted call with donated state.
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
from opd_jax.objectives.per_step_kl import KernelSpec, gaussian_kl, kernel_mean
from opd_jax.parallel import sharding as shd
from opd_jax.parallel.mesh import make_mesh
from opd_jax.sampling.transitions import gaussian_log_prob
from opd_jax.mini_world import artifacts
from opd_jax.rl import setup as rl_setup
from opd_jax.train.probe import Probe
from opd_jax.train.state import TrainState, ema_update


@dataclasses.dataclass(frozen=True)
class GRPOSpec:
  """Static settings of the update (closed over by jit; hashable)."""
  sigmas: tuple[float, ...]
  kernel: KernelSpec
  cfg_scale: float
  num_train_steps: int          # T: transitions 0..T−1 may be trained
  train_timesteps: int          # k <= T transitions drawn per minibatch (T: all)
  clip_range: float
  adv_clip: float
  kl_beta: float
  logprob_reduction: str
  kl_reduction: str
  kl_normaliser: str
  num_minibatches: int
  inner_epochs: int
  ema_max_decay: float
  ema_every: int


def grpo_spec(config, sigmas: np.ndarray) -> GRPOSpec:
  r, g, t = config.rollout, config.grpo, config.train
  # Transitions 0..T−1 of the stochastic window are trainable (Flow-GRPO: 9 of 10).
  num_train = int(rl_setup.sde_steps(r) * g.timestep_fraction)
  if num_train < 1:
    raise ValueError('config.grpo.timestep_fraction trains no transition')
  k = g.train_timesteps or num_train
  if not 1 <= k <= num_train:
    raise ValueError(f'config.grpo.train_timesteps {g.train_timesteps} not in [0, {num_train}]')
  if r.kernel == 'ode' or r.noise_level <= 0:
    raise ValueError('Flow-GRPO needs a stochastic sampler: set rollout.kernel to an SDE kernel '
                     'and rollout.noise_level > 0')
  return GRPOSpec(tuple(float(s) for s in sigmas), KernelSpec(r.kernel, float(r.noise_level)),
                  float(r.cfg_scale), num_train, k, float(g.clip_range), float(g.adv_clip),
                  float(g.kl_beta), r.logprob_reduction, g.kl_reduction, g.kl_normaliser,
                  t.num_minibatches, t.inner_epochs, config.ema.max_decay, config.ema.every)


def grpo_terms(spec: GRPOSpec, policy: Policy, params: Any, frozen: dict, ref_adapter: Any,
               batch: dict, step_idx: jax.Array) -> dict[str, jax.Array]:
  """Per-transition surrogate terms at the recorded states, each [k, B].

  Args:
    params: the adapter being trained.
    frozen: {'base', 'negative'}.
    ref_adapter: the zero adapter (reference = base, LoRA disabled).
    batch: {'latents' [N+1, B, ...], 'log_probs' [N, B] (the rollout's), 'advantages' [B],
      'cond' (batch B)}.
    step_idx: int [k] indices of the trained transitions.

  Returns:
    {'pg': clipped surrogate, 'kl': KL to the reference (0 when kl_beta = 0), 'ratio',
     'log_ratio'}.
  """
  sig = jnp.asarray(spec.sigmas, jnp.float32)
  latents = jax.lax.stop_gradient(batch['latents'])
  cond = batch['cond']
  b = latents.shape[1]
  uncond = rl_setup.uncond_for(frozen, b, spec.cfg_scale)
  student = policy.student_velocity(params, frozen)
  reference = policy.velocity(frozen['base'], ref_adapter)
  adv = jnp.clip(batch['advantages'], -spec.adv_clip, spec.adv_clip)

  def one(j):
    x, t, t_next = latents[j], sig[j], sig[j + 1]
    mean, std = kernel_mean(student, x, t, t_next, sig[1], cond, uncond, spec.cfg_scale,
                            spec.kernel)
    logp = gaussian_log_prob(latents[j + 1], mean, std, spec.logprob_reduction)
    log_ratio = logp - batch['log_probs'][j]
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - spec.clip_range, 1.0 + spec.clip_range)
    pg = jnp.maximum(-adv * ratio, -adv * clipped)
    if spec.kl_beta > 0:
      mean_ref, _ = kernel_mean(reference, x, t, t_next, sig[1], cond, uncond, spec.cfg_scale,
                                spec.kernel)
      kl = gaussian_kl(mean, jax.lax.stop_gradient(mean_ref), std, t_next - t,
                       deterministic=False, reduction=spec.kl_reduction,
                       normaliser=spec.kl_normaliser)
    else:
      kl = jnp.zeros_like(pg)
    return {'pg': pg, 'kl': kl, 'ratio': ratio, 'log_ratio': log_ratio}

  return jax.vmap(one)(step_idx)


def grpo_loss(spec: GRPOSpec, policy: Policy, params: Any, frozen: dict, ref_adapter: Any,
              batch: dict, step_idx: jax.Array) -> tuple[jax.Array, dict]:
  """mean(pg) + β·mean(KL) over the trained transitions and the minibatch."""
  terms = grpo_terms(spec, policy, params, frozen, ref_adapter, batch, step_idx)
  loss = jnp.mean(terms['pg']) + spec.kl_beta * jnp.mean(terms['kl'])
  return loss, terms


def _take(batch: dict, idx: jax.Array) -> dict:
  """Minibatch rows `idx` of a batch whose latents / log-probs are time-major."""
  return {'latents': jnp.take(batch['latents'], idx, axis=1),
          'log_probs': jnp.take(batch['log_probs'], idx, axis=1),
          'advantages': jnp.take(batch['advantages'], idx, axis=0),
          'cond': jax.tree.map(lambda x: jnp.take(x, idx, axis=0), batch['cond'])}


def make_grpo_update(spec: GRPOSpec, policy: Policy, tx: optax.GradientTransformation):
  """(state, frozen, ref_adapter, batch, iteration) → (state, metrics): all inner updates."""

  def update(state: TrainState, frozen: dict, ref_adapter: Any, batch: dict,
             iteration: jax.Array):
    b = batch['advantages'].shape[0]
    mb = b // spec.num_minibatches
    key = jax.random.fold_in(jax.random.fold_in(state.rng, iteration), 1)
    k_perm, k_time = jax.random.split(key)
    perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(k_perm, e), b))(
        jnp.arange(spec.inner_epochs))
    # The first minibatch of the first epoch keeps the rollout's order (its ratio is 1).
    perms = perms.at[0].set(jnp.arange(b))
    idx = perms.reshape(spec.inner_epochs * spec.num_minibatches, mb)

    def inner(state, xs):
      i, rows = xs
      times = jax.random.permutation(jax.random.fold_in(k_time, i), spec.num_train_steps)
      step_idx = jnp.sort(times[:spec.train_timesteps])
      mbatch = _take(batch, rows)
      with jax.named_scope('grpo_loss'):
        (loss, terms), grads = jax.value_and_grad(
            lambda p: grpo_loss(spec, policy, p, frozen, ref_adapter, mbatch, step_idx),
            has_aux=True)(state.params)
      with jax.named_scope('update'):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema, _ = ema_update(state.ema_params, params, step, spec.ema_max_decay, spec.ema_every)
      ratio = terms['ratio']
      out = {'loss': loss, 'policy_loss': jnp.mean(terms['pg']), 'kl': jnp.mean(terms['kl']),
             'clipfrac': jnp.mean((jnp.abs(ratio - 1.0) > spec.clip_range).astype(jnp.float32)),
             'approx_kl': 0.5 * jnp.mean(jnp.square(terms['log_ratio'])),
             'ratio_max_dev': jnp.max(jnp.abs(ratio - 1.0)),
             'grad_norm': optax.tree.norm(grads)}
      return state.replace(step=step, params=params, opt_state=opt_state, ema_params=ema), out

    num = spec.inner_epochs * spec.num_minibatches
    state, per = jax.lax.scan(inner, state, (jnp.arange(num), idx))
    metrics = {k: jnp.mean(v) for k, v in per.items() if k != 'ratio_max_dev'}
    metrics['ratio_max_dev'] = jnp.max(per['ratio_max_dev'])
    # θ = θ_old on the first minibatch: this measures how exactly log-probs are recomputed.
    metrics['first_ratio_max_dev'] = per['ratio_max_dev'][0]
    return state, metrics

  return update


def run_grpo(config: ml_collections.ConfigDict, workdir: str,
             base: str | artifacts.BaseModel, *, mesh=None,
             probe: Probe | None = None) -> dict:
  """Trains a Flow-GRPO LoRA teacher on config.data.tasks and saves it under workdir/teacher.

  Args:
    config: a `configs/mini/grpo.py` (or multitask_rl / cascade_rl) config.
    workdir: output directory (metrics.jsonl, tensorboard/, teacher/).
    base: the pretrained base artifact (or its directory).
    mesh: optional device mesh (default: from config.mesh.shape).
    probe: optional evaluation during training, off the clock (`opd_jax.train.probe`).

  Returns:
    {'teacher_dir', 'wall_s', 'steps', 'metrics' (last iteration), 'reward_history'
     (per-iteration mean reward of each task, NaN where the task was inactive)}.
  """
  start = time.time()
  mesh = mesh or make_mesh(config.mesh.shape.to_dict())
  base = artifacts.load_base(base) if isinstance(base, str) else base
  rl_setup.check_batch(config, mesh)
  setup = rl_setup.build_rl(config, mesh, base)
  prompts = rl_setup.load_rl_prompts(config, base, setup.nets)
  spec = grpo_spec(config, setup.sigmas)
  rep = shd.replicated(mesh)
  nd = len(setup.latent_shape)
  batch_sh = {'latents': shd.batch_sharding(mesh, nd + 2, 1),
              'log_probs': shd.batch_sharding(mesh, 2, 1),
              'advantages': shd.batch_sharding(mesh, 1),
              'cond': jax.tree.map(lambda x: shd.batch_sharding(mesh, np.ndim(x)),
                                   prompts.sets[0].cond)}
  update_fn = jax.jit(make_grpo_update(spec, setup.policy, setup.tx),
                      in_shardings=(setup.state_shardings, setup.frozen_shardings,
                                    setup.state_shardings.params, batch_sh, rep),
                      out_shardings=(setup.state_shardings, rep), donate_argnums=(0,))

  def update(state, traj, cond, adv, it):
    batch = {'latents': traj.latents, 'log_probs': traj.log_probs,
             'advantages': rl_setup.put_batch(mesh, adv), 'cond': cond}
    return update_fn(state, setup.frozen, setup.zero_adapter, batch, jnp.int32(it))

  state = setup.init_state()
  # Rollouts use the current policy (θ_old = θ at sampling time).
  state, history, metrics = rl_setup.run_iterations(
      config, workdir, setup, prompts, name='grpo', carry=state,
      sampler_params=lambda s: s.params, rng=jax.device_get(state.rng), update=update,
      start=start,
      eval_params=lambda s: rl_setup.saved_params(s, config), probe=probe)
  teacher_dir = rl_setup.save_teacher(os.path.join(workdir, 'teacher'), state, config, 'grpo',
                                      config.rollout.cfg_scale)
  return {'teacher_dir': teacher_dir, 'wall_s': time.time() - start,
          'steps': config.train.num_steps, 'metrics': metrics, 'reward_history': history}
