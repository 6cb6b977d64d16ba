"""Prompt sets of the mini world as frozen text-encoder embeddings, encoded once.

After pretraining the text encoder is frozen, so a prompt's conditioning never changes: every RL,
OPD and evaluation stage reads the prompts of a TFDS split (`tfds_builder.load_split`), encodes
them in one jitted pass and from then on only gathers rows — the mini world's counterpart of the
SD3 prompt-embedding cache. The empty prompt "" (the CFG negative) is encoded the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.errors import ConfigError, InputError
from opd_jax.mini_world import lexicon
from opd_jax.mini_world import tfds_builder
from opd_jax.mini_world import tokenizer
from opd_jax.mini_world.text_encoder import encode_tokens


def split_prompts(data_dir: str, split: str, dataset_config: str = 'default') -> list[str]:
  """The prompts of a TFDS split of `mini_world`, in stored order, as str."""
  source = tfds_builder.load_split(data_dir, split, dataset_config)
  return [source[i]['prompt'].decode() for i in range(len(source))]


def encode_prompts(text_graphdef: Any, text_params: Any, prompts: Sequence[str],
                   chunk: int = 512) -> dict[str, np.ndarray]:
  """Conditioning {'context' [N, L, Dc], 'pooled' [N, P], 'context_mask' [N, L]} as numpy.

  Args:
    text_graphdef, text_params: the frozen text encoder (graphdef, pure-dict params).
    prompts: N prompt strings ("" is the CFG negative).
    chunk: prompts per encoder call; the last chunk is padded so one shape is compiled.
  """
  tokens, _ = tokenizer.encode(list(prompts))
  fn = jax.jit(lambda p, t: encode_tokens(text_graphdef, p, t))
  out = []
  for start in range(0, len(tokens), chunk):
    part = tokens[start:start + chunk]
    n = len(part)
    if len(tokens) > chunk and n < chunk:
      part = np.concatenate([part, np.zeros((chunk - n,) + part.shape[1:], part.dtype)])
    out.append(jax.tree.map(lambda x, n=n: np.asarray(x)[:n], fn(text_params, jnp.asarray(part))))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *out)


@dataclasses.dataclass
class PromptSet:
  """One task's prompts and their conditioning rows (row i belongs to prompts[i])."""
  task: str
  prompts: list[str]
  cond: dict[str, np.ndarray]

  def __len__(self) -> int:
    return len(self.prompts)

  def take(self, idx: np.ndarray) -> tuple[list[str], dict[str, np.ndarray]]:
    """(prompts, conditioning with leading axis len(idx)) of the rows `idx`."""
    idx = np.asarray(idx)
    return [self.prompts[i] for i in idx], jax.tree.map(lambda x: x[idx], self.cond)


def load_prompt_set(data_dir: str, task: str, split: str, text_graphdef: Any, text_params: Any,
                    dataset_config: str = 'default', limit: int | None = None) -> PromptSet:
  """Reads `{task}_{split}` from the TFDS dataset and encodes its prompts.

  Args:
    data_dir: TFDS data directory (built on first use).
    task: a task of `lexicon.TASKS`.
    split: 'train' or 'test'.
    text_graphdef, text_params: the frozen text encoder.
    dataset_config: TFDS builder config name.
    limit: keep only the first `limit` prompts (a small fixed prompt set for tests / quick runs).

  Raises:
    ConfigError: an unknown task or a limit below 1; InputError: a split without prompts.
  """
  if task not in lexicon.TASKS:
    raise ConfigError(f'task {task!r} is not one of {list(lexicon.TASKS)}')
  if limit is not None and limit < 1:
    raise ConfigError(f'prompt limit must be >= 1 (or None: all), got {limit}')
  prompts = split_prompts(data_dir, f'{task}_{split}', dataset_config)
  if limit is not None:
    prompts = prompts[:limit]
  if not prompts:
    raise InputError(f'{data_dir}: the mini_world split {task}_{split} has no prompts')
  return PromptSet(task, prompts, encode_prompts(text_graphdef, text_params, prompts))


def negative_conditioning(text_graphdef: Any, text_params: Any) -> dict[str, np.ndarray]:
  """The empty prompt's conditioning with a leading axis of 1 (CFG's unconditional branch)."""
  return encode_prompts(text_graphdef, text_params, [''])
