"""Parsers for the prompt files of the Table 1 evaluation (spec §4), read by path.

Three formats, each read into typed records that keep their 1-based file line:

* GenEval metadata (`geneval_test_metadata.jsonl`, 553 prompts × 4 = 2212 lines): one JSON object
  a line, `{"tag", "include": [{"class", "count", "color"?, "position"?: [relation, index]}],
  "exclude"?: [{"class", "count"}], "prompt"}`. Every field is checked: the tag is one of
  GenEval's six, a class one of its 80 object names (`GENEVAL_CLASSES`; pass `classes=None` to
  accept any name, e.g. for a set of unseen objects), a count a positive integer, a colour one of
  its ten, a position a [relation, index] whose index names another include clause; unknown
  fields are errors (a misspelt "colour" would otherwise be ignored and the prompt scored as
  plain counting).
* OCR prompts (`ocr_test.txt`, 1018 lines): one prompt a line, holding a target in ASCII double
  quotes; the target is the first quoted span (`opd_jax.rewards.ocr.ocr_target`, the reward's own
  rule). The file reader is stricter than the reward: the span must be closed by a second quote.
* Plain prompts (`drawbench_test.txt` 1000 lines, `pickscore_test.txt` 2048,
  `pickscore_train.txt` 25432): one prompt a line.

Lines: the file is UTF-8 (a leading BOM is dropped), split at '\\n' ('\\r\\n' too); a last line
without a trailing newline is a line like the others. Prompts are stripped of surrounding
whitespace, as Flow-GRPO's datasets do (`line.strip()`). Blank (whitespace-only) lines are
skipped in every format, as `opd_jax.tools.encode_prompts` does, and records keep their real line
numbers, so skipped lines never shift a reported line. A missing or unreadable file, a file with
no prompt, or a bad line raises `InputError` with one line `path:line: what is wrong`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Collection, Iterator, Optional, Union

from opd_jax.errors import ConfigError, InputError
from opd_jax.eval import geneval
from opd_jax.rewards.ocr import QUOTE, ocr_target

PathLike = Union[str, os.PathLike]

# GenEval's vocabulary, defined once beside its rules.
GENEVAL_TAGS = geneval.TAGS
GENEVAL_COLORS = geneval.COLORS
GENEVAL_RELATIONS = geneval.RELATIONS
GENEVAL_CLASSES = geneval.COCO_CLASSES

_RECORD_FIELDS = ('tag', 'include', 'exclude', 'prompt')
_INCLUDE_FIELDS = ('class', 'count', 'color', 'position')
_EXCLUDE_FIELDS = ('class', 'count')


@dataclasses.dataclass(frozen=True)
class GenEvalClause:
  """One include/exclude requirement: at least (include) or fewer than (exclude) `count`
  objects of `class_name`, optionally of `color` and at `position` = (relation, include index)
  relative to another include clause."""
  class_name: str
  count: int
  color: Optional[str] = None
  position: Optional[tuple[str, int]] = None

  def to_json(self) -> dict[str, Any]:
    record: dict[str, Any] = {'class': self.class_name, 'count': self.count}
    if self.color is not None:
      record['color'] = self.color
    if self.position is not None:
      record['position'] = list(self.position)
    return record


@dataclasses.dataclass(frozen=True)
class GenEvalPrompt:
  line: int
  tag: str
  prompt: str
  include: tuple[GenEvalClause, ...]
  exclude: tuple[GenEvalClause, ...] = ()

  def metadata(self) -> dict[str, Any]:
    """The record in GenEval's metadata form (what its evaluator reads)."""
    record: dict[str, Any] = {'tag': self.tag,
                              'include': [c.to_json() for c in self.include]}
    if self.exclude:
      record['exclude'] = [c.to_json() for c in self.exclude]
    record['prompt'] = self.prompt
    return record


@dataclasses.dataclass(frozen=True)
class OCRPrompt:
  line: int
  prompt: str
  target: str   # the first quoted span, as the OCR reward reads it


@dataclasses.dataclass(frozen=True)
class TextPrompt:
  line: int
  prompt: str


# --------------------------------------------------------------------------- lines


def _lines(path: PathLike) -> Iterator[tuple[int, str]]:
  """(line number, stripped text) of each non-blank line of a UTF-8 file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InputError(f'{path}: prompt file not found' if not os.path.exists(path) else
                     f'{path}: not a file')
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise InputError(f'{path}: unreadable ({e.strerror or e})') from None
  if data.startswith(b'\xef\xbb\xbf'):
    data = data[3:]
  chunks = data.split(b'\n')
  if chunks and chunks[-1] == b'':
    chunks.pop()
  found = False
  for number, chunk in enumerate(chunks, start=1):
    try:
      text = chunk.decode('utf-8').strip()
    except UnicodeDecodeError as e:
      raise InputError(f'{path}:{number}: not UTF-8 text (byte {e.start + 1} of the line)'
                       ) from None
    if text:
      found = True
      yield number, text
  if not found:
    raise InputError(f'{path}: no prompts (the file is empty or has only blank lines)')


# --------------------------------------------------------------------------- GenEval


def read_geneval_metadata(path: PathLike, classes: Optional[Collection[str]] = GENEVAL_CLASSES
                          ) -> list[GenEvalPrompt]:
  """The records of a GenEval metadata .jsonl file, validated field by field."""
  path = os.fspath(path)
  records = []
  for number, text in _lines(path):
    try:
      records.append(_geneval_record(number, text, classes))
    except ValueError as e:
      raise InputError(f'{path}:{number}: {e}') from None
  return records


def _geneval_record(number: int, text: str, classes: Optional[Collection[str]]) -> GenEvalPrompt:
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'invalid JSON ({e.msg} at column {e.colno})') from None
  if not isinstance(record, dict):
    raise ValueError(f'expected a JSON object, got {type(record).__name__}')
  _check_fields(record, _RECORD_FIELDS, required=('tag', 'include', 'prompt'), where='record')
  tag, prompt = record['tag'], record['prompt']
  if tag not in GENEVAL_TAGS:
    raise ValueError(f'tag {tag!r} is not one of {", ".join(GENEVAL_TAGS)}')
  if not isinstance(prompt, str) or not prompt.strip():
    raise ValueError('"prompt" must be a non-empty string')
  include = record['include']
  if not isinstance(include, list) or not include:
    raise ValueError('"include" must be a non-empty list of clauses')
  exclude = record.get('exclude', [])
  if not isinstance(exclude, list):
    raise ValueError('"exclude" must be a list of clauses')
  return GenEvalPrompt(
      line=number, tag=tag, prompt=prompt.strip(),
      include=tuple(_clause(c, f'include[{i}]', i, len(include), classes)
                    for i, c in enumerate(include)),
      exclude=tuple(_clause(c, f'exclude[{i}]', None, len(include), classes)
                    for i, c in enumerate(exclude)))


def _clause(record: Any, where: str, own_index: Optional[int], num_include: int,
            classes: Optional[Collection[str]]) -> GenEvalClause:
  """One clause; `own_index` is None for exclude clauses (class and count only)."""
  if not isinstance(record, dict):
    raise ValueError(f'{where} must be a JSON object, got {type(record).__name__}')
  allowed = _INCLUDE_FIELDS if own_index is not None else _EXCLUDE_FIELDS
  _check_fields(record, allowed, required=('class', 'count'), where=where)
  name, count = record['class'], record['count']
  if not isinstance(name, str) or not name:
    raise ValueError(f'{where}.class must be a non-empty string')
  if classes is not None and name not in classes:
    raise ValueError(f'{where}.class {name!r} is not one of GenEval\'s {len(classes)} object names')
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f'{where}.count must be a positive integer, got {count!r}')
  color = record.get('color')
  if color is not None and color not in GENEVAL_COLORS:
    raise ValueError(f'{where}.color {color!r} is not one of {", ".join(GENEVAL_COLORS)}')
  position = record.get('position')
  if position is not None:
    position = _position(position, where, own_index, num_include)
  return GenEvalClause(name, count, color, position)


def _position(value: Any, where: str, own_index: int, num_include: int) -> tuple[str, int]:
  if not isinstance(value, list) or len(value) != 2:
    raise ValueError(f'{where}.position must be [relation, include index], got {value!r}')
  relation, index = value
  if relation not in GENEVAL_RELATIONS:
    raise ValueError(f'{where}.position relation {relation!r} is not one of '
                     f'{", ".join(GENEVAL_RELATIONS)}')
  if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_include:
    raise ValueError(f'{where}.position index {index!r} is not an include clause '
                     f'(0..{num_include - 1})')
  if index == own_index:
    raise ValueError(f'{where}.position refers to its own clause')
  return relation, index


def _check_fields(record: dict, allowed: tuple[str, ...], required: tuple[str, ...],
                  where: str) -> None:
  for key in record:
    if key not in allowed:
      raise ValueError(f'{where} has unknown field {key!r} (expected {", ".join(allowed)})')
  for key in required:
    if key not in record:
      raise ValueError(f'{where} is missing field {key!r}')


# --------------------------------------------------------------------------- text files


def read_ocr_prompts(path: PathLike) -> list[OCRPrompt]:
  """The prompts of an OCR prompt file, each with its quoted target."""
  path = os.fspath(path)
  records = []
  for number, text in _lines(path):
    if text.count(QUOTE) < 2:
      raise InputError(f'{path}:{number}: no closed double-quoted target text '
                       '(an OCR prompt names its text as "…")')
    try:
      records.append(OCRPrompt(number, text, ocr_target(text)))
    except ValueError as e:
      raise InputError(f'{path}:{number}: {e}') from None
  return records


def read_plain_prompts(path: PathLike) -> list[TextPrompt]:
  """The prompts of a one-prompt-a-line file (DrawBench, Pick-a-Pic)."""
  return [TextPrompt(number, text) for number, text in _lines(path)]


READERS: dict[str, Callable[[PathLike], list]] = {
    'geneval': read_geneval_metadata,
    'ocr': read_ocr_prompts,
    'plain': read_plain_prompts,
}


def read_prompt_set(kind: str, path: PathLike) -> list:
  """`READERS[kind](path)`; kind is 'geneval', 'ocr' or 'plain'."""
  if kind not in READERS:
    raise ConfigError(f'prompt set kind {kind!r}: expected one of {", ".join(READERS)}')
  return READERS[kind](path)
