"""Input checking shared by the mini-world rewards.

Rewards take float NHWC images in [0, 1] and prompts as str (bytes, as read back from TFDS, are
decoded). Out-of-range values are clipped: generated images overshoot slightly and a reward
should score what would be displayed.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from opd_jax.mini_world import render


def check_images(images: np.ndarray, prompts: Sequence[Union[str, bytes]]
                 ) -> tuple[np.ndarray, list[str]]:
  """Validates a reward call's arguments.

  Args:
    images: float [B, IMAGE_SIZE, IMAGE_SIZE, 3] in [0, 1].
    prompts: B prompts.

  Returns:
    (float32 images clipped to [0, 1], prompts as str).
  """
  images = np.asarray(images)
  size = render.IMAGE_SIZE
  if images.ndim != 4 or images.shape[1:] != (size, size, 3):
    raise ValueError(f'expected images [B, {size}, {size}, 3], got {images.shape}')
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'expected float images in [0, 1], got dtype {images.dtype}')
  if len(prompts) != images.shape[0]:
    raise ValueError(f'{images.shape[0]} images but {len(prompts)} prompts')
  prompts = [p.decode() if isinstance(p, bytes) else p for p in prompts]
  return np.clip(images, 0.0, 1.0).astype(np.float32), prompts
