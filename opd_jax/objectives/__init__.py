"""Objectives by name. Each maps a student rollout to per-step loss terms [T, B].

Contract: fn(student_velocity, teacher_velocity, traj, step_idx, cond, uncond, *,
             student_cfg, teacher_cfg, spec, reduction, normaliser, clip_range, discount)
          -> (terms, kl)
where `terms` [T, B] is what is differentiated (w.r.t. the parameters closed over by
`student_velocity`) and `kl` [T, B] is the detached closed-form per-step KL, reported as a metric.
"""

from __future__ import annotations

from typing import Callable

import jax

from opd_jax.objectives.per_step_kl import per_step_kl
from opd_jax.sampling.step import KernelSpec
from opd_jax.objectives.ppo import ppo_analytic_advantage, ppo_sampled_logratio


def analytic(student_velocity, teacher_velocity, traj, step_idx, cond, uncond, *, student_cfg,
             teacher_cfg, spec: KernelSpec, reduction: str, normaliser: str,
             clip_range: float = 0.0, discount: float = 0.0):
  """The closed-form per-step KL (Eq. 11; Eq. 12 for the ODE sampler), pathwise gradient."""
  del clip_range, discount
  kl = per_step_kl(student_velocity, teacher_velocity, traj.latents, traj.sigmas, step_idx,
                   cond, uncond, student_cfg=student_cfg, teacher_cfg=teacher_cfg, spec=spec,
                   reduction=reduction, normaliser=normaliser)
  return kl, jax.lax.stop_gradient(kl)


OBJECTIVES: dict[str, Callable] = {
    'analytic': analytic,
    'ppo_analytic_advantage': ppo_analytic_advantage,
    'ppo_sampled_logratio': ppo_sampled_logratio,
}


def get_objective(name: str) -> Callable:
  if name not in OBJECTIVES:
    raise ValueError(f'config.objective.name: unknown objective {name!r}; '
                     f'choose one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[name]
