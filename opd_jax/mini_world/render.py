"""Numpy renderer of the mini world: ground-truth images and deliberately imperfect ones.

Every image is IMAGE_SIZE × IMAGE_SIZE RGB. 16 pixels suffice for all three tasks: the longest
text (3 glyphs of 3×5 on a 4-pixel pitch) is 11 pixels wide, and up to four 4×4 objects fit in
non-touching cells of the 4×4 grid; 32 pixels would quadruple the diffusion model's cost on a
CPU for no gain in what the tasks can express.

`render` draws a correct image; nuisance factors (background tint and brightness, colour
jitter, palette jitter, gradient centre and gamma)
are randomised so a prompt denotes a distribution of images, not one image.

`render_imperfect` is how the base model is made deliberately imperfect (the way SD3.5-M scores
0.63 GenEval / 0.59 OCR, spec §6): with probability `corrupt_prob` (default CORRUPT_PROB = 0.5)
the pretraining image is only partly correct for its prompt:
- composition: one error among wrong count, wrong colour or shape of one object, a missing
  object, or the mirrored spatial relation;
- text: the string garbled by 1-2 edits (substitute, delete, insert, swap neighbours);
- aesthetics: middling quality: 1-2 of blocky texture noise, a muddy or hue-shifted palette,
  the wrong pattern or reversed endpoints.
A model fit to this data reproduces the mixture and so starts below the ceiling on every reward,
leaving RL teachers room to improve.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from opd_jax.mini_world import grammar
from opd_jax.mini_world import lexicon
from opd_jax.mini_world import sprites

IMAGE_SIZE = 16
CORRUPT_PROB = 0.5
# Objects are drawn in the cells of this grid: the DiT's 4×4-pixel patches (see sprites).
CELL = 4
# The top row of the text line.
TEXT_ROW = 4

SpecOrPrompt = Union[grammar.Spec, str]


def _as_spec(spec_or_prompt: SpecOrPrompt) -> grammar.Spec:
  if isinstance(spec_or_prompt, str):
    return grammar.parse(spec_or_prompt)
  return spec_or_prompt


def to_uint8(image: np.ndarray) -> np.ndarray:
  """Converts a float image in [0, 1] to uint8 (clipping out-of-range values)."""
  return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


# --- composition -----------------------------------------------------------------------------
# Where objects go, in cells (row, column) of the CELL × CELL grid: one fixed layout per object
# count, and one per relation for position prompts (object 0 is `rel` of object 1). No two
# cells of a layout touch (diagonals included), so each object is its own connected component
# even on a blurry sample, and a relation's two cells are a cell apart (CELL pixels > the
# reward's 2-pixel threshold).
# Mini world v3 fixed the layout: with objects in random non-touching cells the base's 16
# patch tokens did not coordinate where objects go (on the v2 base at CFG 3, 36 % of
# composition samples held objects in neighbouring cells and 40 % an object too many,
# benchmarks/results/composition_errors_v2.md), and no RL teacher improved composition.
# The composition reward does not check the layout: any arrangement that satisfies the prompt
# scores 1, as in GenEval.
SLOTS = {
    0: (),
    1: ((1, 1),),
    2: ((0, 0), (2, 2)),
    3: ((0, 0), (0, 2), (2, 1)),
    4: ((0, 0), (0, 2), (2, 0), (2, 2)),
}
RELATION_SLOTS = {
    'left': ((1, 0), (1, 2)),
    'right': ((1, 2), (1, 0)),
    'above': ((0, 1), (2, 1)),
    'below': ((2, 1), (0, 1)),
}


def _place(num: int, relation: str | None) -> np.ndarray:
  """Top-left pixel corners [num, 2] (y, x) of `num` objects: their layout's cells × CELL.

  Args:
    num: how many objects (0-4).
    relation: for two objects of a position prompt, where object 0 is relative to object 1
      (a key of RELATION_SLOTS); None for the count's own layout.
  """
  cells = RELATION_SLOTS[relation] if relation is not None else SLOTS[num]
  if len(cells) != num:
    raise ValueError(f'no layout for {num} objects with relation {relation!r}')
  return CELL * np.array(cells, np.int64).reshape(num, 2)


def _draw_objects(objects: Sequence[tuple[str, str]], relation: str | None,
                  rng: np.random.Generator) -> np.ndarray:
  """Draws (colour, shape) objects on a neutral grey background; returns float32 [S, S, 3]."""
  grey = rng.uniform(0.2, 0.7)
  background = np.clip(grey + rng.uniform(-0.04, 0.04, 3), 0, 1)
  image = np.broadcast_to(background, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  corners = _place(len(objects), relation)
  size = sprites.OBJECT_SIZE
  for (color, shape), (y, x) in zip(objects, corners):
    rgb = np.clip(np.asarray(lexicon.COLORS[color]) + rng.uniform(-0.06, 0.06, 3), 0, 1)
    patch = image[y:y + size, x:x + size]
    patch[sprites.SHAPE_MASKS[shape]] = rgb
  return image


def _instances(spec: grammar.CompositionSpec) -> list[tuple[str, str]]:
  return [(g.color, g.shape) for g in spec.objects for _ in range(g.count)]


def _composition(spec: grammar.CompositionSpec, rng: np.random.Generator,
                 corrupt: bool) -> np.ndarray:
  objects = _instances(spec)
  relation = spec.relation if spec.kind == 'position' else None
  if corrupt:
    errors = ['color', 'shape']
    errors += {'single': ['missing'], 'counting': ['count'], 'two_object': ['missing'],
               'position': ['missing', 'relation']}[spec.kind]
    error = errors[rng.integers(len(errors))]
    k = int(rng.integers(len(objects)))
    if error == 'color':
      color = objects[k][0]
      others = [c for c in lexicon.COLORS if c != color]
      objects[k] = (others[rng.integers(len(others))], objects[k][1])
    elif error == 'shape':
      shape = objects[k][1]
      others = [s for s in lexicon.SHAPES if s != shape]
      objects[k] = (objects[k][0], others[rng.integers(len(others))])
    elif error == 'missing':
      # An empty canvas for single objects; otherwise drop one of the two objects.
      del objects[k]
      relation = None
    elif error == 'count':
      n = len(objects)
      wrong = [m for m in (n - 1, n + 1) if 1 <= m <= 4]
      objects = [objects[0]] * wrong[rng.integers(len(wrong))]
    else:  # 'relation': draw the mirrored arrangement
      relation = lexicon.OPPOSITE_RELATION[spec.relation]
  return _draw_objects(objects, relation, rng)


# --- text ------------------------------------------------------------------------------------
def _draw_text(text: str, rng: np.random.Generator) -> np.ndarray:
  """Draws dark glyphs on a light tinted background; returns float32 [S, S, 3].

  Text is a left-aligned line (glyph k in columns 4k..4k+2, patch column k) with its top row
  at TEXT_ROW. A free horizontal position made the task unlearnable for the base: the DiT must
  bind the k-th glyph token to an image column, and with the line anywhere that binding never
  formed within a CPU-sized pretraining budget (held-out text reward stayed at chance, ~0.08);
  with the row varying over 4-7 (and twelve glyphs) the base still got only about a fifth of
  its glyphs right after 10000 steps (an exploratory measurement).
  The OCR reward itself still reads text at any position.
  """
  background = np.clip(rng.uniform(0.7, 0.95) + rng.uniform(-0.05, 0.05, 3), 0, 1)
  image = np.broadcast_to(background, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  ink = rng.uniform(0.0, 0.25, 3)
  y0 = TEXT_ROW
  x0 = 0
  for i, ch in enumerate(text):
    x = x0 + i * sprites.GLYPH_PITCH
    cell = image[y0:y0 + sprites.GLYPH_H, x:x + sprites.GLYPH_W]
    cell[sprites.FONT[ch]] = np.clip(ink + rng.uniform(-0.03, 0.03, 3), 0, 1)
  return image


def garble(text: str, rng: np.random.Generator, num_edits: int) -> str:
  """Applies `num_edits` random edits, keeping 1..MAX_TEXT_LEN glyphs and changing the string.

  Args:
    text: the glyph string.
    rng: random generator.
    num_edits: how many substitute / delete / insert / swap edits to apply.
  """
  glyphs = lexicon.GLYPHS
  while True:
    out = list(text)
    for _ in range(num_edits):
      ops = ['substitute']
      ops += ['delete'] if len(out) > 1 else []
      ops += ['insert'] if len(out) < lexicon.MAX_TEXT_LEN else []
      ops += ['swap'] if len(out) > 1 else []
      op = ops[rng.integers(len(ops))]
      i = int(rng.integers(len(out)))
      if op == 'substitute':
        out[i] = glyphs[rng.integers(len(glyphs))]
      elif op == 'delete':
        del out[i]
      elif op == 'insert':
        out.insert(int(rng.integers(len(out) + 1)), glyphs[rng.integers(len(glyphs))])
      else:
        j = i + 1 if i + 1 < len(out) else i - 1
        out[i], out[j] = out[j], out[i]
    if ''.join(out) != text:
      return ''.join(out)


# --- aesthetics ------------------------------------------------------------------------------
def pattern_field(pattern: str, center_offset: Sequence[float] = (0.0, 0.0),
                  gamma: float = 1.0) -> np.ndarray:
  """Blend weights t in [0, 1], float32 [S, S]: 0 shows the first palette colour, 1 the second.

  Args:
    pattern: 'gradient' (top to bottom), 'fade' (left to right), 'glow' (centre to corners) or
      'wash' (top-left to bottom-right).
    center_offset: (dy, dx) pixel shift of the pattern (a nuisance factor).
    gamma: t ** gamma reshapes the blend (a nuisance factor).
  """
  s = IMAGE_SIZE
  y, x = np.meshgrid(np.arange(s, dtype=np.float32) + 0.5, np.arange(s, dtype=np.float32) + 0.5,
                     indexing='ij')
  y = y - center_offset[0]
  x = x - center_offset[1]
  if pattern == 'gradient':
    t = y / s
  elif pattern == 'fade':
    t = x / s
  elif pattern == 'glow':
    t = np.hypot(y - s / 2, x - s / 2) / (s / np.sqrt(2))
  elif pattern == 'wash':
    t = (x + y) / (2 * s)
  else:
    raise ValueError(f'unknown pattern {pattern!r}')
  return np.clip(t, 0.0, 1.0) ** gamma


def aesthetic_target(spec: grammar.AestheticsSpec) -> np.ndarray:
  """The ideal (nuisance-free) image of an aesthetics prompt, float32 [S, S, 3]."""
  first, second = lexicon.palette_endpoints(spec.mood, spec.palette)
  t = pattern_field(spec.pattern)[..., None]
  return (first + (second - first) * t).astype(np.float32)


def _aesthetics(spec: grammar.AestheticsSpec, rng: np.random.Generator,
                corrupt: bool) -> np.ndarray:
  first, second = lexicon.palette_endpoints(spec.mood, spec.palette)
  first = first + rng.normal(0, 0.025, 3)
  second = second + rng.normal(0, 0.025, 3)
  pattern = spec.pattern
  defects = set()
  if corrupt:
    names = ['texture', 'palette', 'pattern']
    defects = set(rng.choice(names, size=rng.integers(1, 3), replace=False))
  if 'pattern' in defects:
    if rng.random() < 0.5:
      others = [p for p in lexicon.PATTERNS if p != pattern]
      pattern = others[rng.integers(len(others))]
    else:
      first, second = second, first
  if 'palette' in defects:
    if rng.random() < 0.5:  # muddy: pull both colours toward their grey
      w = rng.uniform(0.5, 0.8)
      first, second = ((1 - w) * c + w * c.mean() for c in (first, second))
    else:  # hue shift: rotate the RGB channels
      shift = int(rng.integers(1, 3))
      first, second = np.roll(first, shift), np.roll(second, shift)
  t = pattern_field(pattern, rng.uniform(-1.5, 1.5, 2), np.exp(rng.uniform(-0.2, 0.2)))[..., None]
  image = first + (second - first) * t
  if 'texture' in defects:
    block = IMAGE_SIZE // 4
    blotches = rng.normal(0, rng.uniform(0.06, 0.15), (4, 4, 3))
    image = image + np.repeat(np.repeat(blotches, block, 0), block, 1)
    image = image + rng.normal(0, rng.uniform(0.02, 0.05), image.shape)
  return np.clip(image, 0, 1).astype(np.float32)


# --- entry points ----------------------------------------------------------------------------
def _render_float(spec: grammar.Spec, rng: np.random.Generator, corrupt: bool) -> np.ndarray:
  if isinstance(spec, grammar.CompositionSpec):
    return _composition(spec, rng, corrupt)
  if isinstance(spec, grammar.TextSpec):
    text = garble(spec.text, rng, int(rng.integers(1, 3))) if corrupt else spec.text
    return _draw_text(text, rng)
  return _aesthetics(spec, rng, corrupt)


def render(spec_or_prompt: SpecOrPrompt, rng: np.random.Generator) -> np.ndarray:
  """Renders a correct image for a prompt of any task.

  Args:
    spec_or_prompt: a grammar prompt or its parsed spec.
    rng: random generator for the nuisance factors.

  Returns:
    uint8 [IMAGE_SIZE, IMAGE_SIZE, 3].
  """
  return to_uint8(_render_float(_as_spec(spec_or_prompt), rng, corrupt=False))


def render_imperfect(spec_or_prompt: SpecOrPrompt, rng: np.random.Generator,
                     corrupt_prob: float = CORRUPT_PROB) -> tuple[np.ndarray, bool]:
  """Renders a pretraining image that is wrong for its prompt with probability `corrupt_prob`.

  Args:
    spec_or_prompt: a grammar prompt or its parsed spec.
    rng: random generator.
    corrupt_prob: probability of drawing a corrupted (partly wrong / middling) image.

  Returns:
    (uint8 [IMAGE_SIZE, IMAGE_SIZE, 3], whether the image was corrupted).
  """
  corrupt = bool(rng.random() < corrupt_prob)
  return to_uint8(_render_float(_as_spec(spec_or_prompt), rng, corrupt)), corrupt


def render_batch(prompts: Sequence[str], rng: np.random.Generator) -> np.ndarray:
  """Renders correct images for a batch of prompts as float32 NHWC in [0, 1] (reward input)."""
  return np.stack([render(p, rng) for p in prompts]).astype(np.float32) / 255.0
