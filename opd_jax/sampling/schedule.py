"""Flow-matching sigma schedule (spec §2), identical to diffusers' FlowMatchEulerDiscreteScheduler.

diffusers first shifts its 1000 training sigmas linspace(1, 1/1000) in float32 and keeps their
ends (sigma_max = 1, sigma_min = shifted 1/1000); `set_timesteps(N)` then takes
    timesteps = linspace(1000·sigma_max, 1000·sigma_min, N)          (float64)
    sigmas = shift(timesteps / 1000),  shift(σ) = s·σ / (1 + (s − 1)·σ)
— the shift is applied a second time — casts to float32 and appends a trailing 0. We repeat that
arithmetic in numpy so the schedule is a static host constant baked into the jitted sampler.
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
  train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
  train = (np.float32(shift) * train / (1 + np.float32(shift - 1) * train)).astype(np.float32)
  sigma_max, sigma_min = float(train[0]), float(train[-1])
  timesteps = np.linspace(sigma_max * n, sigma_min * n, num_steps)
  sigmas = timesteps / n
  sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
  return np.concatenate([sigmas, np.zeros(1, np.float32)])


def network_timesteps(sigmas: np.ndarray,
                      num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """The timestep fed to the network at each step: 1000·t (spec §2), for t_0..t_{N-1}."""
  return (np.asarray(sigmas[:-1], np.float32) * num_train_timesteps).astype(np.float32)
