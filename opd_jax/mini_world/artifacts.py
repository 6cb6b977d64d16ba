"""What one training stage hands to the next: the base model and LoRA teachers, on disk.

Two kinds of artifact, each an Orbax PyTree checkpoint of pure-dict parameters (`params/`) plus
a JSON description (`meta.json`) that says how to rebuild the network around them:

  base      {'dit': DiT base weights, 'text_encoder': text-encoder weights}; meta holds the
            `model`, `text_encoder` and `latent` config sections, so every later stage builds
            exactly the architecture the base was trained with.
  adapter   one LoRA adapter (a teacher, or a student) in the layout of the base DiT with
            meta['lora_rank'] / meta['lora_alpha']; meta also records the task(s), the CFG
            scale the adapter was trained with (its evaluation / teacher scale) and the stage.

Every artifact ends with `manifest.json` (size and SHA-256 of each file, written last): loading
verifies it, so a truncated, edited or half-copied artifact is an `InputError` naming the file,
never weights that silently differ. A loaded artifact's `fingerprint` digests its content
(meta and parameter values, not file bytes), for comparing inputs on resume.
Loaded teachers are plain pytrees of arrays: `opd.setup.build_opd(..., base_params=base.dit,
teachers=[load_adapter(p).params for p in paths])` stacks them as frozen teachers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from opd_jax.errors import InputError
from opd_jax.fingerprint import directory_manifest, numpy_digest

PARAMS_DIR = 'params'
META_FILE = 'meta.json'
MANIFEST_FILE = 'manifest.json'


def _save(directory: str, params: Any, meta: dict) -> str:
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, PARAMS_DIR), jax.device_get(params), force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  if jax.process_index() == 0:
    with open(os.path.join(directory, META_FILE), 'w') as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    manifest = directory_manifest(directory, exclude=(MANIFEST_FILE,))
    with open(os.path.join(directory, MANIFEST_FILE + '.tmp'), 'w') as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(os.path.join(directory, MANIFEST_FILE + '.tmp'),
               os.path.join(directory, MANIFEST_FILE))
  return directory


def verify(directory: str) -> None:
  """Raises InputError unless `directory` is a complete artifact whose files are unchanged."""
  directory = os.path.abspath(directory)
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.isdir(directory):
    raise InputError(f'{directory}: not found (expected a saved stage artifact)')
  if not os.path.exists(path):
    raise InputError(f'{path} not found: {directory} is not a complete stage artifact')
  try:
    with open(path) as f:
      expected = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f'{path}: unreadable ({e})') from None
  actual = directory_manifest(directory, exclude=(MANIFEST_FILE,))
  changed = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
  if changed:
    raise InputError(f'{directory}: {len(changed)} file(s) missing or changed since it was saved '
                     f'(first: {changed[0]}); the artifact is corrupt — re-run the stage that '
                     'made it')


def content_fingerprint(params: Any, meta: dict) -> str:
  """SHA-256 of an artifact's content: its meta and its parameters' tree, dtypes, shapes, values.

  Not of its files: Orbax names data files at random and stamps its metadata with times, so the
  same weights saved twice (a stage re-made from its final checkpoint) differ byte for byte but
  must compare equal when a resumed run checks its inputs.
  """
  h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
  h.update(str(jax.tree.structure(params)).encode())
  h.update(numpy_digest(params).encode())
  return h.hexdigest()


def _load(directory: str) -> tuple[Any, dict]:
  directory = os.path.abspath(directory)
  verify(directory)
  with open(os.path.join(directory, META_FILE)) as f:
    meta = json.load(f)
  ckptr = ocp.StandardCheckpointer()
  try:
    params = ckptr.restore(os.path.join(directory, PARAMS_DIR))
  except Exception as e:   # verified files that Orbax still cannot read
    raise InputError(f'{directory}: unreadable parameters ({type(e).__name__}: {e})') from None
  finally:
    ckptr.close()
  # Plain numpy leaves: the caller places them with its own shardings.
  return _int_keys(jax.tree.map(np.asarray, params)), meta


def _int_keys(tree: Any) -> Any:
  """Orbax stores dict keys as strings; nnx pure dicts index list entries with ints.

  No nnx attribute name is a decimal string (identifiers cannot start with a digit), so every
  all-digit key was an int and converting it back restores the exact `nnx.to_pure_dict` tree.
  """
  if isinstance(tree, dict):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
            for k, v in tree.items()}
  return tree


@dataclasses.dataclass
class BaseModel:
  """A pretrained base: DiT weights, text-encoder weights and the configs that built them."""
  dit: dict
  text_encoder: dict
  meta: dict

  @property
  def model_config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(self.meta['model'])

  @property
  def text_encoder_config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(self.meta['text_encoder'])

  @property
  def latent_config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(self.meta['latent'])

  @property
  def fingerprint(self) -> str:
    return content_fingerprint({'dit': self.dit, 'text_encoder': self.text_encoder}, self.meta)


def save_base(directory: str, dit: Any, text_encoder: Any, meta: dict) -> str:
  """Saves a base model; meta must hold the 'model', 'text_encoder' and 'latent' sections."""
  missing = {'model', 'text_encoder', 'latent'} - set(meta)
  if missing:
    raise ValueError(f'base meta lacks {sorted(missing)}')
  return _save(directory, {'dit': dit, 'text_encoder': text_encoder}, meta)


def load_base(directory: str) -> BaseModel:
  params, meta = _load(directory)
  return BaseModel(params['dit'], params['text_encoder'], meta)


@dataclasses.dataclass
class Adapter:
  """A LoRA adapter (pure dict in the base DiT's adapter layout) and its description."""
  params: dict
  meta: dict

  @property
  def cfg_scale(self) -> float:
    return float(self.meta['cfg_scale'])

  @property
  def fingerprint(self) -> str:
    return content_fingerprint(self.params, self.meta)


def save_adapter(directory: str, adapter: Any, meta: dict) -> str:
  """Saves a LoRA adapter; meta must hold lora_rank, lora_alpha, cfg_scale and tasks."""
  missing = {'lora_rank', 'lora_alpha', 'cfg_scale', 'tasks'} - set(meta)
  if missing:
    raise ValueError(f'adapter meta lacks {sorted(missing)}')
  return _save(directory, adapter, meta)


def load_adapter(directory: str) -> Adapter:
  params, meta = _load(directory)
  return Adapter(params, meta)
