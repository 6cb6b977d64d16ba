"""Prompt grammar of the mini world: templates, parsing, and deterministic train/test splits.

Prompt forms (one template per meaning, so `parse` and `to_prompt` are exact inverses):

- composition (GenEval-like), four kinds mirroring GenEval's categories:
  single "a red circle"; counting "three blue squares"; two_object "a red square and a green
  circle"; position "a red square on the left of a blue circle" (also right of / above / below).
- text (OCR-like): 'the text "AC4"' with 2-3 glyphs from `lexicon.GLYPHS`.
- aesthetics (PickScore-like): "a calm sunset gradient" = a {mood} {palette} {pattern}.

Splits hold out *meanings*, not just strings: "A on the left of B" and "B on the right of A" (or
"A and B" / "B and A") are one unit, and a unit goes wholly to train or to test, so no held-out
prompt is a rephrasing of a training prompt. Units are grouped into strata (composition kind,
text length, aesthetics pattern) and both splits are balanced across strata by water-filling,
with at most MAX_TEST_FRACTION of any stratum held out so small strata (there are only 15 single
objects) still appear in training.

Default sizes: 256 test prompts for composition (7 single, 15 counting, 52 two-object and 182
position units: at most half of a stratum), 64 for aesthetics and 63 for text (a quarter of the
36 two-glyph and 216 three-glyph strings); train is every remaining unit for composition (314),
text (189) and aesthetics (224 of 288).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from typing import ClassVar, Union

import numpy as np

from opd_jax.mini_world import lexicon

NUM_TRAIN = 384
# Held-out prompts per task, and the most of any stratum held out. Composition holds out more
# (mini world v3): a GRPO-Guard teacher's gain on 128 train prompts stayed within 4 SE (z 3.6-4.0,
# groups of 8, an exploratory measurement), and the SE falls as 1/√prompts; more samples per
# prompt helped little there (z 3.8 with 2, 4.0 with 4), its per-prompt gains vary that much.
NUM_TEST = {'composition': 256, 'text': 64, 'aesthetics': 64}
MAX_TEST_FRACTION = {'composition': 0.5, 'text': 0.25, 'aesthetics': 0.25}
SPLITS = ('train', 'test')


@dataclasses.dataclass(frozen=True)
class ObjectGroup:
  """`count` objects of one colour and shape."""
  color: str
  shape: str
  count: int = 1


@dataclasses.dataclass(frozen=True)
class CompositionSpec:
  """A composition prompt's meaning.

  Attributes:
    kind: 'single', 'counting', 'two_object' or 'position'.
    objects: the object groups in prompt order (one group, or two for two_object / position).
    relation: for kind 'position', where objects[0] is relative to objects[1] (a key of
      lexicon.RELATIONS); None otherwise.
  """
  kind: str
  objects: tuple[ObjectGroup, ...]
  relation: str | None = None
  task: ClassVar[str] = 'composition'


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """A text prompt's meaning: the glyph string to draw."""
  text: str
  task: ClassVar[str] = 'text'


@dataclasses.dataclass(frozen=True)
class AestheticsSpec:
  """An aesthetics prompt's meaning: a palette blended in a pattern, shaded by a mood."""
  mood: str
  palette: str
  pattern: str
  task: ClassVar[str] = 'aesthetics'


Spec = Union[CompositionSpec, TextSpec, AestheticsSpec]

COMPOSITION_KINDS = ('single', 'counting', 'two_object', 'position')


# --- spec <-> prompt --------------------------------------------------------------------------
def _object_phrase(group: ObjectGroup) -> str:
  if group.count == 1:
    return f'a {group.color} {group.shape}'
  return f'{lexicon.NUMBER_WORDS[group.count]} {group.color} {lexicon.PLURALS[group.shape]}'


def to_prompt(spec: Spec) -> str:
  """Returns the prompt string that expresses `spec`."""
  if isinstance(spec, TextSpec):
    return f'the text "{spec.text}"'
  if isinstance(spec, AestheticsSpec):
    return f'a {spec.mood} {spec.palette} {spec.pattern}'
  if spec.kind in ('single', 'counting'):
    return _object_phrase(spec.objects[0])
  first, second = (_object_phrase(g) for g in spec.objects)
  if spec.kind == 'two_object':
    return f'{first} and {second}'
  return f'{first} {lexicon.RELATIONS[spec.relation]} {second}'


def _alternation(words) -> str:
  return '|'.join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOR = f'({_alternation(lexicon.COLORS)})'
_SHAPE = f'({_alternation(lexicon.SHAPES)})'
_OBJECT = f'a {_COLOR} {_SHAPE}'
_RELATION = f'({_alternation(lexicon.RELATIONS.values())})'
_PATTERNS = {
    'text': re.compile(f'the text "([{re.escape(lexicon.GLYPHS)}]'
                       f'{{{lexicon.MIN_TEXT_LEN},{lexicon.MAX_TEXT_LEN}}})"'),
    'aesthetics': re.compile(f'a ({_alternation(lexicon.MOODS)}) ({_alternation(lexicon.PALETTES)})'
                             f' ({_alternation(lexicon.PATTERNS)})'),
    'single': re.compile(_OBJECT),
    'counting': re.compile(f'({_alternation(lexicon.NUMBER_WORDS.values())}) {_COLOR} '
                           f'({_alternation(lexicon.PLURALS.values())})'),
    'two_object': re.compile(f'{_OBJECT} and {_OBJECT}'),
    'position': re.compile(f'{_OBJECT} {_RELATION} {_OBJECT}'),
}
_RELATION_BY_PHRASE = {phrase: key for key, phrase in lexicon.RELATIONS.items()}
_COUNT_BY_WORD = {word: n for n, word in lexicon.NUMBER_WORDS.items()}
_SHAPE_BY_PLURAL = {plural: shape for shape, plural in lexicon.PLURALS.items()}


@functools.lru_cache(maxsize=8192)
def parse(prompt: str) -> Spec:
  """Parses a prompt of the mini-world grammar into its structured spec.

  Args:
    prompt: a prompt produced by `to_prompt` (exact spelling, single spaces, lower-case words).

  Returns:
    A CompositionSpec, TextSpec or AestheticsSpec.

  Raises:
    ValueError: if the prompt is not in the grammar (including the empty prompt).
  """
  for kind, pattern in _PATTERNS.items():
    m = pattern.fullmatch(prompt)
    if m is None:
      continue
    g = m.groups()
    if kind == 'text':
      return TextSpec(g[0])
    if kind == 'aesthetics':
      return AestheticsSpec(*g)
    if kind == 'single':
      return CompositionSpec('single', (ObjectGroup(g[0], g[1]),))
    if kind == 'counting':
      return CompositionSpec('counting',
                             (ObjectGroup(g[1], _SHAPE_BY_PLURAL[g[2]], _COUNT_BY_WORD[g[0]]),))
    if kind == 'two_object':
      return CompositionSpec('two_object', (ObjectGroup(g[0], g[1]), ObjectGroup(g[2], g[3])))
    return CompositionSpec('position', (ObjectGroup(g[0], g[1]), ObjectGroup(g[3], g[4])),
                           _RELATION_BY_PHRASE[g[2]])
  raise ValueError(f'prompt is not in the mini-world grammar: {prompt!r}')


def task_of(prompt: str) -> str:
  """Returns the task name ('composition', 'text' or 'aesthetics') of a grammar prompt."""
  return parse(prompt).task


# --- meaning units and strata -----------------------------------------------------------------
# A unit is a tuple of prompts that all mean the same thing; a stratum is a list of units.
Unit = tuple[str, ...]


def _composition_strata() -> list[list[Unit]]:
  items = [ObjectGroup(c, s) for c in lexicon.COLORS for s in lexicon.SHAPES]
  single = [(to_prompt(CompositionSpec('single', (g,))),) for g in items]
  counting = [(to_prompt(CompositionSpec('counting', (ObjectGroup(g.color, g.shape, n),))),)
              for n in lexicon.NUMBER_WORDS for g in items]
  two = [(to_prompt(CompositionSpec('two_object', (a, b))),
          to_prompt(CompositionSpec('two_object', (b, a))))
         for a, b in itertools.combinations(items, 2)]
  position = [(to_prompt(CompositionSpec('position', (a, b), rel)),
               to_prompt(CompositionSpec('position', (b, a), lexicon.OPPOSITE_RELATION[rel])))
              for a, b in itertools.permutations(items, 2) for rel in ('left', 'above')]
  return [single, counting, two, position]


def _text_strata() -> list[list[Unit]]:
  return [[(to_prompt(TextSpec(''.join(chars))),)
           for chars in itertools.product(lexicon.GLYPHS, repeat=n)]
          for n in range(lexicon.MIN_TEXT_LEN, lexicon.MAX_TEXT_LEN + 1)]


def _aesthetics_strata() -> list[list[Unit]]:
  return [[(to_prompt(AestheticsSpec(m, p, pattern)),)
           for m in lexicon.MOODS for p in lexicon.PALETTES]
          for pattern in lexicon.PATTERNS]


_STRATA = {
    'composition': _composition_strata,
    'text': _text_strata,
    'aesthetics': _aesthetics_strata,
}


def _allocate(total: int, caps: list[int]) -> list[int]:
  """Splits `total` over strata as evenly as possible without exceeding any cap (water-filling)."""
  alloc = [0] * len(caps)
  remaining = min(total, sum(caps))
  while remaining > 0:
    open_strata = [i for i, cap in enumerate(caps) if alloc[i] < cap]
    share = max(1, remaining // len(open_strata))
    for i in open_strata:
      give = min(share, caps[i] - alloc[i], remaining)
      alloc[i] += give
      remaining -= give
      if remaining == 0:
        break
  return alloc


@functools.lru_cache(maxsize=None)
def _split_units(task: str, seed: int) -> dict[str, tuple[tuple[Unit, ...], ...]]:
  """Shuffles each stratum and carves it into test / train / unused units (per stratum)."""
  strata = _STRATA[task]()
  rng = np.random.default_rng([seed, lexicon.TASK_IDS[task]])
  shuffled = [[stratum[i] for i in rng.permutation(len(stratum))] for stratum in strata]
  n_test = _allocate(NUM_TEST[task], [int(MAX_TEST_FRACTION[task] * len(s)) for s in shuffled])
  n_train = _allocate(NUM_TRAIN, [len(s) - t for s, t in zip(shuffled, n_test)])
  out = {'test': [], 'train': [], 'rest': []}
  for stratum, t, r in zip(shuffled, n_test, n_train):
    out['test'].append(tuple(stratum[:t]))
    out['train'].append(tuple(stratum[t:t + r]))
    out['rest'].append(tuple(stratum[t + r:]))
  return {k: tuple(v) for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def _prompt_set(task: str, split: str, seed: int) -> tuple[str, ...]:
  units = [u for stratum in _split_units(task, seed)[split] for u in stratum]
  rng = np.random.default_rng([seed, lexicon.TASK_IDS[task], SPLITS.index(split) + 1])
  # One phrasing per unit, then shuffle so consecutive batches mix the strata.
  prompts = [u[rng.integers(len(u))] for u in units]
  return tuple(prompts[i] for i in rng.permutation(len(prompts)))


def prompt_set(task: str, split: str, seed: int = 0) -> list[str]:
  """Returns the deterministic prompt set of a task's split.

  Args:
    task: 'composition', 'text' or 'aesthetics'.
    split: 'train' or 'test' (held out: no test meaning occurs in train or pretraining data).
    seed: split seed; the default 0 defines the canonical splits.

  Returns:
    The prompts, shuffled (deterministically) across strata.
  """
  if task not in _STRATA or split not in SPLITS:
    raise ValueError(f'unknown task/split {task!r}/{split!r}')
  return list(_prompt_set(task, split, seed))


def pretrain_prompts(task: str, num: int, seed: int = 0, split_seed: int = 0) -> list[str]:
  """Samples `num` prompts (with repeats) for base-model pretraining, never from the test split.

  Draws a stratum uniformly, then a unit of it uniformly, then one of the unit's phrasings, so
  every composition kind / text length / pattern is equally represented. Units outside both
  splits are allowed (for text this is most of the 22k possible strings), which is what a base
  model trained on broad data would have seen.

  Args:
    task: 'composition', 'text' or 'aesthetics'.
    num: number of prompts.
    seed: sampling seed.
    split_seed: the seed of the split whose test units are excluded.
  """
  parts = _split_units(task, split_seed)
  pools = [train + rest for train, rest in zip(parts['train'], parts['rest'])]
  pools = [pool for pool in pools if pool]
  rng = np.random.default_rng([seed, lexicon.TASK_IDS[task], 7])
  prompts = []
  for _ in range(num):
    pool = pools[rng.integers(len(pools))]
    unit = pool[rng.integers(len(pool))]
    prompts.append(unit[rng.integers(len(unit))])
  return prompts
