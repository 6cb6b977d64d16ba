"""GenEval's colour classifier: CLIP ViT-L/14 zero-shot over `geneval.COLORS` on each object's crop.

What GenEval runs (djghosh13/geneval `evaluation/evaluate_images.py`, with its pinned
open-clip-torch 2.20, clip-benchmark 1.4, torchvision 0.13, Pillow 9.4; spec §3):

  classifier of a class name (cached per name): for each colour c, the three COLOR_TEMPLATES
      → text embeddings, each L2-normalised, averaged, renormalised → W [10, D]
      (clip_benchmark's `zero_shot_classifier`)
  crop of an object: `geneval.color_crop` (mask onto #999, cut to the box)
  image preprocessing (open_clip's `preprocess_val` for ViT-L-14 / openai): PIL bicubic resize
      of the shorter side to 224 (longer side int(224·long/short); no resize when the shorter
      side is already 224), centre crop 224 at round((n − 224)/2) (torchvision's CenterCrop,
      half to even), ToTensor (float32 u / 255), OpenAI mean/std in float32
  colour = COLORS[argmax_c 100·normalise(image embedding)·W_c] (`run_classification`)

`preprocess_crop` is that recipe on host (PIL + numpy, per crop: crops come in every size, so a
jitted resize would recompile for each). It differs from `rewards.preprocess`'s 'aesthetic'
path, which crops at ⌊(n − 224)/2⌋ and rescales with transformers' float64 1/255; Pillow ≥ 13
would also resample portraits taller than 2:1 vertically first, so the resize runs as two
one-axis calls (horizontal, then vertical), the order of upstream's Pillow 9.4 — the crop is
then exactly upstream's. The towers run in float32 (`dtype` = bfloat16 optional); upstream's
`run_classification` runs under CUDA fp16 autocast (clip_benchmark's default amp=True), so
near-ties between two colours can resolve differently there. HF's openai/clip-vit-large-patch14
is open_clip's 'openai' ViT-L-14 (QuickGELU, text pooled at the largest id), and its tokenizer
the same BPE (module docstring of `rewards.clip_rewards` for padding).

One deliberate difference: a box that rounds to zero width or height (upstream's crop would be
empty and its resize fail) is classified from a single #999 background pixel.
"""

from __future__ import annotations

import functools
import os
from typing import Any, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from opd_jax.errors import ConfigError, InputError
from opd_jax.eval import geneval
from opd_jax.models.clip import CLIPModel, l2_normalize
from opd_jax.models.loading.clip_weights import load_clip
from opd_jax.rewards import clip_rewards
from opd_jax.rewards.preprocess import (OPENAI_MEAN, OPENAI_STD, SIZE, crop_start_round,
                                        shortest_edge_size)

LOGIT_SCALE = 100.0   # clip_benchmark's fixed scale (does not change the argmax)


def preprocess_crop(crop: np.ndarray) -> np.ndarray:
  """open_clip's `preprocess_val` of a uint8 crop [h, w, 3] → normalised float32 [224, 224, 3]."""
  crop = np.asarray(crop)
  if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
    raise InputError(f'crop: expected uint8 [H, W, 3], got {crop.dtype} {crop.shape}')
  if crop.shape[0] == 0 or crop.shape[1] == 0:
    crop = np.full((1, 1, 3), geneval.CROP_BACKGROUND, np.uint8)
  height, width = crop.shape[:2]
  new_h, new_w = shortest_edge_size(height, width)
  if min(height, width) != SIZE:
    bicubic = Image.Resampling.BICUBIC
    image = Image.fromarray(crop).resize((new_w, height), bicubic)    # horizontal pass
    crop = np.asarray(image.resize((new_w, new_h), bicubic))          # vertical pass
  else:
    new_h, new_w = height, width
  top, left = crop_start_round(new_h, SIZE), crop_start_round(new_w, SIZE)
  x = crop[top:top + SIZE, left:left + SIZE].astype(np.float32) / np.float32(255)
  return (x - np.asarray(OPENAI_MEAN, np.float32)) / np.asarray(OPENAI_STD, np.float32)


@jax.jit
def _image_embeddings(graphdef, state, pixels):
  """L2-normalised image embeddings [N, D] of normalised pixels [N, 224, 224, 3]."""
  return l2_normalize(nnx.merge(graphdef, state).get_image_features(pixels))


@functools.partial(jax.jit, static_argnames=('templates',))
def _class_weights(graphdef, state, input_ids, attention_mask, templates):
  """Zero-shot weights [classes, D] of the texts [classes·templates, T], class-major: per class
  the mean of its templates' normalised embeddings, renormalised."""
  text = l2_normalize(nnx.merge(graphdef, state).get_text_features(input_ids, attention_mask))
  return l2_normalize(text.reshape(-1, templates, text.shape[-1]).mean(axis=1))


class CLIPColorClassifier:
  """A `geneval.ColorClassifier`: `classifier(image, objects, class name) -> colour names`."""

  def __init__(self, clip: CLIPModel, tokenizer, *, batch_size: int = 16):
    if clip.config.parts != ('text', 'vision'):
      raise ValueError(f'a two-tower CLIP model is needed, got {list(clip.config.parts)}')
    self.batch_size = batch_size
    self._graphdef, self._state = nnx.split(clip)
    self._tokenizer = tokenizer
    self._length = clip.config.text.max_position_embeddings
    self._weights: dict[str, np.ndarray] = {}

  def class_weights(self, cls: str) -> np.ndarray:
    """float32 [len(COLORS), D]: the zero-shot classifier of class name `cls` (cached)."""
    if cls not in self._weights:
      texts = [text for per_colour in geneval.color_prompts(cls) for text in per_colour]
      ids, mask = clip_rewards.tokenize(self._tokenizer, texts, self._length)
      self._weights[cls] = np.asarray(_class_weights(
          self._graphdef, self._state, ids, mask, templates=len(geneval.COLOR_TEMPLATES)))
    return self._weights[cls]

  def image_embeddings(self, pixels: np.ndarray) -> np.ndarray:
    """Normalised embeddings float32 [N, D] of preprocessed crops [N, 224, 224, 3], run in
    batches of `batch_size` (the last one padded by repeating its last crop)."""
    out = []
    for start in range(0, len(pixels), self.batch_size):
      chunk = pixels[start:start + self.batch_size]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - len(chunk), 0)])
      out.append((_image_embeddings(self._graphdef, self._state, padded), len(chunk)))
    return np.concatenate([np.asarray(e)[:rows] for e, rows in out])

  def logits(self, image: np.ndarray, objects: Sequence[geneval.DetectedObject],
             cls: str) -> np.ndarray:
    """float32 [len(objects), len(COLORS)]: 100·cos(crop embedding, colour weights)."""
    pixels = np.stack([preprocess_crop(geneval.color_crop(image, obj)) for obj in objects])
    return LOGIT_SCALE * self.image_embeddings(pixels) @ self.class_weights(cls).T

  def __call__(self, image: np.ndarray, objects: Sequence[geneval.DetectedObject],
               cls: str) -> List[str]:
    if not objects:
      return []
    return [geneval.COLORS[i] for i in np.argmax(self.logits(image, objects, cls), axis=1)]


def clip_color_classifier(clip_folder: str | os.PathLike, *, dtype: Any = jnp.float32,
                          batch_size: int = 16,
                          tokenizer_folder: str | os.PathLike | None = None
                          ) -> CLIPColorClassifier:
  """GenEval's colour classifier from a transformers openai/clip-vit-large-patch14 folder.

  Args:
    clip_folder: the CLIP-L/14 CLIPModel folder (its tokenizer files too, unless
      `tokenizer_folder` holds them).
    dtype: compute dtype of the towers' matmuls.
    batch_size: crops per image-tower call (the compiled shape).
    tokenizer_folder: where the CLIP tokenizer is, if not in `clip_folder`.

  Raises:
    InputError: a missing folder or tokenizer, unreadable weights, a one-tower model.
    ConfigError: a batch_size that is not a positive integer.
  """
  folder = os.fspath(clip_folder)
  if not os.path.isdir(folder):
    raise InputError(f'{folder}: no such directory (the GenEval colour classifier\'s CLIP)')
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ConfigError(f'batch_size: expected a positive integer, got {batch_size!r}')
  folders = {'clip': folder}
  if tokenizer_folder is not None:
    folders[clip_rewards.TOKENIZER_KEY] = os.fspath(tokenizer_folder)
  tokenizer_dir = clip_rewards.tokenizer_folder(folders, 'clip')
  clip = load_clip(folder, dtype=dtype)
  if clip.config.parts != ('text', 'vision'):
    raise InputError(f'{folder}: the colour classifier needs a two-tower CLIPModel, this folder '
                     f'has {list(clip.config.parts)}')
  tokenizer = clip_rewards.load_tokenizer(tokenizer_dir, clip.config.text)
  return CLIPColorClassifier(clip, tokenizer, batch_size=batch_size)
