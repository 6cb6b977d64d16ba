"""Reward-model image preprocessing: the host path against transformers' CLIPImageProcessorPil
and torch's interpolate (torchvision's tensor resize), the JAX path against the host path."""

import jax
import numpy as np
import PIL
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from opd_jax.errors import InputError
from opd_jax.rewards import preprocess as pp

MEAN = torch.tensor(pp.OPENAI_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(pp.OPENAI_STD).view(1, 3, 1, 1)
# (batch, height, width): square downsampling, non-square with an odd crop margin (500×384 →
# shortest edge 291×224: transformers crops from row 33, torchvision from row 34), upsampling.
SHAPES = [(1, 512, 512), (1, 500, 384), (2, 64, 64)]
# A portrait taller than 2:1, which Pillow >= 13 resamples vertically first (upstream: Pillow 10.4).
TALL = (1, 700, 300)
PILLOW_13 = int(PIL.__version__.split('.')[0]) >= 13


def _images(b, h, w, seed=0):
  """Smooth gradients, a hard-edged block and pixel noise, float32 off the uint8 grid."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing='ij')
  base = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], -1)
  out = np.repeat(base[None], b, 0) * 0.7 + 0.3 * rng.random((b, h, w, 3))
  out[:, h // 4:h // 2, w // 3:w // 2] = rng.random((b, 1, 1, 3))
  return out.astype(np.float32)


@pytest.fixture(scope='module')
def images():
  return {shape: _images(*shape) for shape in SHAPES + [TALL]}


def test_to_uint8_rounds_like_torch():
  """(x·255).round().clamp(0, 255): float32 product, ties to even, clipped."""
  ties = (np.arange(256, dtype=np.float32) + 0.5) / np.float32(255)
  x = np.concatenate([ties, [-0.1, 1.2, 0.0, 1.0], np.random.default_rng(1).random(500)])
  x = x.astype(np.float32)
  expected = (torch.from_numpy(x) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
  np.testing.assert_array_equal(pp.to_uint8(x), expected)


@pytest.mark.parametrize('shape', SHAPES + [TALL])
def test_host_matches_transformers_pil_processor(images, shape):
  """pickscore / aesthetic host path = CLIPImageProcessorPil on the uint8 PIL images, exactly —
  except for the tall portrait on Pillow >= 13, whose single resize call changed pass order."""
  processor = CLIPImageProcessorPil(
      size={'shortest_edge': 224}, crop_size={'height': 224, 'width': 224}, do_resize=True,
      do_center_crop=True, resample=Image.Resampling.BICUBIC, do_rescale=True,
      rescale_factor=1 / 255, do_normalize=True, image_mean=list(pp.OPENAI_MEAN),
      image_std=list(pp.OPENAI_STD), do_convert_rgb=True)
  x = images[shape]
  pil = [Image.fromarray(u) for u in pp.to_uint8(x)]
  expected = processor(images=pil, return_tensors='np')['pixel_values'].transpose(0, 2, 3, 1)
  for name in ('pickscore', 'aesthetic'):
    got = pp.PREPROCESS[name].host(x)
    assert got.shape == (shape[0], 224, 224, 3) and got.dtype == np.float32
    if shape == TALL and PILLOW_13:
      assert np.abs(got - expected).max() > 0
    else:
      np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize('size_in,size_out', [(512, 224), (384, 224), (298, 224), (1000, 224),
                                              (64, 224), (7, 100)])
def test_resize_matrices_match_torch_interpolate(size_in, size_out):
  """Our weights applied in float64 vs torch's float32 kernel; measured max 6.4e-7 (values ~1)."""
  x = np.random.default_rng(size_in).random((1, 3, 4, size_in)).astype(np.float32)
  for mode in ('bilinear', 'bicubic'):
    for antialias in (True, False):
      expected = torch.nn.functional.interpolate(
          torch.from_numpy(x), size=(4, size_out), mode=mode, antialias=antialias,
          align_corners=False).numpy()
      weights = pp.torch_resize_matrix(size_in, size_out, mode, antialias)
      got = np.einsum('bchw,ow->bcho', x.astype(np.float64), weights)
      assert np.abs(got - expected).max() <= 2e-6, (mode, antialias)


def _torchvision_reference(name, x):
  """Upstream's tensor pipeline written with torch ops and this test's own geometry."""
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  h, w = x.shape[1:3]
  if name == 'clipscore':      # Resize(224) bilinear antialias, CenterCrop(224) round offsets
    size = {(512, 512): (224, 224), (500, 384): (291, 224), (64, 64): (224, 224)}[(h, w)]
    t = torch.nn.functional.interpolate(t, size=size, mode='bilinear', antialias=True,
                                        align_corners=False)
    top = {291: 34, 224: 0}[size[0]]
    t = t[:, :, top:top + 224, :224]
  else:                        # ResizeMaxSize(224): bicubic antialias, zero pad centred
    size = {(512, 512): (224, 224), (500, 384): (224, 172), (64, 64): (224, 224)}[(h, w)]
    t = torch.nn.functional.interpolate(t, size=size, mode='bicubic', antialias=True,
                                        align_corners=False)
    pad_w = 224 - size[1]
    t = torch.nn.functional.pad(t, (pad_w // 2, pad_w - pad_w // 2, 0, 0), value=0.0)
  return ((t - MEAN) / STD).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('shape', SHAPES)
def test_host_matches_torchvision_pipeline(images, shape):
  """clipscore / hpsv2 host path vs torch; measured max 1.8e-6 normalised units."""
  x = images[shape]
  for name in ('clipscore', 'hpsv2'):
    got = pp.PREPROCESS[name].host(x)
    assert got.shape == (shape[0], 224, 224, 3)
    assert np.abs(got - _torchvision_reference(name, x)).max() <= 4e-6, name


@pytest.mark.parametrize('shape', SHAPES + [TALL])
def test_jax_matches_host(images, shape):
  """PIL rewards: bit-identical; float rewards: float32 rounding, measured max 9.5e-7 here and
  1.2e-6 on benchmarks/preprocess_gap.py's 32 images."""
  x = images[shape]
  names = ('pickscore', 'clipscore', 'hpsv2') if shape != TALL else ('pickscore',)
  names += ('aesthetic',) if shape == SHAPES[0] else ()
  for name in names:
    fns = pp.PREPROCESS[name]
    got = np.asarray(jax.jit(fns.jax)(x))
    host = fns.host(x)
    assert got.shape == (shape[0], 224, 224, 3) and got.dtype == np.float32
    if name in ('pickscore', 'aesthetic'):
      np.testing.assert_array_equal(got, host)
    else:
      assert np.abs(got - host).max() <= 2e-6, name
  if shape == (1, 500, 384):   # hpsv2 pads 224×172 with 26 + 26 columns of black
    pad = -np.asarray(pp.OPENAI_MEAN, np.float32) / np.asarray(pp.OPENAI_STD, np.float32)
    out = np.asarray(jax.jit(pp.PREPROCESS['hpsv2'].jax)(x))
    np.testing.assert_allclose(out[:, :, :26], np.broadcast_to(pad, out[:, :, :26].shape),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[:, :, 198:], np.broadcast_to(pad, out[:, :, 198:].shape),
                               rtol=0, atol=1e-6)
    assert np.abs(out[:, :, 26:198] - pad).min() > 1e-3


def test_fixed_point_digits_exact_for_large_inputs():
  """A 2048-pixel axis needs 3 digits; the JAX pass equals Pillow's integer arithmetic."""
  d = pp._pil_digits('pickscore', 2048, 2048, 'rows')
  fixed = pp.pil_fixed_point(pp.plan('pickscore', 2048, 2048).rows)
  assert d.digits.shape[0] == 3
  recombined = sum(d.digits[j].astype(np.int64) << (d.shift * j) for j in range(3))
  np.testing.assert_array_equal(recombined, fixed)
  u = np.random.default_rng(2).integers(0, 256, (1, 2048, 5, 3))
  got = np.asarray(jax.jit(lambda v: pp._pil_pass(v, d, 'bhwc,noh->nbowc'))(u.astype(np.float32)))
  total = np.einsum('bhwc,oh->bowc', u, fixed) + (1 << (pp.PRECISION_BITS - 1))
  np.testing.assert_array_equal(got, np.clip(total >> pp.PRECISION_BITS, 0, 255))


def test_score_gap():
  """Scores of both paths through a stand-in score function (a fixed random projection)."""
  x = _images(3, 40, 48, seed=3)
  w = np.random.default_rng(4).standard_normal((224 * 224 * 3,)).astype(np.float32) / 500

  def score_fn(pixels):
    return np.asarray(pixels).reshape(len(pixels), -1) @ w

  exact = pp.score_gap(score_fn, x, 'pickscore')
  assert exact['max_abs'] == 0.0 and exact['jax_scores'].shape == (3,)
  gap = pp.score_gap(score_fn, x, 'clipscore')
  diff = np.abs(score_fn(jax.jit(pp.PREPROCESS['clipscore'].jax)(x)) -
                score_fn(pp.PREPROCESS['clipscore'].host(x)))
  assert 0 < gap['max_abs'] < 1e-3
  np.testing.assert_allclose(gap['max_abs'], diff.max(), rtol=1e-6)
  np.testing.assert_allclose(gap['mean_abs'], diff.mean(), rtol=1e-6)


def test_errors_name_the_field():
  with pytest.raises(InputError, match=r'^pickscore images: expected float \[B, H, W, 3\]'):
    pp.PREPROCESS['pickscore'].host(np.zeros((2, 64, 64), np.float32))
  with pytest.raises(InputError, match=r'^hpsv2 images: .*uint8'):
    pp.PREPROCESS['hpsv2'].jax(np.zeros((1, 64, 64, 3), np.uint8))
  with pytest.raises(InputError, match=r"^score_gap name: unknown reward 'pick'"):
    pp.score_gap(lambda p: p, np.zeros((1, 8, 8, 3), np.float32), 'pick')
