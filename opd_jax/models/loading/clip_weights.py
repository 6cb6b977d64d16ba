"""Loading transformers CLIP folders, and converted LAION aesthetic heads, without torch.

    config.json → CLIPConfig → nnx.eval_shape(CLIPModel) → validate every key and shape
      → read, transpose, cast, place each tensor (`place.load_state`)

A transformers folder holds `config.json` and either `model.safetensors` or shards listed by
`model.safetensors.index.json`. It may be a `CLIPModel`, a `CLIPTextModelWithProjection` (keys
`text_model.*`, `text_projection.weight`) or a `CLIPVisionModelWithProjection` (`vision_model.*`,
`visual_projection.weight`); the three share their key names, so one model class serves all.
`part='text'` / `part='vision'` loads one tower (and its projection) of a two-tower folder,
leaving the other tower's tensors unread. `*.position_ids` tensors, which older transformers
versions saved as persistent buffers, are ignored, as transformers ignores them.

A `pytorch_model.bin`-only folder (or an open_clip state dict) is converted once with
`python -m opd_jax.tools.convert_clip`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from opd_jax.models import aesthetic_head as head_lib
from opd_jax.models.aesthetic_head import AestheticHead
from opd_jax.models.clip import PARTS, CLIPConfig, CLIPModel
from opd_jax.models.loading.place import Shardings, load_state
from opd_jax.models.loading.safetensors_io import (CONFIG_NAME, CheckpointError,
                                                   CheckpointReader, read_config)

WEIGHTS_NAME = 'model.safetensors'
INDEX_NAME = WEIGHTS_NAME + '.index.json'
# Non-persistent buffers that checkpoints written by older transformers versions still hold.
_IGNORED_KEY = re.compile(r'(^|\.)position_ids$')
# The checkpoint keys of each tower (module prefixes); `logit_scale` belongs to both together.
_PART_PREFIXES = {'text': ('text_model.', 'text_projection.'),
                  'vision': ('vision_model.', 'visual_projection.')}


def open_weights(folder: str | os.PathLike) -> CheckpointReader:
  """Opens a transformers folder's single-file or sharded safetensors weights."""
  folder = os.fspath(folder)
  if not any(os.path.exists(os.path.join(folder, f)) for f in (WEIGHTS_NAME, INDEX_NAME)):
    hint = (' (pytorch_model.bin is not read: save the model with safetensors, e.g. '
            'save_pretrained(..., safe_serialization=True))'
            if os.path.exists(os.path.join(folder, 'pytorch_model.bin')) else '')
    raise CheckpointError(f'{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}{hint}')
  return CheckpointReader.from_folder(folder, WEIGHTS_NAME)


class _KeyView:
  """The keys of a `CheckpointReader` that `keep` accepts (what `place.load_state` reads)."""

  def __init__(self, reader: CheckpointReader, keep: Callable[[str], bool]):
    self._reader, self._keep = reader, keep

  def keys(self) -> list[str]:
    return [k for k in self._reader.keys() if self._keep(k)]

  def __contains__(self, key: str) -> bool:
    return self._keep(key) and key in self._reader

  def shape(self, key: str) -> tuple[int, ...]:
    return self._reader.shape(key)

  def read(self, key: str):
    return self._reader.read(key)


def _keeps(folder_config: CLIPConfig, part: str | None) -> Callable[[str], bool]:
  """Which checkpoint keys the model of `part` reads from a folder holding `folder_config`."""
  dropped = () if part is None else tuple(
      prefix for p in folder_config.parts if p != part for prefix in _PART_PREFIXES[p])
  drop_scale = part is not None and len(folder_config.parts) == 2

  def keep(key: str) -> bool:
    if _IGNORED_KEY.search(key) or key.startswith(dropped):
      return False
    return not (drop_scale and key == 'logit_scale')
  return keep


def _config(cls_from_dict, folder: str):
  """A config built from `folder`'s config.json; a bad one is a CheckpointError naming it."""
  try:
    return cls_from_dict(read_config(folder))
  except (TypeError, ValueError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f'{os.path.join(folder, CONFIG_NAME)}: {e}') from None


def clip_config(folder: str | os.PathLike) -> CLIPConfig:
  """The CLIPConfig of a transformers CLIP folder (both towers or one)."""
  return _config(CLIPConfig.from_hf_dict, os.fspath(folder))


def abstract_clip(config: CLIPConfig, **kwargs) -> CLIPModel:
  """The CLIPModel with ShapeDtypeStructs instead of arrays (for shardings and sizes)."""
  return nnx.eval_shape(lambda: CLIPModel(config, rngs=nnx.Rngs(0), **kwargs))


def _assemble(abstract: nnx.Module, reader, *, renames=(), shardings: Shardings,
              what: str) -> nnx.Module:
  graphdef, params = nnx.split(abstract)
  return nnx.merge(graphdef, load_state(reader, params, renames=renames, shardings=shardings,
                                        what=what))


def load_clip(folder: str | os.PathLike, *, part: str | None = None, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32, attention_impl: str | None = None,
              shardings: Shardings = None) -> CLIPModel:
  """Loads a transformers `CLIPModel` / `CLIPTextModelWithProjection` /
  `CLIPVisionModelWithProjection` folder into a `CLIPModel`.

  Args:
    folder: config.json + model.safetensors (or its sharded index).
    part: None (every tower the folder has), 'text' or 'vision' (that tower and its
      projection only; `logit_scale` is then not loaded).
    dtype, param_dtype, attention_impl: see `CLIPModel`.
    shardings: placement of every parameter (see `place.Shardings`); compute a dict with
      `opd_jax.parallel.sharding.state_shardings(nnx.state(abstract_clip(...)), mesh)`.

  Raises:
    CheckpointError: unreadable/corrupt files or a config this code cannot build;
      WeightMismatchError: keys or shapes that differ from the architecture in config.json.
  """
  folder = os.fspath(folder)
  if part is not None and part not in PARTS:
    raise ValueError(f'part {part!r} is not one of {list(PARTS)}')
  folder_config = clip_config(folder)
  try:
    config = folder_config.select(part)
  except ValueError as e:
    raise CheckpointError(f'{os.path.join(folder, CONFIG_NAME)}: {e}') from None
  abstract = abstract_clip(config, dtype=dtype, param_dtype=param_dtype,
                           attention_impl=attention_impl)
  with open_weights(folder) as reader:
    view = _KeyView(reader, _keeps(folder_config, part))
    return _assemble(abstract, view, shardings=shardings,
                     what=f'CLIP ({"+".join(config.parts)}) of {folder}')


def load_aesthetic_head(folder: str | os.PathLike, *, dtype: Any = jnp.float32,
                        param_dtype: Any = jnp.float32,
                        shardings: Shardings = None) -> AestheticHead:
  """Loads a LAION aesthetic head folder written by `opd_jax.tools.convert_clip`
  (config.json with the layer widths, model.safetensors with the upstream keys)."""
  folder = os.fspath(folder)
  dims = _config(head_lib.layer_dims_from_config, folder)
  abstract = nnx.eval_shape(lambda: AestheticHead(dims, rngs=nnx.Rngs(0), dtype=dtype,
                                                  param_dtype=param_dtype))
  with open_weights(folder) as reader:
    return _assemble(abstract, reader, renames=head_lib.TORCH_KEY_RENAMES, shardings=shardings,
                     what=f'aesthetic head of {folder}')
