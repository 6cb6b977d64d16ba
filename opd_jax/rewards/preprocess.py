"""Image preprocessing of the real reward models, on device (JAX) and on host (PIL / numpy).

Each reward model scores a 224×224 normalised crop of the generated image (float NHWC in [0, 1],
any size), and each upstream scorer makes that crop its own way. What the paper's evaluation runs
is DiffusionNFT's `scripts/evaluation.py` (NVlabs/DiffusionNFT, `flow_grpo/rewards.multi_score`
on the pipeline's float tensors, torchvision 0.21, transformers 4.40, Pillow 10.4; spec §2, §4):

  pickscore  float → uint8 by round-half-even(255·x) clipped (`(x*255).round().clamp(0, 255)`),
             PIL image → CLIP processor of laion/CLIP-ViT-H-14: PIL bicubic resize of the shortest
             side to 224 (long side int(224·long/short); Pillow 10.4 resamples horizontally, rounds
             to uint8, then vertically), centre crop 224 (offset ⌊(n − 224)/2⌋), x/255, OpenAI
             mean/std. (Pillow ≥ 13 runs the vertical pass first for portraits taller than 2:1,
             which moves pixels by up to ~20 uint8 steps at saturated edges; both paths here keep
             upstream's order, and 512² images are unaffected.)
  aesthetic  the same, with the CLIP processor of openai/clip-vit-large-patch14 (same settings;
             the scorer gets a uint8 tensor, which the processor resizes through PIL all the same).
  clipscore  float tensor, torchvision `Resize(224)` (bilinear, shortest side, antialias=True — the
             tensor default since torchvision 0.17), `CenterCrop(224)` (offset round((n − 224)/2)),
             `Normalize` with OpenAI mean/std. No uint8 step.
  hpsv2      float tensor, HPSv2's `ResizeMaxSize(224)` (longest side to 224, other side
             round(n·224/longest), torchvision tensor bicubic with antialias=True), zero padding
             centred (left/top = ⌊pad/2⌋, fill 0 before normalising), OpenAI mean/std. No uint8
             step. (HPSv2's own pipeline quantises first — PIL → ToTensor — and ran on torchvision
             versions whose tensor resize had no antialias; the numbers of the paper's table come
             from DiffusionNFT's float-tensor copy above.)

Both paths here resample with explicit separable matrices computed on host from the filter
definitions (Pillow `Resample.c`; PyTorch's antialiased `interpolate`, which uses the same
algorithm with PIL's a = −0.5 bicubic; the non-antialiased torch kernels too). Crop and padding
are rows of those matrices (padding = zero rows), so a preprocessing is one [224, H] and one
[224, W] matrix.

* `jax` path, `fn(images float [B, H, W, 3]) -> float32 [B, 224, 224, 3]`, jittable, static
  shapes: for the PIL rewards it reproduces Pillow's 8-bit resampler — coefficients rounded to
  22-bit fixed point, horizontal pass first, each pass rounded and clipped to uint8 — in integer-
  exact arithmetic: the fixed-point matrix is split into base-2^s digits small enough that every
  float32 partial sum (precision HIGHEST, so no TF32/bf16 passes) is an exact integer, recombined
  in int32. The float rewards apply the float32 matrices.
* `host` path, numpy + PIL, the upstream recipe step by step (PIL's own resize for the PIL
  rewards; for the torchvision ones a torch-free numpy equivalent of `F.resize` on tensors).

Measured (benchmarks/results/preprocess_gap.md, 32 structured 512² images): the two paths are
bit-identical for pickscore and aesthetic, and differ by float32 rounding (max 1.2e-6
normalised units) for clipscore and hpsv2 — so the default for the rewards is the `jax` path;
the host path is the reference it is tested against. (`jax.image.resize` would be as good for
the two float rewards, but is 0.29 normalised units — 20 uint8 steps — off at worst, 0.004 on
average, for the two PIL ones: Pillow clips each pass's bicubic overshoot at saturated edges and
rounds to uint8.) `score_gap` turns a pixel gap into a score gap once a reward tower exists.
Inputs outside [0, 1] are clipped by the uint8 step of the PIL rewards and passed through by the
float ones, as upstream. One deliberate difference: upstream HPSv2 leaves an image whose longest
side is already 224 unpadded (which its ViT would then reject); here it is padded to 224×224.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from opd_jax.errors import InputError

SIZE = 224
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISION_BITS = 22            # Pillow's fixed point for 8-bit resampling: 32 − 8 − 2
_EXACT = 1 << 24               # integers below this are exact in float32

# ------------------------------------------------------------------------------------- filters


def keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel W(x); a = −0.5 in Pillow and torch antialias, −0.75 else.

  Evaluated in x's dtype with the operation order of Pillow (float64, its double arithmetic) or
  of torch's float32 kernels (float32).
  """
  x = np.abs(x)
  a = x.dtype.type(a)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  if x.dtype == np.float64:
    far = (((x - 5) * x + 8) * x - 4) * a
  else:
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0)).astype(x.dtype)


def triangle(x: np.ndarray) -> np.ndarray:
  """Bilinear (tent) kernel max(0, 1 − |x|)."""
  return np.maximum(0, 1 - np.abs(x)).astype(x.dtype)


_FILTERS = {'bilinear': (triangle, 1.0), 'bicubic': (lambda x: keys_cubic(x, -0.5), 2.0)}


def antialias_matrix(in_size: int, out_size: int, mode: str, dtype=np.float64) -> np.ndarray:
  """Pillow's resampling weights = torch `interpolate(..., antialias=True)`'s, float64 [out, in].

  Output pixel i is centred at c = (i + 0.5)·s in input coordinates, s = in/out. The kernel is
  stretched by max(s, 1) (so it low-passes when shrinking), covers input pixels
  [int(c − r + 0.5), int(c + r + 0.5)) clipped to the image (r = support·max(s, 1)), is evaluated
  at (j − c + 0.5)/max(s, 1) and normalised to sum 1 over the pixels it covers.

  dtype float64 is Pillow's arithmetic (double); float32 rounds where torch's kernel for float32
  tensors keeps float32 (scale, centre, support, kernel values, their sum), which moves the
  weights by up to ~1e-5 against float64 at 512 → 224.
  """
  f = np.dtype(dtype).type
  kernel, support = _FILTERS[mode]
  scale = f(f(in_size) / f(out_size))
  stretch = max(scale, f(1))
  radius = f(support * stretch)
  inverse = f(1 / float(stretch))
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    centre = f(float(scale) * (i + 0.5))
    lo = max(int(float(f(centre - radius)) + 0.5), 0)
    hi = min(int(float(f(centre + radius)) + 0.5), in_size)
    offsets = (np.arange(lo, hi).astype(dtype) - centre).astype(np.float64) + 0.5
    w = kernel((offsets * float(inverse)).astype(dtype))
    total = f(0)
    for v in w:                       # sequential sum, as the C loops
      total = f(total + v)
    weights[i, lo:hi] = (w / total).astype(dtype) if total != 0 else w
  return weights


def interpolate_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """torch `interpolate(..., align_corners=False, antialias=False)` weights, float64 [out, in].

  Source coordinate x = (i + 0.5)·s − 0.5 with s = in/out in float32, rounded once to float32
  (torch's CPU kernel for float32 tensors, a fused multiply-add). Bilinear: clamp x ≥ 0, blend
  pixels ⌊x⌋ and ⌊x⌋ + 1 (the last pixel repeats). Bicubic: Keys a = −0.75 at ⌊x⌋ − 1 … ⌊x⌋ + 2,
  indices clamped to the image (edge replication). No low-pass when shrinking.
  """
  f = np.float32
  scale = f(f(in_size) / f(out_size))
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    x = f(float(scale) * (i + 0.5) - 0.5)
    if mode == 'bilinear':
      x = max(x, f(0))
    i0 = min(int(math.floor(x)), in_size - 1)
    t = min(max(f(x - f(i0)), f(0)), f(1))
    if mode == 'bilinear':
      weights[i, i0] += f(1) - t
      weights[i, min(i0 + 1, in_size - 1)] += t
    elif mode == 'bicubic':
      taps = keys_cubic(np.array([t + 1, t, 1 - t, f(2) - t], np.float32), -0.75)
      for k, w in zip(range(i0 - 1, i0 + 3), taps):
        weights[i, min(max(k, 0), in_size - 1)] += w
    else:
      raise ValueError(f'mode: expected bilinear or bicubic, got {mode!r}')
  return weights


def torch_resize_matrix(in_size: int, out_size: int, mode: str, antialias: bool) -> np.ndarray:
  """Weights of torchvision's tensor `F.resize` (torch `interpolate`) on float32, one axis."""
  if in_size == out_size:
    return np.eye(in_size)       # torch copies an axis whose size does not change
  if antialias:
    return antialias_matrix(in_size, out_size, mode, np.float32)
  return interpolate_matrix(in_size, out_size, mode)


def pil_fixed_point(weights: np.ndarray) -> np.ndarray:
  """Pillow's 8-bit coefficients: weight·2^22 rounded half away from zero, int64."""
  scaled = weights * (1 << PRECISION_BITS)
  return np.trunc(scaled + np.where(weights < 0, -0.5, 0.5)).astype(np.int64)


# ------------------------------------------------------------------------------------ geometry


def shortest_edge_size(height: int, width: int, size: int = SIZE) -> tuple[int, int]:
  """(h, w) after resizing the shorter side to `size`; the longer one is int(size·long/short)."""
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


def longest_edge_size(height: int, width: int, size: int = SIZE) -> tuple[int, int]:
  """(h, w) after HPSv2's ResizeMaxSize: scale size/longest, each side round(side·scale)."""
  scale = size / float(max(height, width))
  return round(height * scale), round(width * scale)


def crop_start_floor(length: int, crop: int) -> int:
  """First kept index of a centre crop as transformers crops: ⌊(length − crop)/2⌋."""
  return (length - crop) // 2


def crop_start_round(length: int, crop: int) -> int:
  """First kept index of a centre crop as torchvision crops: round((length − crop)/2), ties even."""
  return int(round((length - crop) / 2.0))


class Plan(NamedTuple):
  """One preprocessing as matrices: rows = output pixels, columns = input pixels, per axis."""
  rows: np.ndarray    # float64 [SIZE, H] (PIL rewards: the weights before fixed point)
  cols: np.ndarray    # float64 [SIZE, W]


@functools.lru_cache(maxsize=64)
def plan(name: str, height: int, width: int) -> Plan:
  """The resampling matrices of reward `name` for [height, width] inputs."""
  if name in ('pickscore', 'aesthetic'):
    new_h, new_w = shortest_edge_size(height, width)
    top, left = crop_start_floor(new_h, SIZE), crop_start_floor(new_w, SIZE)
    rows = antialias_matrix(height, new_h, 'bicubic')[top:top + SIZE]
    cols = antialias_matrix(width, new_w, 'bicubic')[left:left + SIZE]
    return Plan(rows, cols)
  if name == 'clipscore':
    new_h, new_w = shortest_edge_size(height, width)
    top, left = crop_start_round(new_h, SIZE), crop_start_round(new_w, SIZE)
    rows = torch_resize_matrix(height, new_h, 'bilinear', True)[top:top + SIZE]
    cols = torch_resize_matrix(width, new_w, 'bilinear', True)[left:left + SIZE]
    return Plan(rows, cols)
  if name == 'hpsv2':
    new_h, new_w = longest_edge_size(height, width)
    rows, cols = np.zeros((SIZE, height)), np.zeros((SIZE, width))
    top, left = (SIZE - new_h) // 2, (SIZE - new_w) // 2
    rows[top:top + new_h] = torch_resize_matrix(height, new_h, 'bicubic', True)
    cols[left:left + new_w] = torch_resize_matrix(width, new_w, 'bicubic', True)
    return Plan(rows, cols)
  raise InputError(f'preprocess: unknown reward {name!r}; known: {sorted(PREPROCESS)}')


def _check(images, name: str) -> tuple[int, int]:
  shape, dtype = images.shape, images.dtype
  if len(shape) != 4 or shape[-1] != 3 or not jnp.issubdtype(dtype, jnp.floating):
    raise InputError(f'{name} images: expected float [B, H, W, 3] in [0, 1], '
                     f'got {getattr(dtype, "name", dtype)} {tuple(shape)}')
  return shape[1], shape[2]


# ---------------------------------------------------------------------------------- host path


def _unit_float32(u: np.ndarray) -> np.ndarray:
  """transformers' rescale of uint8 values: float64 u·(1/255), then float32."""
  return (u.astype(np.float64) * (1 / 255)).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
  return (x - np.asarray(OPENAI_MEAN, np.float32)) / np.asarray(OPENAI_STD, np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Upstream's float → uint8: round-half-even(255·x) in float32, clipped to [0, 255]."""
  scaled = np.asarray(images, np.float32) * np.float32(255)
  return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def host_clip_processor(name: str, images: np.ndarray) -> np.ndarray:
  """pickscore / aesthetic on host: uint8, PIL bicubic shortest side, centre crop, normalise."""
  images = np.asarray(images)
  height, width = _check(images, name)
  new_h, new_w = shortest_edge_size(height, width)
  top, left = crop_start_floor(new_h, SIZE), crop_start_floor(new_w, SIZE)
  bicubic = Image.Resampling.BICUBIC
  out = []
  for image in to_uint8(images):
    # Pillow < 13 (upstream pins 10.4) always resamples horizontally first; Pillow 13 goes
    # vertically first when the height shrinks by more than twice as many pixels as the width
    # (portraits taller than 2:1 here). Two one-axis calls give the upstream order on any Pillow.
    resized = Image.fromarray(image).resize((new_w, height), bicubic)
    resized = np.asarray(resized.resize((new_w, new_h), bicubic))[top:top + SIZE, left:left + SIZE]
    out.append(_normalise(_unit_float32(resized)))
  return np.stack(out)


def host_torchvision(name: str, images: np.ndarray) -> np.ndarray:
  """clipscore / hpsv2 on host: torchvision's float tensor resize, crop or pad, normalise."""
  images = np.asarray(images)
  height, width = _check(images, name)
  p = plan(name, height, width)
  x = images.astype(np.float64).transpose(0, 3, 1, 2)          # [B, 3, H, W]
  x = p.rows @ (x @ p.cols.T)                                  # horizontal, then vertical
  return _normalise(x.transpose(0, 2, 3, 1).astype(np.float32))


# ----------------------------------------------------------------------------------- JAX path


class _Digits(NamedTuple):
  shift: int
  digits: np.ndarray  # float32 [n, SIZE, in]: fixed point = Σ_j digits[j]·2^(shift·j)


@functools.lru_cache(maxsize=128)
def _pil_digits(name: str, height: int, width: int, axis: str) -> _Digits:
  """Pillow's fixed-point matrix of one axis split into digits whose sums stay float32-exact.

  With uint8 inputs, a row of digit d sums to at most 255·Σ|d| < 2^24, so each float32 matmul
  with precision HIGHEST is exact whatever the summation order.
  """
  p = plan(name, height, width)
  fixed = pil_fixed_point(p.rows if axis == 'rows' else p.cols)
  if 255 * np.abs(fixed).sum(1).max() + (1 << (PRECISION_BITS - 1)) >= 1 << 31:
    raise InputError(f'{name} images: {height}×{width} overflows the int32 fixed-point resize')
  for n in (2, 3, 4):
    shift = -(-24 // n)
    digits, rest = [], fixed
    for _ in range(n - 1):
      low = rest % (1 << shift)
      digits.append(low)
      rest = (rest - low) >> shift
    digits.append(rest)
    if all(255 * np.abs(d).sum(1).max() < _EXACT for d in digits):
      return _Digits(shift, np.stack(digits).astype(np.float32))
  raise InputError(f'{name} images: {height}×{width} is too large for the exact fixed-point resize')


def _pil_pass(u: jax.Array, d: _Digits, spec: str) -> jax.Array:
  """One Pillow 8-bit pass on integer-valued float32 `u`: Σ u·k, + 2^21, >> 22, clip to uint8."""
  parts = jnp.einsum(spec, u, d.digits, precision=jax.lax.Precision.HIGHEST)
  total = jnp.int32(1 << (PRECISION_BITS - 1))
  for j in range(d.digits.shape[0]):
    total = total + (parts[j].astype(jnp.int32) << (d.shift * j))
  return jnp.clip(total >> PRECISION_BITS, 0, 255)


# Every uint8 value's normalised float32, per channel [3, 256], computed as the host path does.
_NORMALISED_UINT8 = np.ascontiguousarray(_normalise(_unit_float32(np.arange(256))[:, None]).T)


def _jax_normalise(x: jax.Array) -> jax.Array:
  return (x - jnp.asarray(OPENAI_MEAN, jnp.float32)) / jnp.asarray(OPENAI_STD, jnp.float32)


def jax_clip_processor(name: str, images: jax.Array) -> jax.Array:
  """pickscore / aesthetic on device: bit-exact Pillow bicubic on the uint8 image."""
  images = jnp.asarray(images)
  height, width = _check(images, name)
  u = jnp.clip(jnp.round(images.astype(jnp.float32) * jnp.float32(255)), 0, 255)
  u = _pil_pass(u, _pil_digits(name, height, width, 'cols'), 'bhwc,now->nbhoc')   # horizontal
  u = _pil_pass(u.astype(jnp.float32), _pil_digits(name, height, width, 'rows'),
                'bhwc,noh->nbowc')                                                 # vertical
  return jnp.asarray(_NORMALISED_UINT8)[jnp.arange(3), u]


def jax_torchvision(name: str, images: jax.Array) -> jax.Array:
  """clipscore / hpsv2 on device: the float32 resampling matrices."""
  images = jnp.asarray(images)
  height, width = _check(images, name)
  p = plan(name, height, width)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('bhwc,ow->bhoc', images.astype(jnp.float32), p.cols.astype(np.float32),
                 precision=hi)
  x = jnp.einsum('bhwc,oh->bowc', x, p.rows.astype(np.float32), precision=hi)
  return _jax_normalise(x)


# ----------------------------------------------------------------------------------- registry


class Preprocess(NamedTuple):
  """A reward's preprocessing, images float [B, H, W, 3] in [0, 1] → float32 [B, 224, 224, 3]."""
  jax: Callable[[jax.Array], jax.Array]        # jittable; the rewards' default
  host: Callable[[np.ndarray], np.ndarray]     # numpy + PIL reference, upstream step by step


PREPROCESS: dict[str, Preprocess] = {
    name: Preprocess(functools.partial(jax_fn, name), functools.partial(host_fn, name))
    for name, jax_fn, host_fn in (
        ('pickscore', jax_clip_processor, host_clip_processor),
        ('aesthetic', jax_clip_processor, host_clip_processor),
        ('clipscore', jax_torchvision, host_torchvision),
        ('hpsv2', jax_torchvision, host_torchvision),
    )
}


def score_gap(score_fn: Callable, images: np.ndarray, name: str) -> dict:
  """How far the JAX preprocessing moves a reward's scores from the host (upstream) one.

  Args:
    score_fn: normalised pixels float32 [B, 224, 224, 3] → scores [B] (the reward's CLIP tower
      and head, e.g. built from real weights).
    images: float [B, H, W, 3] in [0, 1].
    name: the reward, a key of PREPROCESS.

  Returns:
    {'max_abs', 'mean_abs'} of the per-image score difference, and both score arrays.
  """
  if name not in PREPROCESS:
    raise InputError(f'score_gap name: unknown reward {name!r}; known: {sorted(PREPROCESS)}')
  fns = PREPROCESS[name]
  on_device = np.asarray(score_fn(jax.jit(fns.jax)(jnp.asarray(images))), np.float64)
  on_host = np.asarray(score_fn(fns.host(np.asarray(images))), np.float64)
  diff = np.abs(on_device - on_host)
  return {'max_abs': float(diff.max()), 'mean_abs': float(diff.mean()),
          'jax_scores': on_device, 'host_scores': on_host}
