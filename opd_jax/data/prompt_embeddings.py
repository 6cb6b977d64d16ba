"""Reader for the precomputed SD3 text-conditioning cache written by `opd_jax.tools.encode_prompts`.

Training never runs the three text encoders (CLIP-L, CLIP-G, T5-XXL: ~5 B parameters, most of
them T5): prompts are encoded once, offline, and every rollout reads the cached conditioning. This
module owns the on-disk format (the writer imports the names below) and exposes it as random-access
data sources plus a grain pipeline that is shuffled, sharded across hosts and resumable — its
position is a small dict that goes into the checkpoint next to the train state.

Layout of an `out_dir`:

    metadata.json                     shapes, max_sequence_length, model_dir, tasks, counts
    negative.npz                      the "" embedding for CFG: prompt_embeds [L, D],
                                      pooled_prompt_embeds [P]
    <task>/prompt_embeddings/1.0.0/   one TFDS dataset per task (array_record files, readable
                                      without TensorFlow via `as_data_source`), one split per
                                      prompt file of that task (usually `train`, `test`)

Each record: `prompt_embeds` float32 [L, D] with L = 77 + max_sequence_length (CLIP tokens, then
T5 tokens), `pooled_prompt_embeds` float32 [P] (CLIP-L ‖ CLIP-G pooled), `prompt` (UTF-8 bytes),
`prompt_metadata` (UTF-8 JSON bytes: the prompt file's record, e.g. GenEval's tag/objects; "{}"
for plain-text prompt files), `index` int64 (position of the prompt in its file, blank lines
not counted).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from opd_jax.errors import InputError

# On-disk names, shared with the writer (opd_jax.tools.encode_prompts).
METADATA_FILENAME = 'metadata.json'
NEGATIVE_FILENAME = 'negative.npz'
DATASET_NAME = 'prompt_embeddings'
DATASET_VERSION = '1.0.0'
FORMAT_VERSION = 1
# Task and split names become directory and file names, and TFDS split names must be identifiers.
NAME_PATTERN = re.compile(r'^[A-Za-z0-9_]+$')

EMBEDDING_KEYS = ('prompt_embeds', 'pooled_prompt_embeds')


class CacheError(InputError):
  """A prompt-embedding cache that is missing, incomplete or corrupt."""


class NotACacheError(CacheError, FileNotFoundError):
  """`out_dir` holds no metadata.json (a FileNotFoundError too, as callers catch that)."""


class CacheEntryError(CacheError, KeyError):
  """The cache lacks the task or split asked for (a KeyError too, as callers catch that)."""
  __str__ = CacheError.__str__   # KeyError would print the message quoted


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CacheError(f'{path}: unreadable ({e}); write the cache again') from None


def task_dataset_dir(out_dir: str | os.PathLike, task: str) -> str:
  """Returns the TFDS dataset directory holding one task's splits."""
  return os.path.join(os.fspath(out_dir), task, DATASET_NAME, DATASET_VERSION)


def load_metadata(out_dir: str | os.PathLike) -> dict[str, Any]:
  """Returns the cache's metadata.json as a dict.

  Raises:
    NotACacheError (a FileNotFoundError): if `out_dir` is not a prompt-embedding cache.
    CacheError: if its metadata.json is unreadable or not a cache's.
  """
  path = os.path.join(os.fspath(out_dir), METADATA_FILENAME)
  if not os.path.exists(path):
    raise NotACacheError(f'{path} not found: {out_dir} is not a prompt-embedding cache '
                         '(write one with python -m opd_jax.tools.encode_prompts)')
  metadata = _read_json(path)
  if not isinstance(metadata, dict) or not isinstance(metadata.get('tasks'), dict):
    raise CacheError(f'{path}: not the metadata of a prompt-embedding cache (no "tasks" object)')
  return metadata


def load_prompt_embeddings(out_dir: str | os.PathLike, task: str, split: str = 'train'):
  """Returns a random-access source over one task's split.

  The source has `len()` and `__getitem__(i)` → dict of numpy arrays/bytes (see the module
  docstring for the keys), and `__getitems__` for batched reads, so it plugs straight into
  `grain.MapDataset.source`.

  Args:
    out_dir: the cache directory written by `opd_jax.tools.encode_prompts`.
    task: task name as given on the writer's command line (e.g. `geneval`).
    split: split name (the writer's default is `train`).

  Raises:
    CacheEntryError (a KeyError): if the cache has no such task or split.
    CacheError: if the task's dataset is missing or unreadable.
  """
  tasks = load_metadata(out_dir)['tasks']
  if task not in tasks:
    raise CacheEntryError(f'task {task!r} not in {out_dir}; available: {sorted(tasks)}')
  splits = tasks[task].get('splits', {}) if isinstance(tasks[task], dict) else {}
  if split not in splits:
    raise CacheEntryError(f'task {task!r} of {out_dir} has no split {split!r}; available: '
                          f'{sorted(splits)}')
  directory = task_dataset_dir(out_dir, task)
  try:
    builder = tfds.builder_from_directory(directory)
    return builder.as_data_source(split)
  except Exception as e:   # TFDS raises many types for a missing or half-written dataset
    raise CacheError(f'{directory}: unreadable ({type(e).__name__}: {e}); write the cache '
                     'again') from None


def load_negative(out_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Returns the empty-prompt ("") conditioning used as CFG's unconditional branch.

  Returns:
    `{'prompt_embeds': float32 [L, D], 'pooled_prompt_embeds': float32 [P]}`.
  """
  path = os.path.join(os.fspath(out_dir), NEGATIVE_FILENAME)
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [k for k in EMBEDDING_KEYS if k not in data]
      if missing:
        raise CacheError(f'{path}: lacks {", ".join(missing)}; write the cache again')
      return {k: np.asarray(data[k], np.float32) for k in EMBEDDING_KEYS}
  except CacheError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:   # missing, or corrupt
    raise CacheError(f'{path}: unreadable ({type(e).__name__}: {e}); write the cache '
                     'again') from None


def make_batch_iterator(out_dir: str | os.PathLike,
                        task: str,
                        *,
                        batch_size: int,
                        seed: int,
                        split: str = 'train',
                        shard_index: int = 0,
                        shard_count: int = 1,
                        shuffle: bool = True,
                        num_epochs: int | None = None,
                        drop_remainder: bool = True,
                        num_threads: int = 4,
                        prefetch_buffer_size: int = 4) -> grain.DatasetIterator:
  """Returns a grain iterator over batches of one task's prompt embeddings.

  Each host reads a disjoint, fixed shard (`shard_index::shard_count`, so shard sizes differ by at
  most one), shuffles it with `seed` and reshuffles every epoch (grain derives the epoch's
  permutation from seed + epoch, so the whole stream is a pure function of the arguments and the
  read position). Batches are dicts of stacked arrays: `prompt_embeds` [B, L, D],
  `pooled_prompt_embeds` [B, P], `prompt` and `prompt_metadata` (bytes arrays), `index` [B].

  The iterator's position is `it.get_state()` (a small JSON-serialisable dict); a fresh iterator
  built with the same arguments and given `it.set_state(state)` continues exactly where the saved
  one stopped, which is how a resumed run reads the same prompts it would have read.

  Args:
    out_dir: the cache directory.
    task: task name.
    batch_size: prompts per batch on this host.
    seed: shuffle seed, 0 <= seed < 2**32; use the same value on every host.
    split: split name.
    shard_index: this host's shard, usually `jax.process_index()`.
    shard_count: number of shards, usually `jax.process_count()`.
    shuffle: shuffle within the shard (turn off for evaluation in file order).
    num_epochs: passes over the shard; None repeats forever (training draws a fixed number of
      batches per round, not epochs).
    drop_remainder: drop a last partial batch (only reachable when `num_epochs` is set); keeps
      batch shapes static for jit.
    num_threads: reader threads.
    prefetch_buffer_size: batches read ahead. A batch is B × L × D × 4 bytes (3.4 MB per prompt
      at SD3.5's L = 205, D = 4096), so keep this small.

  Raises:
    ValueError: on an invalid shard; CacheError (a ValueError too): a shard with no prompts.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}')
  ds = grain.MapDataset.source(load_prompt_embeddings(out_dir, task, split))
  ds = ds[shard_index::shard_count]
  if len(ds) == 0:  # pylint: disable=g-explicit-length-test
    raise CacheError(f'shard {shard_index}/{shard_count} of {task}/{split} in {out_dir} has no '
                     'prompts')
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # repeat() after shuffle(): the index keeps growing past the shard length, and the shuffle
  # turns epoch e into its own permutation (seed + e) instead of replaying the first one.
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  read_options = grain.ReadOptions(num_threads=num_threads,
                                   prefetch_buffer_size=prefetch_buffer_size)
  return iter(ds.to_iter_dataset(read_options))


def decode_text(values: Any) -> list[str] | str:
  """Decodes a `prompt` / `prompt_metadata` value (bytes, or an array of bytes) to str."""
  if isinstance(values, bytes):
    return values.decode('utf-8')
  return [v.decode('utf-8') for v in np.asarray(values).reshape(-1)]



def open_train_sources(data_cfg) -> tuple[list[tuple[Any, int]], dict[str, np.ndarray]]:
  """The train split of every task of a trainer's `config.data` in its prompt cache
  (`data_cfg.embeddings_dir`), as (source, prompts used: all or `max_prompts`), and the empty
  prompt's conditioning in the MMDiT's keys {'context' [1, L, D], 'pooled' [1, P]}.

  Raises ConfigError naming config.data.embeddings_dir for a missing cache, task or split, or
  a task without prompts.
  """
  from opd_jax.errors import ConfigError
  path = data_cfg.embeddings_dir
  if not path or not os.path.isdir(path):
    raise ConfigError(f'config.data.embeddings_dir: {path!r} is not a directory (expected a '
                      'prompt-embedding cache of python -m opd_jax.tools.encode_prompts)')
  out = []
  for task in data_cfg.tasks:
    try:
      source = load_prompt_embeddings(path, task, 'train')
    except (FileNotFoundError, KeyError) as e:
      raise ConfigError(f'config.data.embeddings_dir: {e}') from None
    n = len(source) if not data_cfg.max_prompts else min(len(source), data_cfg.max_prompts)
    if n == 0:
      raise ConfigError(f'config.data.embeddings_dir: task {task!r} has no prompts in {path}')
    out.append((source, n))
  neg = load_negative(path)
  return out, {'context': neg['prompt_embeds'][None], 'pooled': neg['pooled_prompt_embeds'][None]}
