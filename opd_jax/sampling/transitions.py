"""One-step transition kernels of the flow-matching sampler, viewed as a Markov chain (spec §2).

Each kernel maps (x_j, v_j) at noise level t_j to the Gaussian p(x_{j+1} | x_j) = N(mean, std² I)
and a sample from it; all share the signature

    kernel(x, v, t, t_next, noise, *, noise_level, sigma_1) -> Transition(next, mean, std)

with x, v, noise [B, ...] and t, t_next, std scalars (one noise level per step, shared by the
batch). Arithmetic is float32 whatever dtype the network ran in. `noise_level` is the global
noise scale `a`; `sigma_1` is the schedule's second entry, used by the Flow-GRPO kernel at t = 1.

Kernels:
  ode         Euler step μ = x + Δt·v, std 0.
  flow_grpo   Eq. 5–7: σ_t = a·√(t/(1−t)), μ = (1 + σ_t²Δt/(2t))·x + (1 + σ_t²(1−t)/(2t))·v·Δt,
              std = σ_t·√(−Δt); at t = 1 the denominator 1 − t becomes 1 − sigma_1.
  cps         Coefficients-preserving sampling: std = t_next·sin(aπ/2),
              μ = x̂0·(1 − t_next) + ε̂·√(t_next² − std²) with x̂0 = x − t·v, ε̂ = x + (1 − t)·v.
  dance_grpo  DanceGRPO's SDE: μ = x + Δt·v − ½a²·score·Δt with score = −(x − (1 − t)·x̂0)/t²,
              std = a·√(−Δt).
All reduce to the Euler step at a = 0.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Transition(NamedTuple):
  next: jax.Array   # x_{j+1} = mean + std·noise
  mean: jax.Array   # μ(x_j), float32
  std: jax.Array    # σ̄_j, a float32 scalar


def _f32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


def _finish(mean, std, noise):
  return Transition(mean + std * noise.astype(jnp.float32), mean, std)


def euler_ode(x, v, t, t_next, noise, *, noise_level=0.0, sigma_1=None) -> Transition:
  del noise_level, sigma_1
  x, v, t, t_next = _f32(x, v, t, t_next)
  return _finish(x + (t_next - t) * v, jnp.zeros((), jnp.float32), noise)


def flow_grpo_sde(x, v, t, t_next, noise, *, noise_level, sigma_1) -> Transition:
  x, v, t, t_next, sigma_1 = _f32(x, v, t, t_next, sigma_1)
  dt = t_next - t
  # The reference avoids 1/(1 − t) = ∞ at t = 1 by using the next schedule entry instead.
  sigma_t = noise_level * jnp.sqrt(t / (1 - jnp.where(t == 1.0, sigma_1, t)))
  mean = (x * (1 + sigma_t**2 / (2 * t) * dt)
          + v * (1 + sigma_t**2 * (1 - t) / (2 * t)) * dt)
  return _finish(mean, sigma_t * jnp.sqrt(-dt), noise)


def cps_sde(x, v, t, t_next, noise, *, noise_level, sigma_1=None) -> Transition:
  del sigma_1
  x, v, t, t_next = _f32(x, v, t, t_next)
  std = t_next * jnp.sin(noise_level * jnp.pi / 2)
  x0_hat, eps_hat = x - t * v, x + (1 - t) * v
  mean = x0_hat * (1 - t_next) + eps_hat * jnp.sqrt(jnp.maximum(t_next**2 - std**2, 0.0))
  return _finish(mean, std, noise)


def dance_grpo_sde(x, v, t, t_next, noise, *, noise_level, sigma_1=None) -> Transition:
  del sigma_1
  x, v, t, t_next = _f32(x, v, t, t_next)
  dt = t_next - t
  x0_hat = x - t * v
  score = -(x - x0_hat * (1 - t)) / t**2
  mean = x + dt * v - 0.5 * noise_level**2 * score * dt
  return _finish(mean, noise_level * jnp.sqrt(-dt), noise)


KERNELS: dict[str, Callable[..., Transition]] = {
    'ode': euler_ode,
    'flow_grpo': flow_grpo_sde,
    'cps': cps_sde,
    'dance_grpo': dance_grpo_sde,
}


def get_kernel(name: str) -> Callable[..., Transition]:
  if name not in KERNELS:
    raise ValueError(f'unknown sampler kernel {name!r}; choose one of {sorted(KERNELS)}')
  return KERNELS[name]


def reduce_latent(x: jax.Array, reduction: str) -> jax.Array:
  """Sums or averages over every axis but the leading (batch) one."""
  axes = tuple(range(1, x.ndim))
  if reduction == 'sum':
    return jnp.sum(x, axis=axes)
  if reduction == 'mean':
    return jnp.mean(x, axis=axes)
  raise ValueError(f'unknown latent reduction {reduction!r}; expected sum or mean')


def gaussian_log_prob(x_next: jax.Array, mean: jax.Array, std: jax.Array,
                      reduction: str = 'mean') -> jax.Array:
  """log N(x_next; mean, std² I) per sample [B], per-element terms summed or averaged.

  A deterministic step (std = 0) has no density; it returns 0 so ODE trajectories keep a
  well-defined (unused) log-prob field without NaNs.
  """
  x_next, mean, std = _f32(x_next, mean, std)
  safe = jnp.where(std > 0, std, 1.0)
  elem = (-(x_next - mean)**2 / (2 * safe**2) - jnp.log(safe) - 0.5 * np.log(2 * np.pi))
  return jnp.where(std > 0, reduce_latent(elem, reduction), 0.0)
