"""Composition reward (GenEval-like): a rule-based object detector checks the prompt's spec.

Detection, vectorised over the batch:
1. Background = per-image median colour (objects cover well under half the pixels).
2. Each pixel takes the nearest of {background, the five object colours}; it counts as colour c
   only if c wins and lies within COLOR_TOLERANCE of c's RGB.
3. 4-connected components per (image, colour), by min-label propagation with pointer jumping.
4. Components smaller than MIN_AREA pixels are noise. Shape from two measurements (see
   sprites): top/bottom mass ratio < TRIANGLE_RATIO -> triangle; else fill ratio >=
   SQUARE_FILL -> square; else circle. Position = centroid.

Scoring follows GenEval's rules, with one addition the mini world needs: a prompt describes the
whole scene. GenEval checks that each named object is present (counting: exactly that many);
here every named group must also appear exactly as often as the prompt says ("a" = once) and no
unnamed object may be drawn. Without that, presence checks reward drawing every object: on the
v2 base a Flow-GRPO composition teacher fell from 0.33 to 0.16 strict accuracy on train prompts
(benchmarks/results/teacher_settings_composition_presence_reward.md), most of its images holding
several extra objects. Position compares the centroids of the largest detection of each object
and needs a difference of more than RELATION_THRESHOLD pixels along the named axis.
`composition_reward` (the RL reward) gives partial credit: the fraction of the prompt's checks
that hold (per group: present, exactly its count; something drawn and nothing unnamed;
position: the relation). `composition_strict` is the all-or-nothing accuracy, the metric to
report.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from opd_jax.mini_world import grammar
from opd_jax.mini_world import lexicon
from opd_jax.rewards import _inputs

COLOR_NAMES = tuple(lexicon.COLORS)
_COLOR_RGB = np.array([lexicon.COLORS[c] for c in COLOR_NAMES], np.float32)  # [C, 3]
COLOR_TOLERANCE = 0.35
MIN_AREA = 6
TRIANGLE_RATIO = 0.7
SQUARE_FILL = 0.92
RELATION_THRESHOLD = 2.0


@dataclasses.dataclass(frozen=True)
class Detections:
  """Objects found in a batch, one row per object.

  Attributes:
    image: int [K], which image of the batch.
    color: int [K], index into COLOR_NAMES.
    shape: int [K], index into lexicon.SHAPES.
    area: int [K], pixels.
    cy, cx: float [K], centroid (row, column) in pixels.
  """
  image: np.ndarray
  color: np.ndarray
  shape: np.ndarray
  area: np.ndarray
  cy: np.ndarray
  cx: np.ndarray


def color_masks(images: np.ndarray) -> np.ndarray:
  """Per-colour pixel masks, bool [B, C, H, W] (C = len(COLOR_NAMES))."""
  background = np.median(images.reshape(images.shape[0], -1, 3), axis=1)  # [B, 3]
  prototypes = np.concatenate(
      [np.broadcast_to(background[:, None], (len(images), 1, 3)),
       np.broadcast_to(_COLOR_RGB[None], (len(images), len(COLOR_NAMES), 3))], axis=1)
  # Distances [B, H, W, 1 + C] from each pixel to the background and each colour.
  dist = np.linalg.norm(images[:, :, :, None, :] - prototypes[:, None, None], axis=-1)
  nearest = dist.argmin(-1)
  masks = [(nearest == c + 1) & (dist[..., c + 1] < COLOR_TOLERANCE)
           for c in range(len(COLOR_NAMES))]
  return np.stack(masks, axis=1)


def label_components(mask: np.ndarray) -> np.ndarray:
  """4-connected component labels of a stack of binary masks.

  Args:
    mask: bool [N, H, W].

  Returns:
    int64 [N, H, W]: each foreground pixel holds the smallest flat index of its component;
    background pixels hold mask.size.
  """
  none = mask.size
  flat_index = np.arange(mask.size).reshape(mask.shape)
  labels = np.where(mask, flat_index, none)
  while True:
    new = labels.copy()
    new[:, 1:] = np.minimum(new[:, 1:], labels[:, :-1])
    new[:, :-1] = np.minimum(new[:, :-1], labels[:, 1:])
    new[:, :, 1:] = np.minimum(new[:, :, 1:], labels[:, :, :-1])
    new[:, :, :-1] = np.minimum(new[:, :, :-1], labels[:, :, 1:])
    new = np.where(mask, new, none)
    # Pointer jumping: a label is the index of a pixel of the same component, whose own label
    # is at least as small, so following it shortens propagation to ~log(diameter) rounds.
    padded = np.append(new.ravel(), none)
    new = np.where(mask, padded[new], none)
    if np.array_equal(new, labels):
      return labels
    labels = new


def detect(images: np.ndarray) -> Detections:
  """Finds coloured objects and their shapes and centroids.

  Args:
    images: float32 [B, H, W, 3] in [0, 1].
  """
  b, h, w, _ = images.shape
  masks = color_masks(images).reshape(b * len(COLOR_NAMES), h, w)
  labels = label_components(masks)
  fg = labels < labels.size
  plane, ys, xs = np.nonzero(fg)
  uniq, comp = np.unique(labels[fg], return_inverse=True)
  k = len(uniq)
  area = np.bincount(comp, minlength=k)
  cy = np.bincount(comp, ys, minlength=k) / np.maximum(area, 1)
  cx = np.bincount(comp, xs, minlength=k) / np.maximum(area, 1)
  y0 = np.full(k, h)
  y1 = np.full(k, -1)
  x0 = np.full(k, w)
  x1 = np.full(k, -1)
  np.minimum.at(y0, comp, ys)
  np.maximum.at(y1, comp, ys)
  np.minimum.at(x0, comp, xs)
  np.maximum.at(x1, comp, xs)
  mid = (y0 + y1) / 2.0
  top = np.bincount(comp, ys < mid[comp], minlength=k)
  bottom = np.bincount(comp, ys > mid[comp], minlength=k)
  fill = area / ((y1 - y0 + 1) * (x1 - x0 + 1))
  shape = np.where(top < TRIANGLE_RATIO * bottom, lexicon.SHAPES.index('triangle'),
                   np.where(fill >= SQUARE_FILL, lexicon.SHAPES.index('square'),
                            lexicon.SHAPES.index('circle')))
  # The component's plane (image * C + colour) is its label's leading index.
  image, color = np.divmod(uniq // (h * w), len(COLOR_NAMES))
  keep = area >= MIN_AREA
  return Detections(image[keep], color[keep], shape[keep], area[keep], cy[keep], cx[keep])


def _relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
  """Whether centroid a = (y, x) is `rel` of centroid b."""
  dy, dx = a[0] - b[0], a[1] - b[1]
  return {'left': dx < -RELATION_THRESHOLD, 'right': dx > RELATION_THRESHOLD,
          'above': dy < -RELATION_THRESHOLD, 'below': dy > RELATION_THRESHOLD}[rel]


def constraints(spec: grammar.CompositionSpec, det: Detections, index: int) -> list[bool]:
  """The list of GenEval-style checks of `spec` on image `index` (see module docstring)."""
  in_image = det.image == index
  found = []  # per group: (number matching, centroid of the largest match)
  for group in spec.objects:
    match = in_image & (det.color == COLOR_NAMES.index(group.color)) & (
        det.shape == lexicon.SHAPES.index(group.shape))
    n = int(match.sum())
    centroid = None
    if n:
      best = np.flatnonzero(match)[np.argmax(det.area[match])]
      centroid = (det.cy[best], det.cx[best])
    found.append((n, centroid))
  checks = [n >= 1 for n, _ in found]
  checks += [n == group.count for (n, _), group in zip(found, spec.objects)]
  # No unnamed object (and something drawn: an empty canvas earns no credit for it).
  total = int(in_image.sum())
  checks.append(total > 0 and total == sum(n for n, _ in found))
  if spec.kind == 'position':
    (_, a), (_, b) = found
    checks.append(a is not None and b is not None and _relation_holds(spec.relation, a, b))
  return checks


def _scores(images: np.ndarray, prompts: Sequence[str], strict: bool) -> np.ndarray:
  images, prompts = _inputs.check_images(images, prompts)
  det = detect(images)
  out = np.zeros(len(prompts), np.float32)
  for i, prompt in enumerate(prompts):
    spec = grammar.parse(prompt)
    if not isinstance(spec, grammar.CompositionSpec):
      raise ValueError(f'not a composition prompt: {prompt!r}')
    checks = constraints(spec, det, i)
    out[i] = float(all(checks)) if strict else np.mean(checks)
  return out


def composition_reward(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """Fraction of the prompt's constraints the image satisfies (dense RL reward).

  Args:
    images: float [B, H, W, 3] in [0, 1].
    prompts: B composition prompts.

  Returns:
    float32 [B] in [0, 1].
  """
  return _scores(images, prompts, strict=False)


def composition_strict(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """GenEval accuracy: 1 if every constraint holds, else 0 (the metric to report).

  Args:
    images: float [B, H, W, 3] in [0, 1].
    prompts: B composition prompts.

  Returns:
    float32 [B] in {0, 1}.
  """
  return _scores(images, prompts, strict=True)
