"""Tests of the mini-world grammar, tokenizer, renderer and TFDS builder."""

import numpy as np
import pytest

from opd_jax.mini_world import grammar
from opd_jax.mini_world import lexicon
from opd_jax.mini_world import render
from opd_jax.mini_world import sprites
from opd_jax.mini_world import tfds_builder
from opd_jax.mini_world import tokenizer

# Text: every string of the 252 (36 of 2 glyphs, 216 of 3) not held out is a training prompt; a
# quarter of each length is held out at most (9 + 54 = 63).
EXPECTED_SIZES = {'composition': (314, 256), 'text': (189, 63), 'aesthetics': (224, 64)}


def _equivalents(prompt):
  """All phrasings with the same meaning as `prompt`."""
  spec = grammar.parse(prompt)
  out = {prompt}
  if isinstance(spec, grammar.CompositionSpec) and spec.kind == 'two_object':
    out.add(grammar.to_prompt(grammar.CompositionSpec('two_object', spec.objects[::-1])))
  if isinstance(spec, grammar.CompositionSpec) and spec.kind == 'position':
    out.add(grammar.to_prompt(grammar.CompositionSpec(
        'position', spec.objects[::-1], lexicon.OPPOSITE_RELATION[spec.relation])))
  return out


@pytest.mark.parametrize('task', lexicon.TASKS)
def test_split_sizes_round_trip_and_task(task):
  train, test = grammar.prompt_set(task, 'train'), grammar.prompt_set(task, 'test')
  assert (len(train), len(test)) == EXPECTED_SIZES[task]
  assert len(set(train)) == len(train) and len(set(test)) == len(test)
  for prompt in train + test:
    spec = grammar.parse(prompt)
    assert grammar.to_prompt(spec) == prompt
    assert spec.task == task == grammar.task_of(prompt)


@pytest.mark.parametrize('task', lexicon.TASKS)
def test_splits_hold_out_meanings_and_are_deterministic(task):
  train = set(grammar.prompt_set(task, 'train'))
  test = grammar.prompt_set(task, 'test')
  for prompt in test:
    assert not _equivalents(prompt) & train, prompt
  pretrain = set(grammar.pretrain_prompts(task, 2000))
  for prompt in test:
    assert not _equivalents(prompt) & pretrain, prompt
  grammar._prompt_set.cache_clear()
  grammar._split_units.cache_clear()
  assert grammar.prompt_set(task, 'test') == test
  assert set(grammar.prompt_set(task, 'train')) == train
  assert grammar.prompt_set(task, 'test', seed=1) != test


def test_splits_cover_every_stratum():
  kinds = {grammar.parse(p).kind for p in grammar.prompt_set('composition', 'test')}
  assert kinds == set(grammar.COMPOSITION_KINDS)
  kinds = {grammar.parse(p).kind for p in grammar.prompt_set('composition', 'train')}
  assert kinds == set(grammar.COMPOSITION_KINDS)
  lengths = {len(grammar.parse(p).text) for p in grammar.prompt_set('text', 'test')}
  assert lengths == {2, 3}


def test_parse_examples_and_rejections():
  spec = grammar.parse('a red square on the left of a blue circle')
  assert spec == grammar.CompositionSpec(
      'position', (grammar.ObjectGroup('red', 'square'), grammar.ObjectGroup('blue', 'circle')),
      'left')
  assert grammar.parse('three green triangles').objects == (
      grammar.ObjectGroup('green', 'triangle', 3),)
  assert grammar.parse('the text "AC4"') == grammar.TextSpec('AC4')
  assert grammar.parse('a calm sunset gradient') == grammar.AestheticsSpec(
      'calm', 'sunset', 'gradient')
  for bad in ['', 'a red', 'the text "ac"', 'the text "ACJL"', 'the text "AT"', 'a red hexagon',
              'two red square']:
    with pytest.raises(ValueError):
      grammar.parse(bad)


def test_tokenizer_shapes_padding_and_round_trip():
  prompts = ['', 'the text "AC4"', 'a red square on the left of a blue circle']
  tokens, mask = tokenizer.encode(prompts)
  assert tokens.dtype == np.int32 and tokens.shape == (3, tokenizer.MAX_LEN)
  assert mask.dtype == bool and mask.shape == tokens.shape
  np.testing.assert_array_equal(mask, tokens != tokenizer.PAD_ID)
  # "on the left of" is one token: BOS a red square left a blue circle EOS.
  np.testing.assert_array_equal(mask.sum(1), [2, 9, 9])
  assert list(tokens[0, :2]) == [tokenizer.BOS_ID, tokenizer.EOS_ID]
  assert (tokens[:, 0] == tokenizer.BOS_ID).all()
  assert tokenizer.decode(tokens) == prompts
  short, _ = tokenizer.encode(prompts[1:2], max_len=9)
  assert short.shape == (1, 9)


def test_tokenizer_relation_phrases_are_one_token():
  # Every relation puts the second object's words at the same positions (mini world v3).
  objects = ('a red square', 'a blue circle')
  rows = [tokenizer.tokenize(f'{objects[0]} {phrase} {objects[1]}')
          for phrase in lexicon.RELATIONS.values()]
  assert [r[3] for r in rows] == list(lexicon.RELATIONS)
  assert {len(r) for r in rows} == {7}
  assert tokenizer.tokenize('on the left of') == ['left']
  # Only the whole phrase is merged: its words elsewhere stay words.
  assert tokenizer.tokenize('the text "AC"') == ['the', 'text', '"', 'A', 'C', '"']
  assert tokenizer.tokenize('on the lefty of') == ['on', 'the', 'lefty', 'of']


def test_tokenizer_covers_every_prompt():
  prompts = [p for t in lexicon.TASKS for s in grammar.SPLITS for p in grammar.prompt_set(t, s)]
  tokens, mask = tokenizer.encode(prompts)
  assert not (tokens == tokenizer.UNK_ID).any()
  assert mask.sum(1).max() <= tokenizer.MAX_LEN
  assert tokenizer.decode(tokens) == prompts
  assert len(set(tokenizer.VOCAB)) == tokenizer.VOCAB_SIZE > tokens.max()


def test_tokenizer_unknown_and_too_long():
  tokens, _ = tokenizer.encode(['a mauve circle'])
  assert tokens[0, 2] == tokenizer.UNK_ID
  with pytest.raises(ValueError):
    tokenizer.encode(['a red square on the left of a blue circle'], max_len=8)
  tokenizer.encode(['a red square on the left of a blue circle'], max_len=9)


@pytest.mark.parametrize('task', lexicon.TASKS)
def test_render_shapes_randomness_and_determinism(task):
  prompt = grammar.prompt_set(task, 'test')[0]
  a = render.render(prompt, np.random.default_rng(0))
  b = render.render(grammar.parse(prompt), np.random.default_rng(0))
  c = render.render(prompt, np.random.default_rng(1))
  assert a.shape == (render.IMAGE_SIZE, render.IMAGE_SIZE, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)  # nuisance factors vary


def test_render_draws_the_glyphs():
  for seed in range(3):
    image = render.render('the text "JX4"', np.random.default_rng(seed)).astype(np.float32)
    background = np.median(image.reshape(-1, 3), 0)
    ink = np.linalg.norm(image - background, axis=-1) > 60
    assert ink.sum() == sum(sprites.FONT[ch].sum() for ch in 'JX4')
    # A left-aligned line at row TEXT_ROW: glyph k in columns 4k..4k+2 (patch column k).
    rows = np.flatnonzero(ink.any(1))
    assert rows[0] == render.TEXT_ROW and rows[-1] - rows[0] == 4
    for k, ch in enumerate('JX4'):
      np.testing.assert_array_equal(ink[rows[0]:rows[0] + 5, 4 * k:4 * k + 3], sprites.FONT[ch])


def _object_cells(image):
  """{(cell_y, cell_x): boolean 4×4 mask of the non-background pixels} of a composition image."""
  image = image.astype(np.float32)
  background = np.median(image.reshape(-1, 3), 0)
  fg = np.linalg.norm(image - background, axis=-1) > 60
  c = render.CELL
  out = {}
  for y, x in zip(*np.nonzero(fg)):
    out.setdefault((y // c, x // c), np.zeros((c, c), bool))[y % c, x % c] = True
  return out


@pytest.mark.parametrize('prompt, relation', [
    ('three red triangles', None), ('a blue circle', None), ('two green squares', None),
    ('a red square on the left of a blue circle', 'left'),
    ('a yellow triangle below a purple square', 'below'),
    ('a red circle and a green triangle', None)])
def test_render_puts_objects_in_separate_patch_cells(prompt, relation):
  spec = grammar.parse(prompt)
  groups = spec.objects
  num = sum(g.count for g in groups)
  layout = render.RELATION_SLOTS[relation] if relation else render.SLOTS[num]
  for seed in range(20):
    cells = _object_cells(render.render(prompt, np.random.default_rng(seed)))
    # The layout is fixed (mini world v3): the same cells for every sample of the prompt.
    assert set(cells) == set(layout)
    # Each object fills its own cell with exactly its shape's mask: aligned to the patch grid.
    assert len(cells) == sum(g.count for g in groups)
    masks = sorted(int(m.sum()) for m in cells.values())
    expected = sorted(int(sprites.SHAPE_MASKS[g.shape].sum()) for g in groups
                      for _ in range(g.count))
    assert masks == expected
    for m in cells.values():
      assert any(np.array_equal(m, sprites.SHAPE_MASKS[s]) for s in lexicon.SHAPES)
    # No two objects in neighbouring cells (diagonals included).
    keys = list(cells)
    for i, a in enumerate(keys):
      for b in keys[i + 1:]:
        assert max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2
    if relation is not None:
      image = render.render(prompt, np.random.default_rng(seed)).astype(np.float32)
      first = np.asarray(lexicon.COLORS[groups[0].color]) * 255
      near = lambda key: np.abs(image[key[0] * 4:key[0] * 4 + 4, key[1] * 4:key[1] * 4 + 4]
                                - first).max(-1).min() < 0.1 * 255
      (a,) = [k for k in keys if near(k)]
      assert a == layout[0]
      (b,) = [k for k in keys if k != a]
      dy, dx = a[0] - b[0], a[1] - b[1]
      assert {'left': dx < 0, 'right': dx > 0, 'above': dy < 0, 'below': dy > 0}[relation]


def test_layouts_fit_the_grid_and_never_touch():
  n = render.IMAGE_SIZE // render.CELL
  layouts = {**{f'count {k}': v for k, v in render.SLOTS.items()}, **render.RELATION_SLOTS}
  for name, cells in layouts.items():
    assert all(0 <= y < n and 0 <= x < n for y, x in cells), name
    for i, a in enumerate(cells):
      for b in cells[i + 1:]:
        assert max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2, name
  for rel, (a, b) in render.RELATION_SLOTS.items():
    (other_a, other_b) = render.RELATION_SLOTS[lexicon.OPPOSITE_RELATION[rel]]
    assert (a, b) == (other_b, other_a)   # "A left of B" is "B right of A"
  with pytest.raises(ValueError, match='no layout'):
    render._place(1, 'left')


def test_render_imperfect_respects_corrupt_prob():
  rng = np.random.default_rng(0)
  for prompt in ['two red circles', 'the text "AC"', 'a calm ice wash']:
    assert not render.render_imperfect(prompt, rng, corrupt_prob=0.0)[1]
    image, corrupted = render.render_imperfect(prompt, rng, corrupt_prob=1.0)
    assert corrupted and image.dtype == np.uint8


def test_garble_changes_the_string():
  rng = np.random.default_rng(0)
  for text in ['AC', 'JX4', 'LCA']:
    for edits in (1, 2):
      out = render.garble(text, rng, edits)
      assert out != text and 1 <= len(out) <= lexicon.MAX_TEXT_LEN
      assert set(out) <= set(lexicon.GLYPHS)


def test_tfds_builder_small(tmp_path):
  data_dir = str(tmp_path)
  pretrain = tfds_builder.load_split(data_dir, 'pretrain', config='small')
  assert len(pretrain) == 3 * 32
  for name in tfds_builder.SPLIT_NAMES:
    task, split = name.rsplit('_', 1)
    source = tfds_builder.load_split(data_dir, name, config='small')
    assert len(source) == len(grammar.prompt_set(task, split))
  ex = source[0]
  assert ex['image'].dtype == np.uint8 and ex['image'].shape == (16, 16, 3)
  assert ex['tokens'].dtype == np.int32 and ex['tokens'].shape == (tokenizer.MAX_LEN,)
  prompt = ex['prompt'].decode()
  assert prompt in grammar.prompt_set('aesthetics', 'test')
  assert tokenizer.decode(ex['tokens']) == [prompt]
  assert int(ex['task']) == lexicon.TASK_IDS['aesthetics'] and int(ex['corrupted']) == 0
  tasks = [int(pretrain[i]['task']) for i in range(len(pretrain))]
  assert np.bincount(tasks).tolist() == [32, 32, 32]
  corrupted = np.mean([pretrain[i]['corrupted'] for i in range(len(pretrain))])
  assert 0.3 < corrupted < 0.7  # corrupt_prob 0.5
