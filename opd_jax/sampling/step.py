"""One sampler step of a (guided) velocity field: the only place a transition is evaluated.

    v   = CFG velocity of the network at x_j, timestep 1000·t_j          (guidance.py)
    x_{j+1} = μ(x_j) + σ̄_j·ε_j,  (μ, σ̄) from the kernel                  (transitions.py)

`sampler_step` is what the rollout scans; `transition_mean` is the same step without noise, used
wherever a kernel's mean is needed at a state someone else visited — the teacher's mean at the
student's state (the per-step KL), the current policy's mean at a recorded state (PPO ratios,
Flow-GRPO), the reference's mean (KL to the base). Sharing one function keeps the rollout's
means and every objective's means the same computation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from opd_jax.sampling.guidance import Cond, VelocityFn, guided_velocity
from opd_jax.sampling.schedule import NUM_TRAIN_TIMESTEPS
from opd_jax.sampling.transitions import Transition, get_kernel


class KernelSpec(NamedTuple):
  """The sampler whose transitions are taken or matched (shared by student and teacher)."""
  kernel: str = 'ode'
  noise_level: float = 0.0


def is_deterministic(spec: KernelSpec) -> bool:
  return spec.kernel == 'ode' or spec.noise_level == 0.0


def sampler_step(velocity_fn: VelocityFn, x: jax.Array, t: jax.Array, t_next: jax.Array,
                 sigma_1: jax.Array, cond: Cond, uncond: Cond | None, cfg_scale: Any,
                 spec: KernelSpec, noise: jax.Array) -> Transition:
  """x_j → Transition(x_{j+1}, μ(x_j), σ̄_j) with the given step noise ε_j, float32."""
  timestep = jnp.full((x.shape[0],), t * NUM_TRAIN_TIMESTEPS, jnp.float32)
  v = guided_velocity(velocity_fn, x, timestep, cond, uncond, cfg_scale)
  return get_kernel(spec.kernel)(x, v, t, t_next, noise, noise_level=spec.noise_level,
                                 sigma_1=sigma_1)


def transition_mean(velocity_fn: VelocityFn, x: jax.Array, t: jax.Array, t_next: jax.Array,
                    sigma_1: jax.Array, cond: Cond, uncond: Cond | None, cfg_scale: Any,
                    spec: KernelSpec) -> tuple[jax.Array, jax.Array]:
  """μ(x_j) and σ̄_j of one transition of `velocity_fn` at the state x_j, float32."""
  tr = sampler_step(velocity_fn, x, t, t_next, sigma_1, cond, uncond, cfg_scale, spec,
                    jnp.zeros_like(x, jnp.float32))
  return tr.mean, tr.std
