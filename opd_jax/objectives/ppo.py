"""PPO-style per-step estimators of the OPD gradient (spec §4, Eq. 16–23), for the ablation.

Both use the clipped surrogate −min(ρ_j·A_j, clip(ρ_j, 1 − ε, 1 + ε)·A_j) with
ρ_j = π_θ(x_{j+1}|x_j)/π_old(x_{j+1}|x_j) and π_old = π_θ (detached) at the sampled x_{j+1}:

  ppo_analytic_advantage  A_j = −KL_j, kept differentiable (Eq. 16–18). Its gradient at ρ = 1
      is ∇KL_j + KL_j·∇log π_θ(x_{j+1}|x_j): the pathwise term plus a score-function term whose
      mean is zero (KL_j depends on x_j only) but whose variance is not (Eq. 19–23).
  ppo_sampled_logratio    A_j = −(log p_S(x_{j+1}|x_j) − log p_T(x_{j+1}|x_j)), detached: the
      LLM-style on-policy distillation reward. E[(log p_S − log p_T)·∇log p_S] = ∇KL_j, so it is
      unbiased for the per-step KL; with `discount` γ > 0 the advantage sums future log-ratios
      Σ_{k≥j} γ^{k−j}(·), which also credits the student for the states it leads to.

Log-densities are the true Gaussian densities (summed over latent elements) whatever
`reduction` the KL uses; compare with the analytic estimator at reduction='sum',
normaliser='sigma2_dt', where the analytic KL is the true KL. Neither exists for the ODE sampler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd_jax.objectives.per_step_kl import gaussian_kl
from opd_jax.sampling.step import KernelSpec, is_deterministic, transition_mean
from opd_jax.sampling.transitions import gaussian_log_prob


def _step_quantities(student_velocity, teacher_velocity, traj, step_idx, cond, uncond, *,
                     student_cfg, teacher_cfg, spec, reduction, normaliser):
  """Per step j: (KL_j [B], log π_θ(x_{j+1}|x_j) [B], log p_T(x_{j+1}|x_j) [B])."""
  if is_deterministic(spec):
    raise ValueError('PPO-style estimators need a stochastic sampler: set rollout.kernel to an '
                     'SDE and rollout.noise_level > 0')
  latents = jax.lax.stop_gradient(traj.latents)
  sig = traj.sigmas

  def one(j):
    x, x_next, t, t_next = latents[j], latents[j + 1], sig[j], sig[j + 1]
    mu_s, std = transition_mean(student_velocity, x, t, t_next, sig[1], cond, uncond,
                                student_cfg, spec)
    mu_t, _ = transition_mean(teacher_velocity, x, t, t_next, sig[1], cond, uncond,
                              teacher_cfg, spec)
    mu_t = jax.lax.stop_gradient(mu_t)
    kl = gaussian_kl(mu_s, mu_t, std, t_next - t, deterministic=False, reduction=reduction,
                     normaliser=normaliser)
    return (kl, gaussian_log_prob(x_next, mu_s, std, 'sum'),
            gaussian_log_prob(x_next, mu_t, std, 'sum'))

  return jax.vmap(one)(step_idx)


def clipped_surrogate(logp: jax.Array, advantage: jax.Array, clip_range: float) -> jax.Array:
  """−min(ρ·A, clip(ρ)·A) with ρ = exp(logp − stop_gradient(logp)) (= 1 in value)."""
  ratio = jnp.exp(logp - jax.lax.stop_gradient(logp))
  clipped = jnp.clip(ratio, 1 - clip_range, 1 + clip_range)
  return -jnp.minimum(ratio * advantage, clipped * advantage)


def ppo_analytic_advantage(student_velocity, teacher_velocity, traj, step_idx, cond, uncond, *,
                           student_cfg, teacher_cfg, spec: KernelSpec, reduction: str,
                           normaliser: str, clip_range: float = 1e-4, discount: float = 0.0):
  del discount
  kl, logp, _ = _step_quantities(student_velocity, teacher_velocity, traj, step_idx, cond,
                                 uncond, student_cfg=student_cfg, teacher_cfg=teacher_cfg,
                                 spec=spec, reduction=reduction, normaliser=normaliser)
  return clipped_surrogate(logp, -kl, clip_range), jax.lax.stop_gradient(kl)


def discounted_reverse_sum(x: jax.Array, discount: float) -> jax.Array:
  """y_j = Σ_{k≥j} γ^{k−j} x_k along axis 0."""
  def body(carry, xj):
    carry = xj + discount * carry
    return carry, carry
  _, out = jax.lax.scan(body, jnp.zeros_like(x[0]), x, reverse=True)
  return out


def ppo_sampled_logratio(student_velocity, teacher_velocity, traj, step_idx, cond, uncond, *,
                         student_cfg, teacher_cfg, spec: KernelSpec, reduction: str,
                         normaliser: str, clip_range: float = 1e-4, discount: float = 0.0):
  kl, logp, logp_t = _step_quantities(student_velocity, teacher_velocity, traj, step_idx, cond,
                                      uncond, student_cfg=student_cfg, teacher_cfg=teacher_cfg,
                                      spec=spec, reduction=reduction, normaliser=normaliser)
  log_ratio = jax.lax.stop_gradient(logp - logp_t)
  advantage = -discounted_reverse_sum(log_ratio, discount) if discount else -log_ratio
  return clipped_surrogate(logp, advantage, clip_range), jax.lax.stop_gradient(kl)
