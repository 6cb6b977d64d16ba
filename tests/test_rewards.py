"""Tests of the mini-world rewards on rendered and hand-made images."""

import time

import numpy as np
import pytest

from opd_jax.mini_world import grammar
from opd_jax.mini_world import render
from opd_jax.mini_world import sprites
from opd_jax.rewards import REWARDS
from opd_jax.rewards import aesthetics
from opd_jax.rewards import composition
from opd_jax.rewards import composition_strict
from opd_jax.rewards import get_reward
from opd_jax.rewards import text


def _imgs(prompts, seed=0):
  return render.render_batch(prompts, np.random.default_rng(seed))


def _corrupted(prompts, seed=0):
  rng = np.random.default_rng(seed)
  return np.stack([render.render_imperfect(p, rng, corrupt_prob=1.0)[0] for p in prompts]
                  ).astype(np.float32) / 255.0


def _blur(images, amount=0.4):
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  neighbours = (padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2]
                + padded[:, 1:-1, 2:]) / 4
  return (1 - amount) * images + amount * neighbours


def test_registry():
  assert set(REWARDS) == {'composition', 'text', 'aesthetics'}
  assert get_reward('text') is text.text_reward
  with pytest.raises(KeyError):
    get_reward('pickscore')


# --- composition -----------------------------------------------------------------------------
def test_composition_ground_truth_scores_one():
  prompts = grammar.prompt_set('composition', 'test') + grammar.prompt_set('composition', 'train')
  images = _imgs(prompts)
  np.testing.assert_array_equal(composition.composition_reward(images, prompts), 1.0)
  np.testing.assert_array_equal(composition_strict(images, prompts), 1.0)


def test_composition_reward_does_not_check_the_layout():
  """The renderer's fixed layouts (render.SLOTS) are a property of the data, not of the reward:
  objects anywhere that satisfy the prompt score 1, as in GenEval."""
  from opd_jax.mini_world import lexicon
  image = np.full((16, 16, 3), 0.45, np.float32)
  for color, shape, (y, x) in [('red', 'square', (12, 0)), ('blue', 'circle', (0, 8))]:
    image[y:y + 4, x:x + 4][sprites.SHAPE_MASKS[shape]] = lexicon.COLORS[color]
  assert (12 // render.CELL, 0) not in render.RELATION_SLOTS['left']
  prompts = ['a red square on the left of a blue circle', 'a red square below a blue circle',
             'a red square and a blue circle']
  images = np.repeat(image[None], len(prompts), 0)
  np.testing.assert_array_equal(composition_strict(images, prompts), 1.0)


def test_composition_robust_to_mild_blur_and_noise():
  prompts = grammar.prompt_set('composition', 'test')
  rng = np.random.default_rng(1)
  images = np.clip(_blur(_imgs(prompts)) + rng.normal(0, 0.04, (len(prompts), 16, 16, 3)), 0, 1)
  assert composition_strict(images.astype(np.float32), prompts).mean() > 0.9


# Checks: per group present and exactly its count, no unnamed object, position's relation.
@pytest.mark.parametrize('prompt, drawn, expected', [
    ('a red square on the left of a blue circle', 'a red square on the right of a blue circle',
     5 / 6),
    ('a red square on the left of a blue circle', 'a green square on the left of a blue circle',
     2 / 6),
    # "A and B" is laid out A top-left, B bottom-right (render.SLOTS): A is never below B.
    ('a red square below a blue circle', 'a red square and a blue circle', 5 / 6),
    ('three red circles', 'two red circles', 2 / 3),
    ('two red circles', 'three blue circles', 0.0),
    ('a red circle', 'a red triangle', 0.0),
    ('a red circle', 'two red circles', 2 / 3),
    ('a red circle', 'a red circle and a blue square', 2 / 3),
    ('a purple triangle and a yellow square', 'a purple triangle', 3 / 5),
    ('a purple triangle and a yellow square', 'two purple triangles', 2 / 5),
])
def test_composition_wrong_images_score_low(prompt, drawn, expected):
  images = _imgs([drawn] * 8)
  scores = composition.composition_reward(images, [prompt] * 8)
  np.testing.assert_allclose(scores, expected, atol=1e-6)
  assert composition_strict(images, [prompt] * 8).mean() < 1.0


def test_composition_corrupted_and_noise_score_low():
  prompts = grammar.prompt_set('composition', 'test')
  assert composition_strict(_corrupted(prompts), prompts).mean() < 0.05
  assert composition.composition_reward(_corrupted(prompts), prompts).mean() < 0.6
  noise = np.random.default_rng(0).random((len(prompts), 16, 16, 3)).astype(np.float32)
  assert composition.composition_reward(noise, prompts).mean() < 0.1
  blank = np.full((len(prompts), 16, 16, 3), 0.5, np.float32)
  np.testing.assert_array_equal(composition.composition_reward(blank, prompts), 0.0)


def test_detect_finds_shapes_and_positions():
  image = _imgs(['a yellow triangle on the left of a purple square'])
  det = composition.detect(image)
  assert len(det.color) == 2
  by_color = {composition.COLOR_NAMES[c]: (s, x) for c, s, x in zip(det.color, det.shape, det.cx)}
  assert by_color['yellow'][0] == 2 and by_color['purple'][0] == 0  # triangle, square
  assert by_color['yellow'][1] < by_color['purple'][1]


def test_composition_rejects_other_tasks():
  with pytest.raises(ValueError):
    composition.composition_reward(_imgs(['the text "AC"']), ['the text "AC"'])


# --- text ------------------------------------------------------------------------------------
def test_levenshtein():
  assert text.levenshtein('kitten', 'sitting') == 3
  assert text.levenshtein('', 'AC') == 2 and text.levenshtein('AC', '') == 2
  assert text.levenshtein('ACF', 'ACF') == 0 and text.levenshtein('AC', 'CA') == 2


def test_text_ground_truth_reads_exactly():
  prompts = grammar.prompt_set('text', 'test') + grammar.prompt_set('text', 'train')
  images = _imgs(prompts)
  assert text.read_text(images) == [grammar.parse(p).text for p in prompts]
  np.testing.assert_array_equal(text.text_reward(images, prompts), 1.0)


def test_text_robust_to_mild_blur_and_noise():
  prompts = grammar.prompt_set('text', 'test')
  rng = np.random.default_rng(1)
  images = _imgs(prompts)
  images = np.clip(_blur(images, 0.3) + rng.normal(0, 0.05, images.shape), 0, 1)
  assert text.text_reward(images.astype(np.float32), prompts).mean() > 0.95


def test_text_wrong_glyphs_blank_and_noise_score_low():
  images = _imgs(['the text "LAX"', 'the text "AC"', 'the text "JX4"'])
  prompts = ['the text "LAC"', 'the text "AC"', 'the text "CAL"']
  np.testing.assert_allclose(text.text_reward(images, prompts), [2 / 3, 1.0, 0.0], atol=1e-6)
  prompts = grammar.prompt_set('text', 'test')
  blank = np.full((len(prompts), 16, 16, 3), 0.8, np.float32)
  np.testing.assert_array_equal(text.text_reward(blank, prompts), 0.0)
  noise = np.random.default_rng(0).random((len(prompts), 16, 16, 3)).astype(np.float32)
  assert text.text_reward(noise, prompts).mean() < 0.15
  assert text.text_reward(_corrupted(prompts), prompts).mean() < 0.7


# --- aesthetics ------------------------------------------------------------------------------
def test_aesthetics_prefers_smooth_palette_matching_images():
  prompts = grammar.prompt_set('aesthetics', 'test')
  good = _imgs(prompts)
  score = aesthetics.aesthetics_reward(good, prompts)
  assert score.min() > 0.7 and score.max() <= 1.0
  rng = np.random.default_rng(0)
  noise = rng.random(good.shape).astype(np.float32)
  assert aesthetics.aesthetics_reward(noise, prompts).max() < score.min()
  wrong_palette = [prompts[(i + 1) % len(prompts)] for i in range(len(prompts))]
  assert (aesthetics.aesthetics_reward(good, wrong_palette).mean() < score.mean() - 0.2)
  middling = aesthetics.aesthetics_reward(_corrupted(prompts), prompts)
  assert middling.mean() < score.mean() - 0.3


def test_aesthetics_penalises_glyphs_on_a_smooth_image():
  prompts = grammar.prompt_set('aesthetics', 'test')
  smooth = _imgs(prompts)
  with_text = smooth.copy()
  for k, ch in enumerate('AC4'):
    cell = with_text[:, 5:10, 2 + 4 * k:5 + 4 * k]
    cell[:, sprites.FONT[ch]] = 0.05
  clean, texty = (aesthetics.aesthetics_reward(x, prompts) for x in (smooth, with_text))
  assert (texty < clean - 0.2).all()
  # Also for the generic branch (prompts of other tasks): a smooth image beats a text image.
  text_prompts = grammar.prompt_set('text', 'test')
  smooth = smooth[:len(text_prompts)]
  assert (aesthetics.aesthetics_reward(smooth, text_prompts).mean()
          > aesthetics.aesthetics_reward(_imgs(text_prompts), text_prompts).mean() + 0.2)


def test_aesthetics_terms_are_bounded():
  prompts = grammar.prompt_set('composition', 'test')
  terms = aesthetics.aesthetics_terms(_imgs(prompts), prompts)
  np.testing.assert_array_equal(terms['has_palette'], 0.0)
  for k in ('palette', 'smooth', 'vivid'):
    assert ((terms[k] >= 0) & (terms[k] <= 1)).all()


# --- shared contract -------------------------------------------------------------------------
@pytest.mark.parametrize('task', sorted(REWARDS))
def test_reward_contract_and_speed(task):
  prompts = grammar.prompt_set(task, 'test')
  images = _imgs(prompts)
  fn = get_reward(task)
  fn(images, prompts)  # warm caches (prompt parsing, aesthetic targets)
  start = time.perf_counter()
  out = fn(images * 1.05 - 0.02, [p.encode() for p in prompts])  # overshoot + bytes prompts
  elapsed = time.perf_counter() - start
  assert out.dtype == np.float32 and out.shape == (len(prompts),)
  assert ((out >= 0) & (out <= 1)).all()
  assert elapsed < 0.25, elapsed  # ~10 ms on one core; loose for a shared machine
  with pytest.raises(ValueError):
    fn(images[:, :8], prompts)
  with pytest.raises(ValueError):
    fn(images, prompts[:3])
