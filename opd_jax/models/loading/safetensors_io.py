"""Reading diffusers weight folders with `safetensors` in numpy mode (no torch on this path).

A diffusers model folder holds `config.json` and either one `diffusion_pytorch_model.safetensors`
or shards listed by `diffusion_pytorch_model.safetensors.index.json` ({"weight_map": {key: file}}).
`CheckpointReader` opens them lazily: shapes and dtypes come from the headers, and a tensor is read
only when asked for, so a 2.5 B-parameter checkpoint is never held in host memory at once.
bfloat16 tensors decode through ml_dtypes (imported here so numpy knows the type).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors' numpy mode)
import numpy as np
from safetensors import safe_open

from opd_jax.errors import InputError

WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
INDEX_NAME = WEIGHTS_NAME + '.index.json'
CONFIG_NAME = 'config.json'


class CheckpointError(InputError):
  """A checkpoint folder or file that cannot be read (missing, corrupt, inconsistent)."""


def read_json(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a JSON object, with a clear error for a missing or malformed file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f'{path} not found')
  try:
    with open(path) as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path} is not valid JSON ({e})') from e
  except (OSError, UnicodeDecodeError) as e:   # a directory, no permission, binary bytes
    raise CheckpointError(f'{path}: unreadable ({e})') from e
  if not isinstance(value, dict):
    raise CheckpointError(f'{path}: expected a JSON object, got {type(value).__name__}')
  return value


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
  """The `config.json` of a diffusers model folder."""
  return read_json(os.path.join(os.fspath(folder), CONFIG_NAME))


def _open(path: str):
  try:
    return safe_open(path, framework='np')
  except FileNotFoundError as e:
    raise CheckpointError(f'{path} not found') from e
  except Exception as e:  # safetensors raises SafetensorError (not importable) or OSError
    raise CheckpointError(f'{path} is not a readable safetensors file ({e}); the file may be '
                          'truncated or corrupt — download it again') from e


class CheckpointReader:
  """Key → tensor access over one safetensors file or a sharded set (use as a context manager).

  Args:
    files: key → file mapping is built from these files' headers.
    weight_map: optional key → file mapping from an index.json, checked against the headers.
  """

  def __init__(self, files: list[str], weight_map: dict[str, str] | None = None):
    self._stack = contextlib.ExitStack()
    self._handles: dict[str, Any] = {}
    self._where: dict[str, str] = {}
    try:
      for path in files:
        handle = self._stack.enter_context(_open(path))
        self._handles[path] = handle
        for key in handle.keys():
          self._where[key] = path
      if weight_map is not None:
        wrong = sorted(k for k, f in weight_map.items() if self._where.get(k) != f)
        if wrong:
          raise CheckpointError(f'{len(wrong)} keys of the index are not in the shard it names, '
                                f'e.g. {wrong[:5]}')
    except BaseException:
      self._stack.close()
      raise

  @classmethod
  def from_folder(cls, folder: str | os.PathLike, weights_name: str = WEIGHTS_NAME
                  ) -> 'CheckpointReader':
    """Opens `folder`'s single-file or sharded weights: `weights_name` (diffusers' by default;
    transformers' is model.safetensors) or its `.index.json`."""
    folder = os.fspath(folder)
    index_name = weights_name + '.index.json'
    single, index = os.path.join(folder, weights_name), os.path.join(folder, index_name)
    if os.path.exists(index):
      weight_map = read_json(index).get('weight_map')
      if not isinstance(weight_map, dict):
        raise CheckpointError(f'{index} has no "weight_map" object')
      weight_map = {k: os.path.join(folder, f) for k, f in weight_map.items()}
      return cls(sorted(set(weight_map.values())), weight_map)
    if os.path.exists(single):
      return cls([single])
    raise CheckpointError(f'no {weights_name} or {index_name} in {folder}')

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> 'CheckpointReader':
    return cls([os.fspath(path)])

  def __enter__(self) -> 'CheckpointReader':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._stack.close()

  def keys(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def __iter__(self) -> Iterator[str]:
    return iter(self.keys())

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

  def metadata(self) -> dict[str, str]:
    """The string metadata of the (first) file's header, {} if none."""
    for handle in self._handles.values():
      return dict(handle.metadata() or {})
    return {}

  def read(self, key: str) -> np.ndarray:
    """Reads one tensor as a numpy array in its stored dtype."""
    path = self._where[key]
    try:
      return self._handles[path].get_tensor(key)
    except Exception as e:
      raise CheckpointError(f'cannot read {key!r} from {path} ({e}); the file may be '
                            'corrupt') from e
