"""The RL trainers' sampler: rollouts of the current (or old) policy and their decoded images.

`mixed_rollout` runs `rollout.kernel` on the first `rollout.sde_steps` transitions and the Euler
ODE after them; `jit_sampler` jits it and the base's decoder (the mini world's pixels, an SD3
VAE) with explicit shardings (batch split over the mesh). Keys come from (rng, iteration, sample
index), so a sample depends neither on the device count nor on how many chunks
(`data.sample_batches`) an iteration is sampled in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.errors import ConfigError
from opd_jax.parallel import sharding as shd
from opd_jax.sampling.guidance import broadcast_uncond
from opd_jax.sampling.rollout import Trajectory, rollout, sample_keys


def uncond_for(frozen: dict, batch: int, cfg_scale: float):
  """The CFG negative broadcast to the batch, or None for the CFG-free w = 1."""
  return None if cfg_scale == 1.0 else broadcast_uncond(frozen['negative'], batch)


def sde_steps(rollout_cfg) -> int:
  """How many leading transitions use rollout.kernel (the rest are Euler ODE steps)."""
  n = rollout_cfg.num_steps
  k = rollout_cfg.sde_steps or n
  if not 1 <= k <= n:
    raise ConfigError(f'config.rollout.sde_steps: {rollout_cfg.sde_steps} not in [0, {n}]')
  return k


def mixed_rollout(velocity_fn, cond, uncond, keys, *, sigmas: np.ndarray, num_sde: int,
                  latent_shape, kernel: str, noise_level: float, cfg_scale: float,
                  logprob_reduction: str) -> Trajectory:
  """`rollout` with `kernel` on transitions [0, num_sde) and the Euler ODE after them.

  An SDE window at the start of the chain (as in Flow-GRPO-Fast / MixGRPO) keeps exploration
  where the image's layout is decided while the last steps land deterministically: in pixel
  space the SDE's last-step noise would otherwise stay visible in the image (there is no VAE
  decoder to smooth it) and dominate smoothness-sensitive rewards. Both parts are the shared
  `rollout`; the ODE part starts from the SDE part's last state.
  """
  n = len(sigmas) - 1
  common_args = dict(latent_shape=latent_shape, cfg_scale=cfg_scale,
                     logprob_reduction=logprob_reduction)
  head = rollout(velocity_fn, cond, uncond, keys, sigmas=sigmas[:num_sde + 1], kernel=kernel,
                 noise_level=noise_level, **common_args)
  if num_sde == n:
    return head._replace(sigmas=jnp.asarray(sigmas, jnp.float32))
  tail = rollout(velocity_fn, cond, uncond, keys, sigmas=sigmas[num_sde:], kernel='ode',
                 x_init=head.latents[-1], **common_args)
  cat = lambda a, b: jnp.concatenate([a, b], axis=0)
  return Trajectory(latents=cat(head.latents, tail.latents[1:]),
                    sigmas=jnp.asarray(sigmas, jnp.float32), means=cat(head.means, tail.means),
                    stds=cat(head.stds, tail.stds), noise=cat(head.noise, tail.noise),
                    log_probs=cat(head.log_probs, tail.log_probs))


def make_sample_fn(setup, rollout_cfg):
  """Un-jitted (adapter, frozen, cond, rng, iteration, start) → (Trajectory, images [B, H, W, 3]).

  The sampler is config.rollout's kernel / noise level / CFG on its first `sde_steps`
  transitions and the Euler ODE after them; per-sample keys come from (rng, iteration, sample
  index start + b), so a sample does not depend on the device count or the chunking.
  """
  policy, r = setup.policy, rollout_cfg
  cfg = float(r.cfg_scale)
  num_sde = sde_steps(r)

  def sample(adapter, frozen, cond, rng, iteration, start):
    batch = jax.tree.leaves(cond)[0].shape[0]
    keys = sample_keys(rng, iteration, jnp.int32(0), batch, start)
    with jax.named_scope('rollout'):
      traj = mixed_rollout(policy.student_velocity(adapter, frozen), cond,
                           uncond_for(frozen, batch, cfg), keys, sigmas=setup.sigmas,
                           num_sde=num_sde, latent_shape=setup.latent_shape, kernel=r.kernel,
                           noise_level=r.noise_level, cfg_scale=cfg,
                           logprob_reduction=r.logprob_reduction)
    with jax.named_scope('decode'):
      images = setup.decode(frozen['decoder'], traj.latents[-1])
    return traj, images

  return sample


def trajectory_shardings(setup) -> Trajectory:
  """Per-sample fields split over the batch axis (axis 1: time-major), schedules replicated."""
  rep = shd.replicated(setup.mesh)
  nd = len(setup.latent_shape)
  on_b = lambda n: shd.batch_sharding(setup.mesh, n, 1)
  return Trajectory(latents=on_b(nd + 2), sigmas=rep, means=on_b(nd + 2), stds=rep,
                    noise=on_b(nd + 2), log_probs=on_b(2))


def jit_sampler(setup, rollout_cfg, cond_example: dict):
  """`make_sample_fn` jitted with explicit shardings (batch split over the mesh)."""
  mesh = setup.mesh
  rep = shd.replicated(mesh)
  traj_sh = trajectory_shardings(setup)
  cond_sh = jax.tree.map(lambda x: shd.batch_sharding(mesh, np.ndim(x)), cond_example)
  return jax.jit(make_sample_fn(setup, rollout_cfg),
                 in_shardings=(setup.state_shardings.params, setup.frozen_shardings, cond_sh,
                               rep, rep, rep),
                 out_shardings=(traj_sh, shd.batch_sharding(mesh, 4)))


def jit_concat(setup, cond_example: dict):
  """(Trajectories, conditionings) of an iteration's chunks → one batch each (the trajectory's
  per-sample fields on axis 1, the conditioning on axis 0), split over the mesh as the sampler's
  inputs and outputs are."""
  def concat(trajs, conds):
    cat = lambda *xs: jnp.concatenate(xs, axis=1)
    first = trajs[0]
    traj = Trajectory(latents=cat(*[t.latents for t in trajs]), sigmas=first.sigmas,
                      means=cat(*[t.means for t in trajs]), stds=first.stds,
                      noise=cat(*[t.noise for t in trajs]),
                      log_probs=cat(*[t.log_probs for t in trajs]))
    return traj, jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *conds)
  cond_sh = jax.tree.map(lambda x: shd.batch_sharding(setup.mesh, np.ndim(x)), cond_example)
  return jax.jit(concat, out_shardings=(trajectory_shardings(setup), cond_sh))
