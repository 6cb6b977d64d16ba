"""The flow-matching schedule equals diffusers' FlowMatchEulerDiscreteScheduler."""

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from opd_jax.sampling.schedule import flow_match_sigmas, network_timesteps


@pytest.mark.parametrize('steps,shift', [(10, 3.0), (40, 3.0), (1, 1.0), (7, 1.0), (25, 5.0),
                                         (10, 0.5)])
def test_matches_diffusers(steps, shift):
  sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
  sched.set_timesteps(steps)
  ours = flow_match_sigmas(steps, shift)
  np.testing.assert_allclose(ours, sched.sigmas.numpy(), rtol=0, atol=1e-7)
  np.testing.assert_allclose(network_timesteps(ours), sched.timesteps.numpy(), rtol=1e-6)


def test_sd35m_ten_steps_from_spec():
  expected = [1.0, .96013, .91335, .85769, .79037, .70728, .60215, .46488, .27805, .00893, 0.0]
  np.testing.assert_allclose(flow_match_sigmas(10, 3.0), expected, atol=5e-6)


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match='num_steps'):
    flow_match_sigmas(0)
  with pytest.raises(ValueError, match='shift'):
    flow_match_sigmas(10, 0.0)
