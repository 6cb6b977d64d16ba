"""Bitmaps the mini world draws with: a 3×5 glyph font and 4×4 object shapes.

The font covers exactly `lexicon.GLYPHS`; its glyphs differ pairwise in at least 4 of their 15
pixels (checked at import), which is what lets the OCR reward read blurry generated text by
nearest-template matching. Text is laid out on a fixed pitch of 4 pixels (3 glyph columns + 1
gap), so glyph k sits in column k of the DiT's 4×4-pixel patch grid.

Objects are 4×4, the size of one DiT patch, and are drawn in the cells of that patch grid (see
render). In mini world v1, 5×5 objects at free positions straddled up to four patches and the
base drew them as fragments (exploratory measurement: blobs of 6-12 pixels against 17-25 drawn).
The v2 base draws whole objects in cells; what it still gets wrong is which objects, how many
and where (README, "Mini world: measured").

The three shapes are told apart by two numbers the composition reward measures on each detected
blob: the fill ratio (area / bounding-box area: square 1.0, circle 0.75, triangle 0.625) and the
top-to-bottom mass ratio (triangle 3/7, square and circle 1.0).
"""

from __future__ import annotations

import itertools

import numpy as np

from opd_jax.mini_world import lexicon

GLYPH_H = 5
GLYPH_W = 3
GLYPH_PITCH = GLYPH_W + 1  # one blank column between glyphs
OBJECT_SIZE = 4   # one object fills one cell of the DiT's 4×4-pixel patch grid

_FONT_ROWS = {
    'A': ('.X.', 'X.X', 'XXX', 'X.X', 'X.X'),
    'C': ('.XX', 'X..', 'X..', 'X..', '.XX'),
    'J': ('..X', '..X', '..X', 'X.X', '.X.'),
    'L': ('X..', 'X..', 'X..', 'X..', 'XXX'),
    'X': ('X.X', 'X.X', '.X.', 'X.X', 'X.X'),
    '4': ('X.X', 'X.X', 'XXX', '..X', '..X'),
}

_SHAPE_ROWS = {
    'square': ('XXXX', 'XXXX', 'XXXX', 'XXXX'),
    'circle': ('.XX.', 'XXXX', 'XXXX', '.XX.'),
    'triangle': ('X...', 'XX..', 'XXX.', 'XXXX'),
}


def _bitmap(rows: tuple[str, ...]) -> np.ndarray:
  return np.array([[ch == 'X' for ch in row] for row in rows], dtype=bool)


FONT = {ch: _bitmap(rows) for ch, rows in _FONT_ROWS.items()}
SHAPE_MASKS = {name: _bitmap(rows) for name, rows in _SHAPE_ROWS.items()}
# Templates stacked in GLYPHS order: float32 [num_glyphs, GLYPH_H, GLYPH_W].
GLYPH_TEMPLATES = np.stack([FONT[ch] for ch in lexicon.GLYPHS]).astype(np.float32)

MIN_GLYPH_DISTANCE = 4


def _check() -> None:
  """Fails at import if the tables drift out of sync with the lexicon."""
  if set(FONT) != set(lexicon.GLYPHS):
    raise AssertionError('FONT must cover exactly lexicon.GLYPHS')
  if set(SHAPE_MASKS) != set(lexicon.SHAPES):
    raise AssertionError('SHAPE_MASKS must cover exactly lexicon.SHAPES')
  for a, b in itertools.combinations(lexicon.GLYPHS, 2):
    if (FONT[a] != FONT[b]).sum() < MIN_GLYPH_DISTANCE:
      raise AssertionError(f'glyphs {a!r} and {b!r} are too similar to read reliably')


_check()


def text_width(num_chars: int) -> int:
  """Pixel width of a string of `num_chars` glyphs (no trailing gap)."""
  return max(0, num_chars * GLYPH_PITCH - 1)
