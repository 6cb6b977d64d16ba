"""The EMA rule of the released recipes and the one optimizer step every trainer takes.

`EMARule` (opd_jax/train/state.py; teachers_rewards_eval.md §1): after optimizer step k (the new
step count), when (k + 1) % every == 0, the EMA moves `updates_per_step` = u times towards θ_k
with the warm-up decay d_k = min((1 + k)/(10 + k), max_decay) — the released DiffusionOPD code
calls `ema.step` once per task micro-batch (u = 3), active every 8 steps, max decay 0.9.
References here are written from those formulas (float64 numpy loops), not from the code.
`TrainState.apply_gradients` is checked against clip-by-global-norm + AdamW written by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sections
from opd_jax.train.state import EMARule, create_train_state, make_optimizer

STEPS = range(1, 31)


def _reference_decay(k, max_decay):
  return min((1 + k) / (10 + k), max_decay)


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {'a': (scale * rng.standard_normal((3, 4))).astype(np.float32),
          'b': {'c': (scale * rng.standard_normal(5)).astype(np.float32)}}


def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_from_config_reads_every_field():
  assert EMARule.from_config(sections.ema(0.8, every=8, updates_per_step=3)) == EMARule(0.8, 8, 3)
  assert EMARule.from_config(sections.ema()) == EMARule(0.9, 1, 1)


@pytest.mark.parametrize('max_decay', [0.9, 0.6])
def test_decay_is_the_warmup_formula(max_decay):
  """d_k = min((1+k)/(10+k), max_decay): small early (d_1 = 2/11), capped late.

  With max_decay 0.9 the cap binds only from k = 80 on ((1+k)/(10+k) ≥ 0.9 ⟺ k ≥ 80), so k ≤ 30
  is all warm-up; with 0.6 it binds from k = 13.
  """
  rule = EMARule(max_decay=max_decay)
  got = np.asarray([float(rule.decay(k)) for k in STEPS])
  np.testing.assert_allclose(got, [_reference_decay(k, max_decay) for k in STEPS], rtol=1e-6)
  np.testing.assert_allclose(float(rule.decay(1)), 2 / 11, rtol=1e-6)
  np.testing.assert_allclose(float(rule.decay(8)), min(0.5, max_decay), rtol=1e-6)
  np.testing.assert_allclose(float(rule.decay(1000)), max_decay, rtol=1e-6)
  if max_decay == 0.9:
    assert got.max() < 0.9                        # no constant decay during the warm-up
    np.testing.assert_allclose(float(rule.decay(80)), 0.9, rtol=1e-6)
  else:
    np.testing.assert_allclose(got[12:], 0.6, rtol=1e-6)   # k = 13 … 30
    assert got[11] < 0.6                                   # k = 12: 13/22


@pytest.mark.parametrize('every', [1, 3, 8])
def test_active_exactly_when_k_plus_1_is_a_multiple_of_every(every):
  rule = EMARule(every=every)
  active = [k for k in STEPS if bool(rule.active(k))]
  assert active == [k for k in STEPS if (k + 1) % every == 0]
  if every == 8:
    assert active == [7, 15, 23]


@pytest.mark.parametrize('every', [1, 3, 8])
def test_update_moves_the_ema_only_on_active_steps(every):
  """Active: ema·d + (1 − d)·θ and the decay d_k reported; inactive: bit-identical, 0 reported."""
  rule = EMARule(max_decay=0.9, every=every, updates_per_step=1)
  update = jax.jit(rule.update)
  ema, params = _tree(0), _tree(1)
  for k in STEPS:
    new, decay = update(ema, params, k)
    if (k + 1) % every:
      assert float(decay) == 0.0
      for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(np.asarray(x), y)     # bit-identical, not just close
    else:
      d = _reference_decay(k, 0.9)
      np.testing.assert_allclose(float(decay), d, rtol=1e-6)
      for x, e, p in zip(_leaves(new), _leaves(ema), _leaves(params)):
        np.testing.assert_allclose(x, d * e + (1 - d) * p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('u', [1, 2, 3])
def test_updates_per_step_equals_u_single_updates(u):
  """u updates with decay d equal one with d^u: the released code's 3 `ema.step`s per round."""
  several, single = EMARule(0.9, 1, u), EMARule(0.9, 1, 1)
  params = _tree(1)
  for k in (1, 5, 29):
    ema = _tree(0)
    looped = ema
    for _ in range(u):
      looped, _ = single.update(looped, params, k)
    got, decay = several.update(ema, params, k)
    d = _reference_decay(k, 0.9)
    np.testing.assert_allclose(float(decay), d, rtol=1e-6)      # the per-update decay
    for x, y, e, p in zip(_leaves(got), _leaves(looped), _leaves(ema), _leaves(params)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(x, d**u * e + (1 - d**u) * p, rtol=1e-5, atol=1e-6)


def test_ema_of_a_parameter_sequence_matches_a_reference_loop():
  """20 steps of the released rule (every 8, 3 updates, max 0.9) on a sequence θ_1 … θ_20.

  Only steps 7 and 15 move the EMA (with d_7³ = (8/17)³ and d_15³ = (16/25)³); every other
  step leaves it bit-identical.
  """
  rule = EMARule(max_decay=0.9, every=8, updates_per_step=3)
  update = jax.jit(rule.update)
  ema = _tree(0)
  reference = _leaves(ema)
  moved = []
  for k in range(1, 21):
    params = _tree(k)
    new, _ = update(ema, params, k)
    if (k + 1) % 8 == 0:
      d = min((1 + k) / (10 + k), 0.9)
      for _ in range(3):
        reference = [d * e + (1 - d) * p for e, p in zip(reference, _leaves(params))]
    if any(not np.array_equal(np.asarray(x), np.asarray(y))
           for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(ema))):
      moved.append(k)
    ema = new
    for x, r in zip(_leaves(ema), reference):
      np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-6, err_msg=f'step {k}')
  assert moved == [7, 15]


def _adamw_by_hand(params, grads_seq, cfg, rule):
  """Clip-by-global-norm + AdamW (bias-corrected, decoupled decay) + the EMA rule, float64."""
  p = _leaves(params)
  m = [np.zeros_like(x) for x in p]
  v = [np.zeros_like(x) for x in p]
  ema = [x.copy() for x in p]
  out = []
  for t, grads in enumerate(grads_seq, start=1):
    g = _leaves(grads)
    norm = np.sqrt(sum(np.sum(x**2) for x in g))
    g = [x * min(1.0, cfg.grad_clip / norm) for x in g]
    m = [cfg.b1 * a + (1 - cfg.b1) * x for a, x in zip(m, g)]
    v = [cfg.b2 * a + (1 - cfg.b2) * x**2 for a, x in zip(v, g)]
    p = [x - cfg.lr * ((a / (1 - cfg.b1**t)) / (np.sqrt(b / (1 - cfg.b2**t)) + cfg.eps)
                       + cfg.weight_decay * x) for x, a, b in zip(p, m, v)]
    if (t + 1) % rule.every == 0:
      d = min((1 + t) / (10 + t), rule.max_decay)
      keep = d**rule.updates_per_step
      ema = [keep * e + (1 - keep) * x for e, x in zip(ema, p)]
    out.append(([x.copy() for x in p], [x.copy() for x in ema], norm))
  return out


def test_apply_gradients_equals_clipped_adamw_and_the_rule_by_hand():
  """10 steps of `make_optimizer` (clip 1.0, AdamW with weight decay) + EMA (every 3, u = 2).

  Gradients alternate between norms above and below the clip threshold, so both branches of
  the clipping are exercised; the EMA starts at θ_0 and moves on steps 2, 5, 8.
  """
  cfg = sections.adamw(1e-2)
  cfg.weight_decay = 0.1
  rule = EMARule(max_decay=0.9, every=3, updates_per_step=2)
  tx = make_optimizer(cfg)
  params = _tree(0)
  grads_seq = [_tree(100 + i, scale=1.0 if i % 2 else 0.05) for i in range(10)]
  norms = [np.sqrt(sum(np.sum(x**2) for x in _leaves(g))) for g in grads_seq]
  assert min(norms) < cfg.grad_clip < max(norms)
  expected = _adamw_by_hand(params, grads_seq, cfg, rule)

  step = jax.jit(lambda s, g: s.apply_gradients(g, tx, rule))
  state = create_train_state(params, tx, seed=0)
  for k, (grads, (p_ref, ema_ref, norm)) in enumerate(zip(grads_seq, expected), start=1):
    state, metrics = step(state, grads)
    assert int(state.step) == k
    for x, r in zip(_leaves(state.params), p_ref):
      np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-6, err_msg=f'params, step {k}')
    for x, r in zip(_leaves(state.ema_params), ema_ref):
      np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-6, err_msg=f'ema, step {k}')
    np.testing.assert_allclose(float(metrics['grad_norm']), norm, rtol=1e-5)
    np.testing.assert_allclose(float(metrics['param_norm']),
                               np.sqrt(sum(np.sum(x**2) for x in p_ref)), rtol=1e-5)
    d = _reference_decay(k, 0.9) if (k + 1) % 3 == 0 else 0.0
    np.testing.assert_allclose(float(metrics['ema_decay']), d, rtol=1e-6)
    assert bool(metrics['finite'])


def test_apply_gradients_reports_non_finite_parameters():
  tx = make_optimizer(sections.adamw(1e-2))
  state = create_train_state(_tree(0), tx, seed=0)
  grads = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), _tree(1))
  _, metrics = state.apply_gradients(grads, tx, EMARule())
  assert not bool(metrics['finite'])
