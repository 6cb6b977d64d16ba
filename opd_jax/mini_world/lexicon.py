"""The words of the mini world and their visual meaning.

Every word a prompt may contain is declared here, together with what it denotes: the RGB of a
colour name, the endpoint colours of a palette, how a mood changes a palette. The grammar builds
prompts from these words, the renderer draws their meaning, and the rewards check images against
the same tables, so a word can never mean one thing to the renderer and another to a reward.

Colours are float RGB in [0, 1]. The five object colours are far apart (pairwise RGB distance
>= 0.5) so a rule-based detector can tell them apart on blurry generated images, and they are all
saturated so they stand out from the neutral grey backgrounds of composition images.
"""

from __future__ import annotations

import numpy as np

TASKS = ('composition', 'text', 'aesthetics')
TASK_IDS = {name: i for i, name in enumerate(TASKS)}

# --- composition (GenEval-like) -------------------------------------------------------------
COLORS = {
    'red': (0.90, 0.12, 0.12),
    'green': (0.15, 0.75, 0.20),
    'blue': (0.15, 0.30, 0.95),
    'yellow': (0.95, 0.85, 0.10),
    'purple': (0.65, 0.20, 0.85),
}
SHAPES = ('square', 'circle', 'triangle')
PLURALS = {'square': 'squares', 'circle': 'circles', 'triangle': 'triangles'}
# Counts above one are spelled out; a count of one is the article "a".
NUMBER_WORDS = {2: 'two', 3: 'three'}
# Relation of the first object to the second, and how the prompt phrases it.
RELATIONS = {
    'left': 'on the left of',
    'right': 'on the right of',
    'above': 'above',
    'below': 'below',
}
# The same arrangement said from the other object's point of view.
OPPOSITE_RELATION = {'left': 'right', 'right': 'left', 'above': 'below', 'below': 'above'}

# --- text (OCR-like) -------------------------------------------------------------------------
# Six glyphs whose 3×5 bitmaps differ pairwise in at least 4 pixels (see sprites.FONT), so
# template matching stays unambiguous. Upper case and digits only: the word-level vocabulary is
# lower case, so the glyph token "A" never collides with the article "a".
# Six glyphs, strings of two or three (mini world v2): the v1 base, pretrained on twelve glyphs
# in strings of up to four, scored 0.23 text and no RL teacher improved it; the v2 base scores
# 0.82 on held-out strings and its GRPO-Guard teacher adds +0.06 to +0.07 (README, "Mini world:
# measured").
GLYPHS = 'ACJLX4'
MIN_TEXT_LEN = 2
MAX_TEXT_LEN = 3

# --- aesthetics (PickScore-like) -------------------------------------------------------------
# Each palette is a pair of endpoint colours (first, second) that a pattern blends between.
PALETTES = {
    'sunset': ((1.00, 0.55, 0.20), (0.45, 0.15, 0.55)),
    'ocean': ((0.20, 0.80, 0.85), (0.05, 0.15, 0.45)),
    'forest': ((0.55, 0.80, 0.30), (0.05, 0.35, 0.15)),
    'desert': ((0.95, 0.82, 0.55), (0.75, 0.40, 0.25)),
    'lavender': ((0.85, 0.75, 0.95), (0.50, 0.35, 0.75)),
    'rose': ((1.00, 0.70, 0.80), (0.80, 0.15, 0.35)),
    'ice': ((0.90, 0.97, 1.00), (0.45, 0.65, 0.85)),
    'ember': ((1.00, 0.85, 0.20), (0.75, 0.10, 0.05)),
    'meadow': ((0.90, 0.95, 0.45), (0.25, 0.65, 0.55)),
    'sky': ((0.55, 0.75, 1.00), (0.10, 0.20, 0.70)),
    'dusk': ((0.95, 0.60, 0.55), (0.20, 0.20, 0.45)),
    'mint': ((0.75, 1.00, 0.85), (0.20, 0.65, 0.55)),
}
# How the first endpoint (t = 0) blends into the second (t = 1) across the image.
PATTERNS = ('gradient', 'fade', 'glow', 'wash')  # vertical, horizontal, radial, diagonal
# Mood word -> (saturation scale, brightness scale, colour to mix in, mix weight).
MOODS = {
    'calm': (0.70, 0.90, None, 0.0),
    'vivid': (1.30, 1.00, None, 0.0),
    'soft': (0.50, 1.00, (1.00, 1.00, 1.00), 0.35),  # pastel: desaturate toward white
    'deep': (1.00, 0.60, None, 0.0),
    'warm': (1.00, 1.00, (1.00, 0.60, 0.20), 0.25),
    'cool': (1.00, 1.00, (0.30, 0.50, 1.00), 0.25),
}

# Function words of the templates, in a fixed order (the tokenizer's vocabulary order).
FUNCTION_WORDS = ('a', 'and', 'the', 'on', 'left', 'right', 'of', 'above', 'below', 'text')


def all_words() -> tuple[str, ...]:
  """Returns every word the grammar may emit, in a fixed deterministic order."""
  words = list(FUNCTION_WORDS)
  words += list(NUMBER_WORDS.values())
  words += list(COLORS)
  words += list(SHAPES) + [PLURALS[s] for s in SHAPES]
  words += list(MOODS) + list(PALETTES) + list(PATTERNS)
  if len(set(words)) != len(words):
    raise AssertionError('lexicon words must be unique')
  return tuple(words)


def _luminance(rgb: np.ndarray) -> np.ndarray:
  return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def palette_endpoints(mood: str, palette: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns the two endpoint colours (float32 [3] each) that `mood palette` denotes.

  The mood rescales saturation around the luminance, rescales brightness, then optionally mixes
  in a tint; the result is clipped to [0, 1].

  Args:
    mood: a key of MOODS.
    palette: a key of PALETTES.
  """
  sat, value, tint, weight = MOODS[mood]
  ends = []
  for rgb in PALETTES[palette]:
    c = np.asarray(rgb, np.float32)
    lum = _luminance(c)
    c = lum + sat * (c - lum)
    c = c * value
    if tint is not None:
      c = (1.0 - weight) * c + weight * np.asarray(tint, np.float32)
    ends.append(np.clip(c, 0.0, 1.0).astype(np.float32))
  return ends[0], ends[1]
