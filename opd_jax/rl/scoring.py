"""Rewards of the RL trainers: one reward per task, scored off the device's critical path.

`config.rewards.tasks.<task>` names the reward that scores that task's images (REWARD_NAMES):

  composition, text, aesthetics      the mini world's rule rewards (`opd_jax.rewards.registry`)
  pickscore, pickscore_scaled, clipscore, hpsv2, aesthetic, aesthetics_mix
                                     the CLIP rewards on device (`rewards.clip_rewards`; weight
                                     folders config.rewards.<pickscore|clip|hpsv2|aesthetic_head>)
  ocr                                the OCR reward (rapidocr in-process or the OCR service)
  geneval                            GenEval's partial-credit score (Flow-GRPO's training
                                     reward) from the detector service + CLIP-L colours

Scoring runs in one worker thread (`AsyncScorer`): the trainer submits a chunk of images as soon
as the sampler call that makes them is dispatched, and the device goes on sampling the next chunk
while the host scores this one (spec §1: Flow-GRPO's sampling loop scores with a thread pool).
Each process scores the rows its own devices hold (`local_rows`) and the scores are gathered
across processes (`gather_rows`), so no host decodes or scores another host's images. A remote
reward that fails raises after its own bounded retries (OCR service, detector): a training
signal never gets a silent 0. Every reward must return finite float32 [B]; anything else stops
the run with one line naming the task and reward.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from opd_jax.errors import ConfigError, InputError
from opd_jax.rewards import clip_rewards
from opd_jax.rewards import registry as rule_registry

# fn(images [n, H, W, 3] host array, prompts: n str, metadata: n dicts) -> float32 [n]
TaskReward = Callable[[np.ndarray, Sequence[str], Sequence[Mapping]], np.ndarray]

RULE_REWARDS = tuple(rule_registry.REWARDS)    # the mini world's, by task name
CLIP_REWARDS = clip_rewards.REWARDS
REWARD_NAMES = RULE_REWARDS + CLIP_REWARDS + ('ocr', 'geneval')


def _ignore_metadata(fn) -> TaskReward:
  return lambda images, prompts, metadata: fn(images, prompts)


def _rule_reward(name: str, config, mesh) -> TaskReward:
  return _ignore_metadata(rule_registry.get_reward(name))


def _clip_reward(name: str, config, mesh) -> TaskReward:
  r = config.rewards
  folders = {key: r.get(key, '') for key in clip_rewards.FOLDERS[name]}
  for key, path in folders.items():
    if not path:
      raise ConfigError(f'config.rewards.{key}: the {name} reward needs it (an HF-format '
                        'folder; opd_jax.tools.convert_clip makes HPSv2.1\'s and the aesthetic '
                        'head\'s)')
  if r.get('clip', ''):           # the tokenizer of a folder without one (converted HPSv2.1)
    folders.setdefault('clip', r.clip)
  return _ignore_metadata(clip_rewards.load_reward(name, folders, batch_size=r.batch_size))


def _ocr_reward(name: str, config, mesh) -> TaskReward:
  from opd_jax.rewards import ocr
  backend = ocr.backend_by_name(config.rewards.ocr_backend, config.rewards.ocr_url)
  return _ignore_metadata(ocr.OCRScorer(backend))


def _geneval_reward(name: str, config, mesh) -> TaskReward:
  """GenEval's partial-credit score per image (Flow-GRPO's GenEval training reward)."""
  from opd_jax.eval import geneval
  from opd_jax.eval.detector import HttpDetector
  from opd_jax.eval.geneval_colors import clip_color_classifier
  g = config.rewards
  if not g.get('clip', ''):
    raise ConfigError('config.rewards.clip: the geneval reward classifies colours with CLIP-L '
                      '(an HF-format folder)')
  detector = HttpDetector(g.detector_url, timeout_s=g.detector_timeout_s, retries=g.retries,
                          min_score=0.3)
  detector.health()                 # fail before training, not at the first scoring
  colors = clip_color_classifier(g.clip)

  def score(images, prompts, metadata):
    for i, m in enumerate(metadata):
      if not m:
        raise InputError(f'geneval reward: prompt {prompts[i]!r} has no GenEval metadata (the '
                         'prompt cache must come from a GenEval metadata .jsonl)')
    detections = detector.detect(images, [geneval.metadata_classes(m) for m in metadata])
    return np.array([geneval.evaluate_image(m, d, image, colors).score
                     for m, d, image in zip(metadata, detections, images)], np.float32)
  return score


LOADERS: dict[str, Callable[..., TaskReward]] = {
    **{n: _rule_reward for n in RULE_REWARDS},
    **{n: _clip_reward for n in CLIP_REWARDS},
    'ocr': _ocr_reward,
    'geneval': _geneval_reward,
}


@dataclasses.dataclass
class TaskRewards:
  """The reward of each task of config.data.tasks, in that order."""
  names: tuple[str, ...]
  fns: tuple[TaskReward, ...]
  task_names: tuple[str, ...]

  def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping],
               task: np.ndarray) -> np.ndarray:
    """float32 [n]: every image scored by its own task's reward."""
    out = np.zeros(len(prompts), np.float32)
    for k in np.unique(task):
      sel = np.flatnonzero(task == k)
      values = np.asarray(self.fns[k](images[sel], [prompts[i] for i in sel],
                                      [metadata[i] for i in sel]), np.float32)
      if values.shape != (len(sel),) or not np.all(np.isfinite(values)):
        raise FloatingPointError(f'config.rewards.tasks.{self.task_names[k]}: reward '
                                 f'{self.names[k]!r} returned {values.shape} values, not '
                                 f'{len(sel)} finite ones')
      out[sel] = values
    return out


def load_task_rewards(config, mesh=None) -> TaskRewards:
  """Loads the reward of every task (`config.rewards.tasks`), weights read once here."""
  tasks = tuple(config.data.tasks)
  names, fns = [], []
  for task in tasks:
    name = config.rewards.tasks[task]
    if name not in LOADERS:
      raise ConfigError(f'config.rewards.tasks.{task}: unknown reward {name!r}; known: '
                        f'{sorted(LOADERS)}')
    names.append(name)
    fns.append(LOADERS[name](name, config, mesh))
  return TaskRewards(tuple(names), tuple(fns), tasks)


def local_rows(images: Any) -> tuple[np.ndarray, np.ndarray]:
  """(row indices, host images) of the batch rows this process's devices hold.

  A global array split over its leading axis has one shard per device; shards of the same rows
  (replicated over a non-batch mesh axis) are read once. A host numpy array is all local.
  """
  if isinstance(images, np.ndarray) or not hasattr(images, 'addressable_shards'):
    images = np.asarray(images)
    return np.arange(images.shape[0]), images
  blocks = {}
  for shard in images.addressable_shards:
    rows = shard.index[0]
    start = rows.start or 0
    if start not in blocks:
      blocks[start] = np.asarray(shard.data)
  starts = sorted(blocks)
  rows = np.concatenate([start + np.arange(blocks[start].shape[0]) for start in starts])
  return rows, np.concatenate([blocks[s] for s in starts])


def gather_rows(rows: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
  """Scores of every row of the global batch from each process's (rows, values)."""
  out = np.full(size, np.nan, np.float32)
  if jax.process_count() == 1:
    out[rows] = values
  else:
    from jax.experimental import multihost_utils
    both = multihost_utils.process_allgather(np.stack([rows.astype(np.float32), values]))
    for r, v in both.reshape(-1, 2, rows.shape[0]):
      out[r.astype(np.int64)] = v
  if np.isnan(out).any():
    raise RuntimeError(f'rows {np.flatnonzero(np.isnan(out))[:8].tolist()} of the batch were '
                       'scored by no process')
  return out


class AsyncScorer:
  """Scores chunks of a batch in one worker thread while the device samples the next chunk.

  `submit(images, rows_offset, ...)` returns at once; `collect()` waits for every submitted
  chunk, gathers across processes and returns float32 [B] in batch order.
  """

  def __init__(self, rewards: TaskRewards):
    self.rewards = rewards
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                       thread_name_prefix='rewards')
    self._pending: list[concurrent.futures.Future] = []

  def submit(self, images: Any, offset: int, prompts: Sequence[str],
             metadata: Sequence[Mapping], task: np.ndarray) -> None:
    """Scores `images` (rows offset.. of the batch; prompts/metadata/task of the whole batch)."""
    def work():
      rows, host = local_rows(images)     # blocks this thread (not the trainer) on the device
      g = rows + offset
      return g, self.rewards(host, [prompts[i] for i in g], [metadata[i] for i in g], task[g])
    self._pending.append(self._pool.submit(work))

  def collect(self, size: int) -> np.ndarray:
    done, self._pending = self._pending, []
    results = [f.result() for f in done]     # a reward's exception surfaces here
    rows = np.concatenate([r for r, _ in results])
    values = np.concatenate([v for _, v in results])
    return gather_rows(rows, values, size)

  def close(self) -> None:
    self._pool.shutdown(wait=True)
