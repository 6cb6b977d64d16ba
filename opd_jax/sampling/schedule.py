"""Flow-matching sigma schedule (spec §2), identical to diffusers' FlowMatchEulerDiscreteScheduler.

diffusers builds the schedule in float32 numpy as
    timesteps = linspace(sigma_to_t(sigma_max), sigma_to_t(sigma_min), N) with sigma_max = 1 and
    sigma_min = 1/num_train_timesteps (the training sigmas are linspace(1, 1/1000, 1000)),
    sigmas = timesteps / num_train_timesteps,
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas),
and appends a trailing 0. We reproduce that arithmetic in numpy float32 so the schedule is a
static host constant (it fixes shapes and is baked into the jitted sampler).
"""

from __future__ import annotations

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def flow_match_sigmas(num_steps: int, shift: float = 1.0,
                      num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """Returns the N + 1 noise levels t_0 = 1 > ... > t_{N-1} > t_N = 0 (float32).

  Args:
    num_steps: number of sampler steps N (>= 1).
    shift: the schedule shift s in s·σ/(1 + (s − 1)·σ); SD3.5-M uses 3.0.
    num_train_timesteps: the scheduler's training grid size (1000 for SD3).
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  if shift <= 0:
    raise ValueError(f'shift must be > 0, got {shift}')
  n = num_train_timesteps
  train_sigmas = np.linspace(1, n, n, dtype=np.float32)[::-1].copy() / n
  sigma_max, sigma_min = train_sigmas[0], train_sigmas[-1]
  timesteps = np.linspace(sigma_max * n, sigma_min * n, num_steps).astype(np.float32)
  sigmas = (timesteps / n).astype(np.float32)
  sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
  return np.concatenate([sigmas, np.zeros(1, np.float32)])


def network_timesteps(sigmas: np.ndarray,
                      num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """The timestep fed to the network at each step: 1000·t (spec §2), for t_0..t_{N-1}."""
  return (np.asarray(sigmas[:-1], np.float32) * num_train_timesteps).astype(np.float32)
