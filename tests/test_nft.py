"""DiffusionNFT on the mini world: reward weights, upstream's pieces (implicit policies, the
adaptive x0-space error, schedule timesteps, the θ_old decay schedule, ×A_max) against their
formulas, the loss at θ = θ_old, a smoke run of the faithful variant, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mini import cascade_rl as cascade_rl_config
from configs.mini import nft as nft_config
from opd_jax.errors import ConfigError
from opd_jax.rl import config as rl_config
from opd_jax.sampling.schedule import NUM_TRAIN_TIMESTEPS, flow_match_sigmas
from opd_jax.rl import nft
from opd_jax.mini_world.artifacts import load_adapter
from opd_jax.rl.trainer import run_rl
import mini_testing


def test_optimality_maps_advantages_to_unit_interval():
  r = nft.optimality(np.array([-10.0, -5.0, 0.0, 2.5, 5.0, 10.0]), adv_clip=5.0)
  np.testing.assert_allclose(r, [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])


def test_implicit_policies_and_policy_loss():
  rng = np.random.default_rng(0)
  v, v_old = (jnp.asarray(rng.normal(size=(3, 4, 4, 3)), jnp.float32) for _ in range(2))
  for beta in (1.0, 0.3):
    v_pos, v_neg = nft.implicit_policies(v, v_old, beta)
    np.testing.assert_allclose(v_pos, beta * v + (1 - beta) * v_old, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v_neg, (1 + beta) * v_old - beta * v, rtol=1e-6, atol=1e-6)
  pos, neg = np.array([1.0, 2.0, 3.0]), np.array([0.5, 4.0, 1.0])
  r = np.array([1.0, 0.25, 0.5])
  expected = np.mean(r * pos + (1 - r) * neg) / 0.3
  np.testing.assert_allclose(nft.nft_policy_loss(pos, neg, r, 0.3, 5.0, False), expected,
                             rtol=1e-6)
  np.testing.assert_allclose(nft.nft_policy_loss(pos, neg, r, 0.3, 5.0, True), 5 * expected,
                             rtol=1e-6)


def test_adaptive_x0_error_value_weight_and_gradient():
  """e = mean (x̂0 − x0)² / sg(max(mean |x̂0 − x0|, 1e-5)), x̂0 = x_t − t·v; the weight is
  constant under differentiation, and floored where the prediction is exact."""
  rng = np.random.default_rng(1)
  shape = (3, 4, 4, 3)
  x0, eps = rng.normal(size=shape), rng.normal(size=shape)
  t = np.array([0.9, 0.3, 0.5])
  tb = t[:, None, None, None]
  x_t = (1 - tb) * x0 + tb * eps
  v = (eps - x0) + 0.3 * rng.normal(size=shape)
  v[2] = (x_t[2] - x0[2]) / t[2]            # an exact x0 prediction: the floor applies
  err = x_t - tb * v - x0
  weight = np.maximum(np.abs(err).mean(axis=(1, 2, 3)), 1e-5)
  expected = (err ** 2).mean(axis=(1, 2, 3)) / weight
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  error = lambda vv: nft.adaptive_x0_error(vv, f32(x_t), f32(t), f32(x0))
  got, grad = jax.jit(lambda vv: (error(vv), jax.grad(lambda w: jnp.sum(error(w)))(vv)))(f32(v))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  assert float(got[2]) < 1e-4
  # ∂e/∂v = −2t·(x̂0 − x0) / (D·weight): no gradient through the weight.
  d = np.prod(shape[1:])
  expected_grad = -2 * tb * err / (d * weight[:, None, None, None])
  np.testing.assert_allclose(grad[:2], expected_grad[:2], rtol=1e-3, atol=1e-6)
  # The net weight on the velocity error is t / mean |v − (ε − x0)|.
  u = eps - x0
  np.testing.assert_allclose(got[:2], (t * ((v - u) ** 2).mean(axis=(1, 2, 3)) /
                                       np.abs(v - u).mean(axis=(1, 2, 3)))[:2], rtol=1e-4)


def test_schedule_timesteps_are_shuffles_of_the_sampler_schedule():
  """Upstream's training timesteps: per sample, 9 distinct entries of the rollout's own shifted
  schedule t_0..t_9 (bit for bit; the final 0 never), each sample its own shuffle."""
  c = mini_testing.tiny_rl_config(nft_config, 'composition',
                                  **{'nft.timesteps': 'sampler_schedule', 'rollout.num_steps': 10,
                                     'rollout.shift': 3.0, 'nft.timesteps_per_sample': 9})
  spec = nft.nft_spec(c)
  schedule = flow_match_sigmas(10, 3.0)[:-1]
  np.testing.assert_array_equal(np.float32(spec.schedule), schedule)
  t = np.asarray(jax.jit(lambda k: nft.training_timesteps(spec, k, 4000))(jax.random.PRNGKey(0)))
  assert t.shape == (9, 4000) and t.dtype == np.float32
  assert set(t.ravel().tolist()) == set(schedule.tolist())
  for col in t.T[:200]:
    assert len(set(col.tolist())) == 9                 # without replacement
  assert len({tuple(col) for col in t.T[:200]}) > 190  # each sample its own shuffle
  # Every entry is about equally likely in every position (first row shown).
  counts = np.array([(t[0] == s).sum() for s in schedule])
  assert counts.min() > 300 and counts.max() < 500, counts


def test_old_policy_decay_schedules():
  c = mini_testing.tiny_rl_config(nft_config, 'composition', **{'nft.old_decay': 0.3})
  assert nft.old_policy_decay(nft.nft_spec(c), jnp.int32(1000)) == 0.3
  c.nft.old_decay_schedule = 'linear'            # upstream decay_type 1: (0, 0.001, 0.5)
  spec = nft.nft_spec(c)
  steps = [0, 1, 100, 499, 500, 501, 10000]
  got = [float(nft.old_policy_decay(spec, jnp.int32(s))) for s in steps]
  np.testing.assert_allclose(got, [0, 0.001, 0.1, 0.499, 0.5, 0.5, 0.5], rtol=1e-5)
  c.nft.old_decay_flat, c.nft.old_decay_rate, c.nft.old_decay_max = 75, 0.0075, 0.999  # type 2
  spec = nft.nft_spec(c)
  got = [float(nft.old_policy_decay(spec, jnp.int32(s))) for s in (0, 74, 75, 76, 208, 300)]
  np.testing.assert_allclose(got, [0, 0, 0, 0.0075, 0.9975, 0.999], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('field,value', [
    ('nft.weighting', 'x0'), ('nft.timesteps', 'random'), ('nft.old_decay_schedule', 'cosine'),
    ('nft.old_decay_flat', -1), ('nft.old_decay_rate', -0.1), ('nft.old_decay_max', 1.0),
    ('nft.timesteps_per_sample', 5)])
def test_bad_nft_fields_name_the_field(field, value):
  c = mini_testing.tiny_rl_config(nft_config, 'composition',
                                  **{'nft.timesteps': 'sampler_schedule', field: value})
  assert c.rollout.num_steps == 4
  with pytest.raises(ConfigError, match='config.' + field.replace('.', r'\.') + ':'):
    rl_config.validate(c)


def _setup(**kv):
  config = mini_testing.tiny_rl_config(nft_config, 'aesthetics', **kv)
  config, setup, prompts, _ = mini_testing.rl_setup(config)
  return config, setup, prompts


def test_loss_at_the_old_policy_is_reward_weighted_flow_matching():
  """At θ = θ_old, ∇L = (2r − 1)-weighted flow-matching gradient: r = 1 pulls v_θ toward the
  sample, r = 0 pushes it away by exactly as much, r = ½ gives no gradient."""
  config, setup, prompts = _setup(**{'nft.timesteps_per_sample': 1})
  spec = nft.nft_spec(config)
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(0), x.shape),
                        setup.init_state().params)
  rb = prompts.next((0,))
  cond = jax.tree.map(jnp.asarray, rb.cond)
  x0 = jax.random.uniform(jax.random.PRNGKey(1), (8, 16, 16, 3), minval=-1, maxval=1)
  key = jax.random.PRNGKey(2)

  @jax.jit
  def grad(r):
    batch = {'x0': x0, 'r': jnp.full((8,), r), 'cond': cond}
    return jax.grad(lambda p: nft.nft_loss(spec, setup.policy, p, params, setup.frozen,
                                           setup.zero_adapter, batch, key)[0])(params)

  @jax.jit
  def fm_grad():
    k_t, k_eps = jax.random.split(key)
    t = jax.random.uniform(k_t, (1, 8))[0]
    eps = jax.random.normal(k_eps, (1,) + x0.shape)[0]
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    def fm(p):
      v = setup.policy.student_velocity(p, setup.frozen)(x_t, t * NUM_TRAIN_TIMESTEPS, cond)
      return jnp.mean(jnp.mean(jnp.square(v - (eps - x0)), axis=(1, 2, 3)))
    return jax.grad(fm)(params)

  g1, g0, gh, ref = grad(1.0), grad(0.0), grad(0.5), fm_grad()
  for a, b, c, d in zip(*map(jax.tree.leaves, (g1, g0, gh, ref))):
    tol = 1e-3 * float(np.abs(d).max()) + 1e-7   # two compiled programs: rounding differs
    np.testing.assert_allclose(a, d, atol=tol)
    np.testing.assert_allclose(b, -d, atol=tol)
    np.testing.assert_allclose(c, 0.0, atol=tol)


def test_upstream_variant_sets_upstream_values_and_validates():
  """configs/mini/nft.py:composition,upstream — the values of NVlabs/DiffusionNFT config/nft.py
  (spec §1), written here independently of the config file."""
  for arg, steps in (('composition,upstream', 10), ('composition,upstream,smoke', 4)):
    c = nft_config.get_config(arg)
    assert (c.nft.weighting, c.nft.timesteps, c.nft.old_decay_schedule) == (
        'adaptive_x0', 'sampler_schedule', 'linear')
    assert (c.nft.old_decay_rate, c.nft.old_decay_max, c.nft.kl_beta) == (0.001, 0.5, 1e-4)
    assert c.nft.scale_by_adv_clip and c.nft.timesteps_per_sample == steps - 1
    nft.nft_spec(c)
  plain = nft_config.get_config('composition')
  assert (plain.nft.weighting, plain.nft.timesteps) == ('velocity', 'uniform')


def test_nft_rejects_cfg():
  config = mini_testing.tiny_rl_config(nft_config, 'composition', **{'rollout.cfg_scale': 4.5})
  with pytest.raises(ValueError, match='CFG-free'):
    nft.nft_spec(config)


def test_cascade_nft_smoke_run_saves_a_cfg_free_teacher(tmp_path):
  """configs/mini/cascade_rl.py:nft — one task per iteration, in order — via run_rl, with
  upstream's options: x0-space adaptive weighting, the sampler's shuffled schedule, the linear
  θ_old decay (read at the optimizer-step count after each iteration) and ×A_max. The default
  velocity / uniform path runs through the trainer in test_rl_pretrain_resume and test_recipe."""
  config = mini_testing.tiny_rl_config(
      cascade_rl_config, 'nft',
      **{'nft.kl_beta': 0.1, 'nft.weighting': 'adaptive_x0', 'nft.timesteps': 'sampler_schedule',
         'nft.timesteps_per_sample': 3, 'nft.old_decay_schedule': 'linear',
         'nft.old_decay_rate': 0.05, 'nft.old_decay_max': 0.5, 'nft.scale_by_adv_clip': True})
  out = run_rl(config, str(tmp_path), mini_testing.tiny_base_dir(),
               mesh=mini_testing.mesh_of(2))
  m = out['metrics']
  assert all(np.isfinite(m[k]) for k in ('loss', 'policy_loss', 'positive_loss', 'kl'))
  # 3 iterations × 2 minibatches: the last update of θ_old happens at optimizer step 6.
  np.testing.assert_allclose(m['old_decay'], 0.05 * 6, rtol=1e-6)
  active = [[t for t, v in h.items() if np.isfinite(v)] for h in out['reward_history']]
  assert active == [['composition'], ['text'], ['aesthetics']]
  teacher = load_adapter(out['teacher_dir'])
  assert teacher.cfg_scale == 1.0 and teacher.meta['stage'] == 'nft'
  assert teacher.meta['tasks'] == ['composition', 'text', 'aesthetics']
  assert teacher.meta['schedule'] == 'cascade'


@pytest.mark.slow
def test_nft_raises_a_reward_in_two_dozen_iterations(tmp_path, monkeypatch):
  """As for GRPO: image brightness through the trainer's reward hook (the tiny test base draws
  near-noise, where the task rewards are almost flat)."""
  mini_testing.brightness_reward(monkeypatch, 'aesthetics')
  config = mini_testing.tiny_rl_config(
      nft_config, 'aesthetics',
      **{'train.num_steps': 24, 'data.batch_size': 2, 'data.group_size': 8,
         'data.max_prompts': 2, 'optimizer.lr': 3e-3})
  out = run_rl(config, str(tmp_path), mini_testing.tiny_base_dir(),
               mesh=mini_testing.mesh_of(1))
  curve = np.array([h['aesthetics'] for h in out['reward_history']])
  # The rise must stand out of the iteration-to-iteration noise: 3 standard errors of the
  # difference of the first and last four iterations' means.
  first, last = curve[:4], curve[-4:]
  se = np.sqrt(first.var(ddof=1) / 4 + last.var(ddof=1) / 4)
  assert last.mean() - first.mean() > 3 * se, curve
