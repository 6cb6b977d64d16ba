"""The mini world's "VAE": images ↔ latents by rescaling and (optionally) pixel-unshuffling.

There is no learned autoencoder: a latent is the 16×16 RGB image rescaled to [-1, 1], the range
rectified flow's unit-variance noise is matched to, optionally folded into fewer, deeper pixels
(pixel-unshuffle by `unshuffle` = r: [16, 16, 3] → [16/r, 16/r, 3·r²]).

Unshuffling by r and then patchifying by p gives the DiT exactly the tokens of patchifying the
raw image by r·p (the same pixels, in the same order, enter each token), so r only changes how
the latent is laid out for the sampler, not what the model can learn. The configs use r = 1 and
pick the token count with model.patch_size.

Both directions are pure jnp (usable inside jit and on numpy input).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd_jax.mini_world import render

IMAGE_CHANNELS = 3


def latent_shape(unshuffle: int = 1, image_size: int = render.IMAGE_SIZE) -> tuple[int, int, int]:
  """(H, W, C) of the latent of an image_size² RGB image."""
  if image_size % unshuffle:
    raise ValueError(f'unshuffle {unshuffle} does not divide the image size {image_size}')
  s = image_size // unshuffle
  return (s, s, IMAGE_CHANNELS * unshuffle * unshuffle)


def pixel_unshuffle(x: jax.Array, r: int) -> jax.Array:
  """[B, H, W, C] → [B, H/r, W/r, r·r·C]; channel order (dy, dx, c)."""
  if r == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // r, w // r, r * r * c)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
  """Inverse of `pixel_unshuffle`."""
  if r == 1:
    return x
  b, h, w, c = x.shape
  c0 = c // (r * r)
  x = x.reshape(b, h, w, r, r, c0).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * r, w * r, c0)


def encode(images: jax.Array, unshuffle: int = 1) -> jax.Array:
  """Images → latents float32 in [-1, 1].

  Args:
    images: uint8 [B, H, W, 3] (0..255) or float [B, H, W, 3] in [0, 1].
    unshuffle: pixel-unshuffle factor r.
  """
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  return pixel_unshuffle(2.0 * x - 1.0, unshuffle)


def decode(latents: jax.Array, unshuffle: int = 1) -> jax.Array:
  """Latents → float32 images in [0, 1] (clipped: samples overshoot the data range slightly)."""
  x = pixel_shuffle(jnp.asarray(latents, jnp.float32), unshuffle)
  return jnp.clip((x + 1.0) * 0.5, 0.0, 1.0)
