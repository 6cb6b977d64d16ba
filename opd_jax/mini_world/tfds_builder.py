"""TFDS builder `mini_world`: the mini world's prompt sets and pretraining pairs on disk.

Stored as array_record with plain tensor features, so it is read with
`builder.as_data_source(split)` (random access, no TensorFlow needed; TensorFlow is not
installed). Splits:

- `{task}_train`, `{task}_test` for task in lexicon.TASKS: the prompt sets of
  `grammar.prompt_set`, one example per prompt with a ground-truth image (a reference; the RL
  stages only use the prompts).
- `pretrain`: (image, prompt) pairs for base-model pretraining, `pretrain_per_task` per task,
  prompts from `grammar.pretrain_prompts` (never a test meaning), images from
  `render.render_imperfect` with the config's `corrupt_prob`, so the base model is deliberately
  imperfect (see render).

Features: image uint8 [S, S, 3]; tokens int32 [MAX_LEN] (tokenizer.encode, PAD = 0; the mask is
tokens != 0); prompt text (read back as bytes); task int32 scalar (index into lexicon.TASKS);
corrupted int32 scalar (1 if the image is deliberately wrong for its prompt). The data source
returns the scalars as Python ints.

Everything is generated from fixed seeds, so a build is reproducible. Bump VERSION whenever the
grammar, renderer or tokenizer changes, or stale data will be reused from `data_dir`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence, Union

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from opd_jax.errors import ConfigError, InputError
from opd_jax.mini_world import grammar
from opd_jax.mini_world import lexicon
from opd_jax.mini_world import render
from opd_jax.mini_world import tokenizer


@dataclasses.dataclass(eq=False)
class MiniWorldConfig(tfds.core.BuilderConfig):
  """Builder options.

  Attributes:
    pretrain_per_task: examples per task in the `pretrain` split.
    corrupt_prob: probability that a pretraining image is deliberately wrong for its prompt.
    seed: seed of the rendering and pretraining-prompt sampling (the prompt splits always use
      grammar's canonical split seed 0).
  """
  pretrain_per_task: int = 4096
  corrupt_prob: float = render.CORRUPT_PROB
  seed: int = 0


SPLIT_NAMES = tuple(f'{task}_{split}' for task in lexicon.TASKS for split in grammar.SPLITS)
PRETRAIN_SPLIT = 'pretrain'


class MiniWorld(tfds.core.GeneratorBasedBuilder):
  """The mini world's prompt sets and (deliberately imperfect) pretraining pairs."""

  VERSION = tfds.core.Version('3.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'Text is a left-aligned line; 3 × 4096 pretraining pairs.',
                   '2.0.0': 'Mini world v2: six glyphs, strings of 2-3, one text row; 4×4 '
                            'objects in the cells of the patch grid; config `large`.',
                   '3.0.0': 'Mini world v3: one fixed object layout per count and per relation; '
                            'relation phrases are one token.'}
  BUILDER_CONFIGS = [
      MiniWorldConfig(name='default', description='3 × 4096 pretraining pairs.'),
      MiniWorldConfig(name='large', pretrain_per_task=32768,
                      description='3 × 32768 pretraining pairs: what the base is trained on.'),
      MiniWorldConfig(name='small', pretrain_per_task=32,
                      description='3 × 32 pretraining pairs, for tests.'),
  ]
  DEFAULT_CONFIG_NAME = 'default'
  # tfds 4.9.10 finds a builder's source file through a lazy `importlib_resources` import, a
  # package it only depends on for Python < 3.9, so any builder outside tensorflow_datasets
  # fails on 3.11 without it. Giving the path directly skips that lookup.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    size = render.IMAGE_SIZE
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
            'tokens': tfds.features.Tensor(shape=(tokenizer.MAX_LEN,), dtype=np.int32),
            'prompt': tfds.features.Text(),
            'task': tfds.features.Tensor(shape=(), dtype=np.int32),
            'corrupted': tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated locally
    cfg = self.builder_config
    gens = {}
    for task in lexicon.TASKS:
      for split in grammar.SPLITS:
        prompts = grammar.prompt_set(task, split)
        gens[f'{task}_{split}'] = self._generate_examples(prompts, [task] * len(prompts),
                                                          corrupt_prob=0.0,
                                                          seed=(cfg.seed, task, split))
    prompts, tasks = [], []
    for task in lexicon.TASKS:
      prompts += grammar.pretrain_prompts(task, cfg.pretrain_per_task, seed=cfg.seed)
      tasks += [task] * cfg.pretrain_per_task
    gens[PRETRAIN_SPLIT] = self._generate_examples(prompts, tasks, corrupt_prob=cfg.corrupt_prob,
                                                   seed=(cfg.seed, PRETRAIN_SPLIT))
    return gens

  def _generate_examples(self, prompts: Sequence[str], tasks: Sequence[str],
                         corrupt_prob: float, seed: tuple) -> Iterator[tuple[int, dict]]:
    """Yields (index, example); the seed tuple's strings enter the RNG seed as their UTF-8 bytes."""
    words = [s if isinstance(s, int) else int.from_bytes(s.encode(), 'little') for s in seed]
    rng = np.random.default_rng(words)
    tokens, _ = tokenizer.encode(prompts)
    for i, (prompt, task) in enumerate(zip(prompts, tasks)):
      image, corrupted = render.render_imperfect(prompt, rng, corrupt_prob)
      yield i, {
          'image': image,
          'tokens': tokens[i],
          'prompt': prompt,
          'task': np.int32(lexicon.TASK_IDS[task]),
          'corrupted': np.int32(corrupted),
      }


def load_split(data_dir: str, split: str,
               config: Union[str, MiniWorldConfig] = 'default') -> Sequence[dict]:
  """Returns a random-access data source of one split, building the dataset first if needed.

  Args:
    data_dir: local TFDS data directory (the build writes data_dir/mini_world/...).
    split: a name in SPLIT_NAMES or 'pretrain' (TFDS slicing such as 'pretrain[:10%]' works).
    config: builder config name ('default', 'small') or a MiniWorldConfig.

  Returns:
    A sequence of example dicts (image uint8 [S, S, 3], tokens int32 [L], prompt bytes,
    task int, corrupted int).

  Raises:
    ConfigError: an unknown config name or split; InputError: a `data_dir` where the dataset
      cannot be built or read (a file, no permission).
  """
  names = [c.name for c in MiniWorld.BUILDER_CONFIGS]
  if isinstance(config, str) and config not in names:
    raise ConfigError(f'unknown mini_world dataset_config {config!r}; expected one of {names}')
  splits = SPLIT_NAMES + (PRETRAIN_SPLIT,)
  if split.split('[')[0] not in splits:   # TFDS slicing: 'pretrain[:10%]'
    raise ConfigError(f'mini_world split {split!r} is not one of {list(splits)}')
  try:
    builder = MiniWorld(config=config, data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare()  # a no-op when the dataset already exists
  except OSError as e:
    raise InputError(f'{data_dir}: cannot build or read the mini_world dataset there '
                     f'({type(e).__name__}: {e})') from None
  return builder.as_data_source(split)
