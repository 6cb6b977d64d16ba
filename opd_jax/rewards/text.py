"""Text reward (OCR-like): read the glyph string by template matching, score by edit distance.

Reading, vectorised over the batch:
1. Ink map in [0, 1]: distance of each pixel's colour from the per-image median (background)
   colour, ramped linearly from INK_LOW (no ink) to INK_HIGH (full ink).
2. Every 3×5 window of the ink map is classified as blank or as the nearest font glyph
   (squared error against the templates; blank = an all-zero template).
3. Text is laid out on a 4-pixel pitch, so a reading is a baseline row y0 and a column phase;
   its cells are the windows at (y0, phase + 4k). The reading that best reconstructs the whole
   ink map (template error in its cells plus all ink outside them) wins, and its non-blank cells,
   left to right, are the text.

Reward, as Flow-GRPO's OCR reward: 1 − min(1, Levenshtein(read, target) / len(target)).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from opd_jax.mini_world import grammar
from opd_jax.mini_world import lexicon
from opd_jax.mini_world import sprites
from opd_jax.rewards import _inputs
from opd_jax.rewards.ocr import levenshtein  # the real OCR reward's edit distance

INK_LOW = 0.15
INK_HIGH = 0.5
_BLANK = len(lexicon.GLYPHS)  # class index of the empty cell


def ink_map(images: np.ndarray) -> np.ndarray:
  """How strongly each pixel departs from the background colour, float32 [B, H, W] in [0, 1]."""
  background = np.median(images.reshape(images.shape[0], -1, 3), axis=1)
  dist = np.linalg.norm(images - background[:, None, None], axis=-1)
  return np.clip((dist - INK_LOW) / (INK_HIGH - INK_LOW), 0.0, 1.0)


def read_text(images: np.ndarray) -> list[str]:
  """Reads the glyph string drawn in each image.

  Args:
    images: float32 [B, H, W, 3] in [0, 1].

  Returns:
    B strings over lexicon.GLYPHS ('' when nothing legible is found).
  """
  ink = ink_map(images)
  b, h, w = ink.shape
  gh, gw, pitch = sprites.GLYPH_H, sprites.GLYPH_W, sprites.GLYPH_PITCH
  windows = np.lib.stride_tricks.sliding_window_view(ink, (gh, gw), axis=(1, 2))
  windows = windows.reshape(b, h - gh + 1, w - gw + 1, gh * gw)  # [B, Y, X, 15]
  templates = sprites.GLYPH_TEMPLATES.reshape(len(lexicon.GLYPHS), -1)
  templates = np.concatenate([templates, np.zeros((1, gh * gw), np.float32)])  # + blank
  # ||p - t||^2 = ||p||^2 - 2 p.t + ||t||^2, for every window and template: [B, Y, X, G + 1].
  sq = (windows**2).sum(-1, keepdims=True)
  err = sq - 2.0 * windows @ templates.T + (templates**2).sum(-1)
  best = err.argmin(-1)
  # Gain of explaining a window by its best template instead of leaving its ink unexplained.
  gain = sq[..., 0] - err.min(-1)  # [B, Y, X]
  num_x = w - gw + 1
  best_score = np.full(b, -np.inf)
  best_reading = [[] for _ in range(b)]
  for phase in range(pitch):
    cols = np.arange(phase, num_x, pitch)
    total = gain[:, :, cols].sum(-1)  # [B, Y]: higher = less unexplained ink
    y0 = total.argmax(-1)
    score = total[np.arange(b), y0]
    better = score > best_score
    for i in np.flatnonzero(better):
      best_score[i] = score[i]
      best_reading[i] = best[i, y0[i], cols]
  return [''.join(lexicon.GLYPHS[c] for c in cells if c != _BLANK) for cells in best_reading]


def text_reward(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """1 − normalised edit distance between the text read and the prompt's text.

  Args:
    images: float [B, H, W, 3] in [0, 1].
    prompts: B text prompts ('the text "..."').

  Returns:
    float32 [B] in [0, 1]; 1 when the string is read exactly.
  """
  images, prompts = _inputs.check_images(images, prompts)
  targets = []
  for prompt in prompts:
    spec = grammar.parse(prompt)
    if not isinstance(spec, grammar.TextSpec):
      raise ValueError(f'not a text prompt: {prompt!r}')
    targets.append(spec.text)
  read = read_text(images)
  return np.array([1.0 - min(1.0, levenshtein(r, t) / len(t)) for r, t in zip(read, targets)],
                  np.float32)
