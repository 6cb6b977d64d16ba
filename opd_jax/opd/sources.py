"""Where an OPD run's inputs come from, each chosen by name in the config.

  config.base.source      the frozen base weights          BASE_SOURCES
  config.teachers.source  one teacher per task             TEACHER_SOURCES
  config.data.source      per-task prompt conditioning     PROMPT_SOURCES

`load_inputs(config, batch_per_task)` resolves all three, in that order (a mini-world base brings
the text encoder that encodes the prompts), and returns the config with every field the base
dictates filled in (the mini world's network sizes live in the base artifact's meta, so a stage
can never build a differently shaped network than the weights it loads; a diffusers base gives
the transformer's config and, with rollout.shift = 0, the scheduler's shift). Teachers are
declared by task (`config.teachers.tasks.<task>.path / .cfg_scale`) and loaded in data.tasks order.
Missing or mismatched inputs raise `ConfigError` / `InputError` naming the field or path. Each
loaded input also gives a fingerprint of its content, which a resumed run compares.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import ml_collections
from flax import nnx

from opd_jax.data.prompt_source import RandomEmbeddingPrompts, TablePrompts
from opd_jax.errors import ConfigError, InputError
from opd_jax.opd.config import BASE_SOURCES, PROMPT_SOURCES, TEACHER_SOURCES
from opd_jax.train.bases import BASE_LOADERS, Base, require_dir


@dataclasses.dataclass
class Teachers:
  """Per-task teacher pytrees in data.tasks order (None: seeded random stand-ins) and a content
  digest of each loaded one, {'teacher/<task>': digest}."""
  params: list | None = None
  fingerprint: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class OPDInputs:
  config: ml_collections.ConfigDict     # the run's config with base-derived fields filled in
  base: Base
  teachers: list | None                 # per-task teacher pytrees in data.tasks order; None:
                                        # seeded random stand-ins
  prompts: Any                          # a prompt source (next_batch/negative/get/set_position)
  fingerprint: dict                     # {input name: content digest}, compared on resume


# --- teachers -----------------------------------------------------------------------------------
def _random_teachers(config, base: Base) -> Teachers:
  return Teachers()   # opd_setup.build_opd draws seeded stand-ins of the right layout


def _teacher_paths(config, what: str) -> list[tuple[str, str]]:
  """(task, directory) of the declared teacher of every task, in data.tasks order."""
  out = []
  for task in config.data.tasks:
    out.append((task, require_dir(config.teachers.tasks[task].path,
                                   f'teachers.tasks.{task}.path', f'{what} of task {task!r}')))
  return out


def _artifact_teachers(config, base: Base) -> Teachers:
  """Saved RL teachers (`artifacts.save_adapter`), one directory per declared task."""
  from opd_jax.mini_world import artifacts
  out = Teachers([])
  for task, path in _teacher_paths(config, 'the saved teacher'):
    adapter = artifacts.load_adapter(path)
    layout = (int(adapter.meta['lora_rank']), float(adapter.meta['lora_alpha']))
    want = (int(config.lora.rank), float(config.lora.alpha))
    if layout != want:
      raise ConfigError(f'config.lora.rank/alpha: {want} differ from the teacher at {path} '
                        f'(rank, alpha) = {layout}; teachers and student share one layout')
    if task not in adapter.meta['tasks']:
      raise ConfigError(f'config.teachers.tasks.{task}.path: {path} was trained on '
                        f'{adapter.meta["tasks"]}, not on task {task!r}')
    out.params.append(adapter.params)
    out.fingerprint[f'teacher/{task}'] = adapter.fingerprint
  return out


def _peft_teachers(config, base: Base) -> Teachers:
  """PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors), one per declared
  task, e.g. the released DiffusionOPD GenEvalTeacher / OCRTeacher / AesTeacher.

  An adapter of rank ≤ lora.rank whose modules are among the student's LoRA slots is folded
  into the student's layout exactly (zero-padded rank, its alpha/r absorbed into B); a higher
  rank or a module outside the slots is an error naming the adapter.
  """
  from opd_jax.models.peft_io import load_lora_adapter
  from opd_jax.models.registry import abstract_module
  model = abstract_module(config.model, config.lora)
  from opd_jax.fingerprint import directory_fingerprint
  out = Teachers([])
  for task, path in _teacher_paths(config, 'the PEFT adapter'):
    try:
      out.params.append(nnx.to_pure_dict(load_lora_adapter(path, model)))
    except InputError as e:
      raise InputError(f'config.teachers.tasks.{task}.path: {e}') from None
    out.fingerprint[f'teacher/{task}'] = directory_fingerprint(path)
  return out


TEACHER_LOADERS: dict[str, Callable[..., Teachers]] = {
    'random': _random_teachers,
    'artifacts': _artifact_teachers,
    'peft': _peft_teachers,
}


# --- prompts ------------------------------------------------------------------------------------
def _random_prompts(config, base: Base, batch_per_task: int):
  d, m = config.data, config.model
  return RandomEmbeddingPrompts(len(d.tasks), d.num_prompts, d.context_length, m.context_dim,
                                m.pooled_dim, batch_per_task, seed=config.seed)


def _mini_world_prompts(config, base: Base, batch_per_task: int):
  """Train prompts of every task, encoded once by the base's frozen text encoder."""
  from opd_jax.mini_world import conditioning
  if base.text_encoder is None:
    raise ConfigError("config.data.source: 'mini_world' prompts need the mini-world base's text "
                      "encoder (config.base.source = 'mini_world')")
  d = config.data
  sets = [conditioning.load_prompt_set(d.data_dir, task, 'train', *base.text_encoder,
                                       d.dataset_config, d.max_prompts or None)
          for task in d.tasks]
  negative = conditioning.negative_conditioning(*base.text_encoder)
  return TablePrompts([s.cond for s in sets], negative, batch_per_task, seed=config.seed)


def _sd3_embedding_prompts(config, base: Base, batch_per_task: int):
  """Per-task SD3 text conditioning from the cache of `python -m opd_jax.tools.encode_prompts`.

  Tables live in host memory: the recipe's prompt sets (a few thousand prompts per task at
  333 × 4096 float32 tokens ≈ 5.5 MB a prompt) fit on a training host; the key names map to the
  MMDiT's arguments (SD3 attends to every token, padding included, so there is no mask).
  """
  import numpy as np
  from opd_jax.data import prompt_embeddings as pe
  require_dir(config.data.embeddings_dir, 'data.embeddings_dir',
              'a prompt-embedding cache (python -m opd_jax.tools.encode_prompts)')
  sources, negative = pe.open_train_sources(config.data)
  tables = []
  for source, n in sources:
    rows = [source[i] for i in range(n)]
    tables.append({'context': np.stack([r['prompt_embeds'] for r in rows]).astype(np.float32),
                   'pooled': np.stack([r['pooled_prompt_embeds'] for r in rows]
                                      ).astype(np.float32)})
  return TablePrompts(tables, negative, batch_per_task, seed=config.seed)


PROMPT_LOADERS: dict[str, Callable[..., Any]] = {
    'random_embeddings': _random_prompts,
    'mini_world': _mini_world_prompts,
    'sd3_embeddings': _sd3_embedding_prompts,
}


assert set(BASE_LOADERS) == set(BASE_SOURCES) and set(TEACHER_LOADERS) == set(TEACHER_SOURCES)
assert set(PROMPT_LOADERS) == set(PROMPT_SOURCES)


def _lookup(registry: dict, name: str, field: str) -> Callable:
  if name not in registry:
    raise ConfigError(f'config.{field}: {name!r} is not one of {sorted(registry)}')
  return registry[name]


def load_inputs(config: ml_collections.ConfigDict, batch_per_task: int, mesh=None) -> OPDInputs:
  """Base, teachers and prompts of an OPD run (see the module docstring).

  mesh: where loaded base weights go (sharded as the model's logical axes say); None: host.
  """
  config = copy.deepcopy(config)
  base = _lookup(BASE_LOADERS, config.base.source, 'base.source')(config, mesh)
  teachers = _lookup(TEACHER_LOADERS, config.teachers.source, 'teachers.source')(config, base)
  prompts = _lookup(PROMPT_LOADERS, config.data.source, 'data.source')(config, base,
                                                                      batch_per_task)
  fingerprint = {'base': base.fingerprint, **teachers.fingerprint,
                 'prompts': prompts.fingerprint()}
  return OPDInputs(config, base, teachers.params, prompts, fingerprint)

