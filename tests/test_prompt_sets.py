"""Tests of the Table 1 prompt-file parsers on the real files and on malformed ones."""

import json
import os
import re

import pytest

from opd_jax.errors import ConfigError, InputError
from opd_jax.eval import prompt_sets as ps

# shared/ lies beside the repository checkout (its README); a user's clone may not have it.
EVAL_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'shared', 'data', 'eval_prompts')

REAL_FILES = [
    ('geneval', 'geneval_test_metadata.jsonl', 2212),
    ('ocr', 'ocr_test.txt', 1018),
    ('plain', 'drawbench_test.txt', 1000),
    ('plain', 'pickscore_test.txt', 2048),
    ('plain', 'pickscore_train.txt', 25432),
]


@pytest.mark.skipif(not os.path.isdir(EVAL_PROMPTS), reason='no shared/data/eval_prompts here')
@pytest.mark.parametrize('kind, name, lines', REAL_FILES)
def test_real_prompt_files(kind, name, lines):
  path = os.path.join(EVAL_PROMPTS, name)
  records = ps.read_prompt_set(kind, path)
  assert len(records) == lines
  assert [r.line for r in records] == list(range(1, lines + 1))
  assert all(r.prompt and r.prompt == r.prompt.strip() for r in records)
  if kind == 'geneval':   # typed records give back GenEval's metadata exactly
    with open(path, encoding='utf-8') as f:
      assert [r.metadata() for r in records] == [json.loads(line) for line in f]
    assert {r.tag for r in records} == set(ps.GENEVAL_TAGS)
    assert {c.class_name for r in records for c in r.include} == set(ps.GENEVAL_CLASSES)
  if kind == 'ocr':
    assert records[0].target == 'Spring Collection 2024'
    assert all(f'"{r.target}"' in r.prompt for r in records)


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text, encoding='utf-8')
  return str(path)


GOOD = {'tag': 'position', 'prompt': 'a photo of a dog right of a cat',
        'include': [{'class': 'cat', 'count': 1},
                    {'class': 'dog', 'count': 1, 'position': ['right of', 0]}]}


def test_geneval_record_fields(tmp_path):
  lines = [json.dumps(GOOD), '', '   ',
           json.dumps({'tag': 'counting', 'prompt': ' two cups ',
                       'include': [{'class': 'cup', 'count': 2}],
                       'exclude': [{'class': 'cup', 'count': 3}]})]
  records = ps.read_geneval_metadata(_write(tmp_path, 'g.jsonl', '\r\n'.join(lines)))
  assert [r.line for r in records] == [1, 4]   # blank lines skipped, numbers kept
  assert records[0].include[1] == ps.GenEvalClause('dog', 1, None, ('right of', 0))
  assert records[1].prompt == 'two cups' and records[1].exclude == (ps.GenEvalClause('cup', 3),)
  unseen = dict(GOOD, include=[{'class': 'dragon', 'count': 1}])
  path = _write(tmp_path, 'unseen.jsonl', json.dumps(unseen))
  assert ps.read_geneval_metadata(path, classes=None)[0].include[0].class_name == 'dragon'


@pytest.mark.parametrize('line2, message', [
    ('{"tag": "counting", "include": [', r'invalid JSON \(.* at column \d+\)'),
    ('["a", "list"]', 'expected a JSON object, got list'),
    (dict(GOOD, tag='texture'), "tag 'texture' is not one of single_object, "),
    ({k: v for k, v in GOOD.items() if k != 'prompt'}, "record is missing field 'prompt'"),
    (dict(GOOD, colour='red'), "record has unknown field 'colour'"),
    (dict(GOOD, prompt='  '), '"prompt" must be a non-empty string'),
    (dict(GOOD, include=[]), '"include" must be a non-empty list'),
    (dict(GOOD, exclude={'class': 'cat'}), '"exclude" must be a list'),
    (dict(GOOD, include=[{'class': 'cat'}]), r"include\[0\] is missing field 'count'"),
    (dict(GOOD, include=[{'class': 'cat', 'count': 0}]),
     r'include\[0\]\.count must be a positive integer, got 0'),
    (dict(GOOD, include=[{'class': 'cat', 'count': '2'}]), r"count must be .* got '2'"),
    (dict(GOOD, include=[{'class': 'cat', 'count': True}]), r'count must be .* got True'),
    (dict(GOOD, include=[{'class': 'dragon', 'count': 1}]),
     r"include\[0\]\.class 'dragon' is not one of GenEval's 80 object names"),
    (dict(GOOD, include=[{'class': 'cat', 'count': 1, 'color': 'teal'}]),
     r"include\[0\]\.color 'teal' is not one of red, "),
    (dict(GOOD, include=[{'class': 'cat', 'count': 1}, {'class': 'dog', 'count': 1,
                                                         'position': ['near', 0]}]),
     r"include\[1\]\.position relation 'near'"),
    (dict(GOOD, include=[{'class': 'cat', 'count': 1}, {'class': 'dog', 'count': 1,
                                                         'position': ['above', 2]}]),
     r'include\[1\]\.position index 2 is not an include clause \(0\.\.1\)'),
    (dict(GOOD, include=[{'class': 'cat', 'count': 1, 'position': ['above', 0]}]),
     r'include\[0\]\.position refers to its own clause'),
    (dict(GOOD, exclude=[{'class': 'cat', 'count': 1, 'color': 'red'}]),
     r"exclude\[0\] has unknown field 'color'"),
])
def test_geneval_errors_name_path_and_line(tmp_path, line2, message):
  text = json.dumps(GOOD) + '\n' + (line2 if isinstance(line2, str) else json.dumps(line2))
  path = _write(tmp_path, 'bad.jsonl', text)   # the bad line is the last, without a newline
  with pytest.raises(InputError) as info:
    ps.read_geneval_metadata(path)
  error = str(info.value)
  assert '\n' not in error
  assert error.startswith(f'{path}:2: ')
  assert re.search(message, error), error


def test_ocr_prompts(tmp_path):
  path = _write(tmp_path, 'ocr.txt', 'A neon sign "Open Late" at night\n\nA mug saying "Hi" and "Bye"')
  records = ps.read_ocr_prompts(path)
  assert [(r.line, r.target) for r in records] == [(1, 'Open Late'), (3, 'Hi')]
  for text, message in [('a sign with no quotes', 'no closed double-quoted target'),
                        ('a sign that says "unclosed', 'no closed double-quoted target'),
                        ('a sign that says "  "', 'the quoted target text is empty')]:
    path = _write(tmp_path, 'bad.txt', 'A neon sign "Open"\n' + text + '\n')
    with pytest.raises(InputError, match=rf'^{path}:2: {message}'):
      ps.read_ocr_prompts(path)


def test_plain_prompts_and_file_errors(tmp_path):
  path = _write(tmp_path, 'p.txt', '\ufeff first prompt \n\n second\n')
  assert ps.read_plain_prompts(path) == [ps.TextPrompt(1, 'first prompt'),
                                         ps.TextPrompt(3, 'second')]
  with pytest.raises(InputError, match=r'missing\.txt: prompt file not found$'):
    ps.read_plain_prompts(tmp_path / 'missing.txt')
  with pytest.raises(InputError, match=r'empty\.txt: no prompts'):
    ps.read_plain_prompts(_write(tmp_path, 'empty.txt', '\n  \n'))
  bad = tmp_path / 'latin1.txt'
  bad.write_bytes(b'fine\ncaf\xe9\n')
  with pytest.raises(InputError, match=r'latin1\.txt:2: not UTF-8 text \(byte 4 of the line\)'):
    ps.read_plain_prompts(bad)
  with pytest.raises(ConfigError, match="prompt set kind 'drawbench'"):
    ps.read_prompt_set('drawbench', path)
