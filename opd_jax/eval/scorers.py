"""The scorers an evaluation config describes (`config.rewards`, `config.geneval`).

  geneval    `HttpDetector(config.geneval.detector_url)` + CLIP-L zero-shot colours
             (`eval.geneval_colors`, weights `config.rewards.clip`)
  ocr        the OCR reward, in-process rapidocr or the OCR service (`config.rewards.ocr_*`)
  drawbench  the rewards `config.benchmarks.drawbench.rewards` names (`rewards.clip_rewards`;
             a reward folder without tokenizer files — HPSv2.1 converted by `convert_clip` —
             uses the `config.rewards.clip` folder's, the same BPE)

Weights are read here, after the config and prompt files were checked; a reward that needs a
folder the config leaves empty is a one-line ConfigError naming the field.
"""

from __future__ import annotations

from typing import Sequence

from opd_jax.errors import ConfigError
from opd_jax.eval import benchmarks as bm

# The reward folders each reward reads (`config.rewards.<field>`).
REWARD_FOLDERS = {'pickscore': ('pickscore',), 'clipscore': ('clip',), 'hpsv2': ('hpsv2',),
                  'aesthetic': ('clip', 'aesthetic_head')}


def _need(c, field: str, why: str) -> str:
  path = c.rewards.get(field, '')
  if not path:
    raise ConfigError(f'config.rewards.{field}: needed by {why} (an HF-format folder)')
  return path


def build_scorers(c, names: Sequence[str]) -> dict[str, bm.Scorer]:
  scorers = {}
  if 'geneval' in names:
    from opd_jax.eval.detector import HttpDetector
    from opd_jax.eval.geneval_colors import clip_color_classifier
    detector = HttpDetector(c.geneval.detector_url, timeout_s=c.geneval.timeout_s,
                            retries=c.geneval.retries, min_score=0.3)
    detector.health()       # fail now, not after the sampling, when the service is not up
    colors = clip_color_classifier(_need(c, 'clip', 'GenEval colour classification'))
    scorers['geneval'] = bm.geneval_scorer(detector, colors)
  if 'ocr' in names:
    from opd_jax.rewards import ocr
    backend = ocr.backend_by_name(c.rewards.ocr_backend, c.rewards.ocr_url)
    scorers['ocr'] = bm.reward_scorer({'ocr': ocr.OCRScorer(backend)})
  if 'drawbench' in names:
    from opd_jax.rewards import clip_rewards
    rewards = {}
    for name in [r for r in c.benchmarks.drawbench.rewards.split(',') if r]:
      if name not in REWARD_FOLDERS:
        raise ConfigError(f'config.benchmarks.drawbench.rewards: unknown reward {name!r}; known: '
                          f'{sorted(REWARD_FOLDERS)}')
      folders = {f: _need(c, f, f'the {name} reward') for f in REWARD_FOLDERS[name]}
      if c.rewards.clip:            # the tokenizer of a folder without one (converted HPSv2.1)
        folders.setdefault('clip', c.rewards.clip)
      rewards[name] = clip_rewards.load_reward(name, folders, batch_size=c.rewards.batch_size)
    if not rewards:
      raise ConfigError('config.benchmarks.drawbench.rewards: name at least one reward')
    scorers['drawbench'] = bm.reward_scorer(rewards)
  return scorers
