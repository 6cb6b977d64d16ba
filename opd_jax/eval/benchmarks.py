"""The three benchmarks of Table 1 (spec §4): their prompt files and how their images are scored.

  geneval    GenEval metadata jsonl (553 prompts × 4 lines): detector + rules (`eval.geneval`),
             colours by CLIP-L zero-shot; one record per image = GenEval's verdict
  ocr        OCR prompts (1018): the OCR reward (`rewards.ocr`)
  drawbench  plain prompts (200 × 5 lines): the model-based rewards named in the config
             (PickScore, CLIPScore, HPSv2.1, Aesthetic), one value each per image

A scorer maps (images uint8 [B, H, W, 3], the batch's prompt items) to one JSON-able record per
image; `table1` turns a cell's records into its Table 1 numbers. Each line of a prompt file is one
image (the repeated lines are the protocol's images per prompt).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from opd_jax.errors import ConfigError
from opd_jax.eval import geneval, prompt_sets, table1

Scorer = Callable[[np.ndarray, Sequence[Any]], list]
RewardFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]

NAMES = ('geneval', 'ocr', 'drawbench')
PROMPT_FORMAT = {'geneval': 'geneval', 'ocr': 'ocr', 'drawbench': 'plain'}


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  items: tuple            # prompt_sets records, one per image
  prompts: tuple[str, ...]


def read_benchmark(name: str, path: str, limit: int = 0) -> Benchmark:
  """The benchmark's prompt file (`limit` > 0: its first `limit` lines only)."""
  if name not in NAMES:
    raise ConfigError(f'config.benchmarks: unknown benchmark {name!r}; known: {list(NAMES)}')
  items = prompt_sets.read_prompt_set(PROMPT_FORMAT[name], path)
  if limit:
    items = items[:limit]
  return Benchmark(name, tuple(items), tuple(item.prompt for item in items))


def geneval_scorer(detector, classify_colors: geneval.ColorClassifier) -> Scorer:
  """Detects each image's classes, then applies GenEval's rules (`geneval.evaluate_image`)."""
  def score(images: np.ndarray, items: Sequence[prompt_sets.GenEvalPrompt]) -> list:
    metadata = [item.metadata() for item in items]
    detections = detector.detect(images, [geneval.metadata_classes(m) for m in metadata])
    return [geneval.evaluate_image(m, d, image, classify_colors).as_dict()
            for m, d, image in zip(metadata, detections, images)]
  return score


def reward_scorer(rewards: Mapping[str, RewardFn]) -> Scorer:
  """Every named reward on every image: records {name: value, ...}."""
  def score(images: np.ndarray, items: Sequence[Any]) -> list:
    prompts = [item.prompt for item in items]
    values = {name: np.asarray(fn(images, prompts), np.float64) for name, fn in rewards.items()}
    for name, v in values.items():
      if v.shape != (len(prompts),) or not np.all(np.isfinite(v)):
        raise FloatingPointError(f'reward {name!r} returned {v.shape} values, not {len(prompts)} '
                                 'finite ones')
    return [{name: float(v[i]) for name, v in values.items()} for i in range(len(prompts))]
  return score


def cell_metrics(name: str, records: Sequence[Mapping[str, Any]],
                 reward_names: Sequence[str] = ()) -> dict:
  """The Table 1 numbers of one cell from its per-image records."""
  if name == 'geneval':
    return table1.geneval_metrics(records)
  if name == 'ocr':
    return table1.mean_metrics(records, ['ocr'])
  return table1.mean_metrics(records, reward_names)
