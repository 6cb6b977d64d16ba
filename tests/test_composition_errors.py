"""The composition error-profile benchmark (benchmarks/composition_errors.py)."""

import json
import os
import sys

import numpy as np

import mini_testing
from opd_jax.mini_world import grammar, lexicon, render, sprites

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import composition_errors  # noqa: E402


def _canvas(objects):
  """Grey 16×16 image with (colour, shape, cell row, cell column) objects drawn in."""
  image = np.full((render.IMAGE_SIZE, render.IMAGE_SIZE, 3), 0.45, np.float32)
  for color, shape, r, c in objects:
    y, x = r * render.CELL, c * render.CELL
    image[y:y + sprites.OBJECT_SIZE, x:x + sprites.OBJECT_SIZE][sprites.SHAPE_MASKS[shape]] = (
        lexicon.COLORS[color])
  return image


def test_clean_renders_have_no_errors():
  prompts = grammar.prompt_set('composition', 'train')[:64]
  p = composition_errors.error_profile(render.render_batch(prompts, np.random.default_rng(0)),
                                       prompts)
  assert p['strict'] == 1.0 and p['count_difference']['0'] == 1.0
  assert p['neighbouring_objects'] == p['merged_blobs'] == p['neighbouring_duplicates'] == 0.0
  assert sum(p['samples_by_kind'].values()) == p['samples'] == 64


def test_duplicates_neighbours_and_merged_blobs_are_counted():
  images = np.stack([
      _canvas([('red', 'circle', 0, 0), ('red', 'circle', 1, 1)]),    # a named duplicate
      # Touching: one 8×4 blob, which the detector reads as one square (fill 1.0), so strict
      # passes — only the blob's size shows it.
      _canvas([('red', 'square', 0, 0), ('red', 'square', 0, 1)]),
      _canvas([('red', 'circle', 1, 1)]),                             # right
      _canvas([('red', 'circle', 0, 0), ('blue', 'square', 1, 0)]),   # an unnamed neighbour
  ])
  prompts = ['a red circle', 'a red square', 'a red circle', 'a red circle']
  p = composition_errors.error_profile(images, prompts)
  assert p['strict'] == 0.5
  assert p['count_difference'] == {'-2': 0.0, '-1': 0.0, '0': 0.5, '1': 0.5, '2': 0.0, '3': 0.0}
  assert p['neighbouring_objects'] == 0.5
  assert p['merged_blobs'] == 0.25
  assert p['neighbouring_duplicates'] == 0.25


def test_cli_writes_the_profile_per_scale(tmp_path):
  out = str(tmp_path / 'errors')
  rows = composition_errors.main(['--base_dir', mini_testing.tiny_base_dir(), '--scales', '1',
                                  '3', '--max_prompts', '2', '--samples', '2', '--data_dir',
                                  mini_testing.data_dir(), '--dataset_config', 'small',
                                  '--out', out])
  assert list(rows) == [1.0, 3.0]
  for r in rows.values():
    assert r['samples'] == 4 and abs(sum(r['count_difference'].values()) - 1.0) < 1e-9
  with open(out + '.json') as f:
    assert json.load(f)['rows']['3.0']['strict'] == rows[3.0]['strict']
  with open(out + '.md') as f:
    assert f'| 3 | {rows[3.0]["strict"]:.3f} |' in f.read()
