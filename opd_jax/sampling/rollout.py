"""Sampler rollout as a `lax.scan` over steps, recording the whole trajectory (spec §2).

The trajectory is a pytree with static shapes, time-major so objectives can vmap over steps:

  latents    [N+1, B, H, W, C]  x_0 (pure noise at t = 1) … x_N
  sigmas     [N+1]              t_0 = 1 > … > t_N = 0
  means      [N, B, H, W, C]    μ(x_j) of each transition, float32
  stds       [N]                σ̄_j
  noise      [N, B, H, W, C]    the ε_j that produced x_{j+1} = μ + σ̄_j·ε_j
  log_probs  [N, B]             log p(x_{j+1} | x_j) (0 for deterministic steps)

Randomness is per sample: sample b draws its initial noise and every step's ε from its own key,
so a trajectory does not depend on the batch size, its position in the batch or the device count.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.sampling.guidance import Cond, VelocityFn
from opd_jax.sampling.step import KernelSpec, sampler_step
from opd_jax.sampling.transitions import gaussian_log_prob, get_kernel


class Trajectory(NamedTuple):
  latents: jax.Array
  sigmas: jax.Array
  means: jax.Array
  stds: jax.Array
  noise: jax.Array
  log_probs: jax.Array


def sample_keys(rng: jax.Array, step: jax.Array, stream: jax.Array, batch: int,
                start: jax.Array | int = 0) -> jax.Array:
  """Per-sample keys [B, 2] from (step, stream, sample index): independent of the device count.

  `stream` separates independent draws of one step (e.g. the tasks of an OPD round); `start`
  is the first sample's index, so a batch drawn in chunks gets the keys of the whole batch.
  """
  base = jax.random.fold_in(jax.random.fold_in(rng, step), stream)
  return jax.vmap(lambda b: jax.random.fold_in(base, b))(start + jnp.arange(batch))


def sample_noise(keys: jax.Array, latent_shape: Sequence[int], num_steps: int):
  """Per-sample initial noise [B, *shape] and step noise [N, B, *shape] from keys [B]."""
  def one(key):
    k_init, k_steps = jax.random.split(key)
    x0 = jax.random.normal(k_init, tuple(latent_shape), jnp.float32)
    eps = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(k_steps, j),
                                               tuple(latent_shape), jnp.float32))(
                                                   jnp.arange(num_steps))
    return x0, eps
  x0, eps = jax.vmap(one)(keys)
  return x0, jnp.swapaxes(eps, 0, 1)


def rollout(velocity_fn: VelocityFn, cond: Cond, uncond: Cond | None, keys: jax.Array, *,
            sigmas: np.ndarray, latent_shape: Sequence[int], kernel: str = 'ode',
            noise_level: float = 0.0, cfg_scale: Any = 1.0, logprob_reduction: str = 'mean',
            x_init: jax.Array | None = None) -> Trajectory:
  """Runs the sampler from t = 1 to t = 0 and records the trajectory.

  Args:
    velocity_fn: (x [B,H,W,C], timestep [B] = 1000·t, cond) → v; parameters already bound.
    cond, uncond: conditioning dicts with batch B; `uncond=None` disables CFG.
    keys: per-sample PRNG keys [B].
    sigmas: the static schedule [N+1] (see `schedule.flow_match_sigmas`).
    latent_shape: (H, W, C).
    kernel: a name in `transitions.KERNELS`.
    noise_level: the SDE noise scale a (ignored by 'ode').
    cfg_scale: guidance weight w (may be traced).
    logprob_reduction: 'mean' or 'sum' over latent elements.
    x_init: optional initial noise [B,H,W,C] replacing the key-derived one.
  """
  get_kernel(kernel)   # an unknown name fails here, before tracing
  spec = KernelSpec(kernel, noise_level)
  num_steps = len(sigmas) - 1
  x0, eps = sample_noise(keys, latent_shape, num_steps)
  if x_init is not None:
    x0 = x_init.astype(jnp.float32)
  sig = jnp.asarray(sigmas, jnp.float32)

  def body(x, inputs):
    t, t_next, noise = inputs
    tr = sampler_step(velocity_fn, x, t, t_next, sig[1], cond, uncond, cfg_scale, spec, noise)
    logp = gaussian_log_prob(tr.next, tr.mean, tr.std, logprob_reduction)
    return tr.next, (tr.next, tr.mean, tr.std, logp)

  _, (xs, means, stds, logps) = jax.lax.scan(body, x0, (sig[:-1], sig[1:], eps))
  latents = jnp.concatenate([x0[None], xs], axis=0)
  return Trajectory(latents, sig, means, stds, eps, logps)
