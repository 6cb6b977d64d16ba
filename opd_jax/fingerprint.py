"""Fingerprints that tell whether saved bytes are still the bytes that were saved.

`tree_fingerprint` digests every array of a (possibly sharded, multi-host) pytree on device:
each leaf's bits, viewed as uint32 words, are summed with odd position weights modulo 2³²,

    F(x) = Σ_i (2i + 1) · bits(x_i)  mod 2³²,

so any single flipped bit changes the digest (an odd weight times 2^b is never 0 mod 2³²) and so
does swapping two elements. A leaf this process holds whole is digested on the host (numpy,
no compile); a leaf sharded over several processes is digested on device by a jitted reduction
over the global array, with the same formula, so a digest does not depend on the layout.
Checkpoints store it next to the state and compare it after a restore.

`directory_manifest` lists a directory's files (relative path, size and SHA-256), which a saved
artifact is verified against; `directory_fingerprint` digests it, for inputs whose files are
written deterministically (PEFT safetensors) and compared on resume. Orbax-written artifacts are
compared by content instead (`mini_world.artifacts.content_fingerprint`, on `numpy_digest`):
their file names and time stamps change from one save of the same weights to the next.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_WORD = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_digest(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize == 8:   # a 64-bit leaf becomes [..., 2] uint32 words
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    words = jax.lax.bitcast_convert_type(x, _WORD[x.dtype.itemsize]).astype(jnp.uint32)
  # Row-major position of every word, from iotas (no reshape: a sharded leaf stays in place).
  position = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    position = position + (jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
                           * jnp.uint32(stride % 2**32))
    stride *= words.shape[axis]
  return jnp.sum(words * (position * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_device_digest = jax.jit(_leaf_digest)
_NP_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _host_digest(x: np.ndarray) -> int:
  """`_leaf_digest` in numpy (uint32 arithmetic wraps modulo 2³² as on device)."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  if x.dtype.itemsize == 8:
    words = x.view(np.uint32).reshape(-1)   # little-endian: low word first, as bitcast does
  else:
    words = x.view(_NP_WORD[x.dtype.itemsize]).astype(np.uint32).reshape(-1)
  weights = np.arange(words.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
  return int(np.sum(words * weights, dtype=np.uint32))


def _digest(x: Any) -> int:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return int(jax.device_get(_device_digest(x)))
  return _host_digest(np.asarray(jax.device_get(x)))


def tree_fingerprint(tree: Any) -> dict[str, int]:
  """{'/'-joined leaf path: uint32 digest} of every array leaf of `tree`."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): _digest(x) for path, x in flat}


def compare_fingerprints(saved: dict[str, int], restored: dict[str, int]) -> list[str]:
  """Leaf paths whose digests differ (or that exist on one side only)."""
  keys = sorted(set(saved) | set(restored))
  return [k for k in keys if saved.get(k) != restored.get(k)]


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(chunk), b''):
      h.update(block)
  return h.hexdigest()


def directory_manifest(directory: str, exclude: tuple[str, ...] = ()) -> dict[str, str]:
  """{relative path: 'size:sha256'} of every file under `directory` (sorted, excluding names)."""
  out = {}
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      if name in exclude:
        continue
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      out[rel] = f'{os.path.getsize(path)}:{file_sha256(path)}'
  return out


def directory_fingerprint(directory: str, exclude: tuple[str, ...] = ()) -> str:
  """One SHA-256 over a directory's manifest: equal iff the same files hold the same bytes."""
  manifest = directory_manifest(directory, exclude)
  return hashlib.sha256(repr(sorted(manifest.items())).encode()).hexdigest()


def numpy_digest(tree: Any) -> str:
  """SHA-256 of host arrays (for small host-side values, e.g. prompt tables)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()
