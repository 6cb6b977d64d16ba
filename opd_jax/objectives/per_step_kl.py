"""The closed-form per-step KL of DiffusionOPD (spec §3, Eq. 4, 10–12, 15).

Student and teacher kernels are Gaussians with the same covariance σ̄_j² I, so

    KL(p_S(·|x_j) ‖ p_T(·|x_j)) = ‖μ_S(x_j) − μ_T(x_j)‖² / (2 σ̄_j²)            (Eq. 10–11)

and for the deterministic Euler sampler the objective is the mean matching ½‖μ_S − μ_T‖²
(Eq. 12). States x_j are the student's own rollout (constants) and the teacher mean is detached,
so the gradient is purely pathwise: Σ_j ((μ_S − μ_T)/σ̄_j²)·∇θ μ_S (Eq. 15).

Conventions the paper and the released recipe disagree on are explicit arguments:
  reduction   'sum' over latent elements (paper, ‖·‖²) or 'mean' (recipe);
  normaliser  'sigma2_dt' (paper): the kernel variance σ̄_j² = σ_t²·|Δt_j|;
              'sigma2' (released recipe, Flow-GRPO's KL): σ_t² = σ̄_j²/|Δt_j|.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from opd_jax.sampling.guidance import Cond, VelocityFn
from opd_jax.sampling.step import KernelSpec, is_deterministic, transition_mean
from opd_jax.sampling.transitions import reduce_latent

KL_NORMALISERS = ('sigma2_dt', 'sigma2')
KL_REDUCTIONS = ('sum', 'mean')


def gaussian_kl(mu_s: jax.Array, mu_t: jax.Array, std: jax.Array, dt: jax.Array, *,
                deterministic: bool, reduction: str = 'mean',
                normaliser: str = 'sigma2_dt') -> jax.Array:
  """Per-sample KL [B] between N(μ_S, σ̄²I) and N(μ_T, σ̄²I) (Eq. 11), or ½‖μ_S − μ_T‖² (Eq. 12)."""
  sq = reduce_latent(jnp.square(mu_s.astype(jnp.float32) - mu_t.astype(jnp.float32)), reduction)
  if deterministic:
    return 0.5 * sq
  var = jnp.square(std)
  if normaliser == 'sigma2':
    var = var / jnp.abs(dt)
  elif normaliser != 'sigma2_dt':
    raise ValueError(f'unknown KL normaliser {normaliser!r}; expected one of {KL_NORMALISERS}')
  return sq / (2 * var)


def per_step_kl(student_velocity: VelocityFn, teacher_velocity: VelocityFn,
                latents: jax.Array, sigmas: jax.Array, step_idx: jax.Array, cond: Cond,
                uncond: Cond | None, *, student_cfg: Any, teacher_cfg: Any, spec: KernelSpec,
                reduction: str = 'mean', normaliser: str = 'sigma2_dt') -> jax.Array:
  """KL_j [T, B] at the student's states x_j for the steps `step_idx` [T] — a vmap over steps.

  Args:
    student_velocity: velocity fn closed over the parameters being differentiated.
    teacher_velocity: velocity fn of the (frozen) teacher; its mean is stop-gradiented.
    latents: the rollout's states [N+1, B, ...] (treated as constants).
    sigmas: schedule [N+1].
    step_idx: int [T] indices j of the trained transitions.
    student_cfg / teacher_cfg: guidance weights (the teacher's own, e.g. 1.0 when CFG-free).
  """
  latents = jax.lax.stop_gradient(latents)
  deterministic = is_deterministic(spec)

  def one(j):
    x, t, t_next = latents[j], sigmas[j], sigmas[j + 1]
    mu_s, std = transition_mean(student_velocity, x, t, t_next, sigmas[1], cond, uncond,
                                student_cfg, spec)
    mu_t, _ = transition_mean(teacher_velocity, x, t, t_next, sigmas[1], cond, uncond,
                              teacher_cfg, spec)
    return gaussian_kl(mu_s, jax.lax.stop_gradient(mu_t), std, t_next - t,
                       deterministic=deterministic, reduction=reduction,
                       normaliser=normaliser)

  return jax.vmap(one)(step_idx)
