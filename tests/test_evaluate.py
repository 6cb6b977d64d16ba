"""The evaluation command end to end on a tiny random SD3 pipeline (8 px images).

Real prompt-file formats, the real sampling path (weights loaded torch-free, the Euler ODE with
CFG, the VAE decode) and the scorers the config describes (`eval.scorers`): the OCR reward
(rapidocr), GenEval's rules with a stub detector behind the real detector service and client
and the CLIP colour classifier, and DrawBench's four model-based rewards — on tiny random CLIPs
(`tests/clip_testing.py`). Then: eval.json / eval.md, resume after a kill (no image sampled or
scored twice), the result on 4 devices equal to 1 device's, changed settings refused.
"""

import json
import os
import threading

import jax
import numpy as np
import pytest

from configs import eval_sd35m
from opd_jax.errors import InputError
from opd_jax.eval import benchmarks as bm
from opd_jax.eval import geneval
from opd_jax.eval.detector_service import make_server
from opd_jax.eval.scorers import build_scorers
from opd_jax.evaluate import evaluate

from clip_testing import reward_models
from sd3_testing import T5_WIDTH, tiny_pipeline

GENEVAL_LINES = [
    {'tag': 'single_object', 'include': [{'class': 'dog', 'count': 1}], 'prompt': 'a photo of a dog'},
    {'tag': 'counting', 'include': [{'class': 'cup', 'count': 2}],
     'exclude': [{'class': 'cup', 'count': 3}], 'prompt': 'a photo of two cups'},
    {'tag': 'colors', 'include': [{'class': 'car', 'count': 1, 'color': 'red'}],
     'prompt': 'a photo of a red car'},
]
OCR_LINES = ['A sign that says "open"', 'A poster reading "sale 50"']
DRAWBENCH_LINES = ['A red colored car.', 'A cat on a mat.', 'A red colored car.']


class StubDetector:
  """A detector-service backend: one dog, two cups (score 0.95), one car, fixed boxes."""
  name = 'stub'

  def detect(self, images, class_names, masks):
    out = []
    for image, names in zip(images, class_names):
      dets = {}
      for name in names:
        n = {'dog': 1, 'cup': 2, 'car': 1}.get(name, 0)
        boxes = np.asarray([[0, 0, 4, 4], [4, 4, 8, 8]][:n], np.float32).reshape(n, 4)
        full = np.zeros((n,) + image.shape[:2], bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
          full[k, y0:y1, x0:x1] = True
        dets[name] = geneval.Detections(boxes, np.full((n,), 0.95, np.float32),
                                        full if masks else None)
      out.append(dets)
    return out


class Counting:
  """Wraps a scorer; records how often each image index is scored (by prompt position)."""

  def __init__(self, scorer):
    self.scorer, self.images = scorer, 0

  def __call__(self, images, items):
    self.images += len(images)
    return self.scorer(images, items)


@pytest.fixture(scope='module')
def detector_url():
  server = make_server(StubDetector())
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server.url
  server.shutdown()


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp('eval_inputs')
  tiny_pipeline(with_t5=True).save_pretrained(root / 'pipe')
  rng = np.random.default_rng(0)
  files = {}
  for name, lines in (('geneval', [json.dumps(x) for x in GENEVAL_LINES]),
                      ('ocr', OCR_LINES), ('drawbench', DRAWBENCH_LINES)):
    path = root / f'{name}.txt'
    path.write_text('\n'.join(lines))
    prompts = [json.loads(x)['prompt'] if name == 'geneval' else x for x in lines]
    np.savez(root / f'{name}.npz',
             prompt_embeds=rng.standard_normal((len(lines), 6, T5_WIDTH)).astype(np.float32),
             pooled_prompt_embeds=rng.standard_normal((len(lines), 80)).astype(np.float32),
             negative_prompt_embeds=np.zeros((6, T5_WIDTH), np.float32),
             negative_pooled_prompt_embeds=np.zeros((80,), np.float32),
             prompts=np.asarray(prompts))
    files[name] = (str(path), str(root / f'{name}.npz'))
  _, _, _, rewards = reward_models(root / 'rewards')
  return root, files, rewards


def _config(inputs, out_dir, **sampling):
  root, files, rewards = inputs
  c = eval_sd35m.get_config()
  c.model_dir = str(root / 'pipe')
  c.models = {'base': ''}
  c.models['nocfg'] = ''
  c.model_cfg = {'nocfg': 1.0}
  c.sampling.update(steps=3, resolution=8, batch_size=4, dtype='float32', **sampling)
  for name, (prompts, emb) in files.items():
    c.benchmarks[name].update(prompts=prompts, embeddings=emb)
  c.rewards.update(pickscore=rewards['pickscore'], clip=rewards['clip'], hpsv2=rewards['hpsv2'],
                   aesthetic_head=rewards['aesthetic_head'], batch_size=2)
  c.out_dir = str(out_dir)
  c.grid_images = 2
  return c


@pytest.fixture(scope='module')
def built(inputs, detector_url, tmp_path_factory):
  """The config's scorers, built once (weights read, programs compiled on first use)."""
  c = _config(inputs, tmp_path_factory.mktemp('unused'))
  c.geneval.update(detector_url=detector_url, timeout_s=10.0, retries=0)
  return build_scorers(c, list(bm.NAMES))


def _scorers(built):
  return {name: Counting(scorer) for name, scorer in built.items()}


def _images(out_dir, model, bench, n):
  from PIL import Image
  return np.stack([np.asarray(Image.open(os.path.join(out_dir, model, bench, 'images',
                                                      f'{i:05d}.png'))) for i in range(n)])


@pytest.mark.slow
def test_evaluation_end_to_end_resume_and_devices(inputs, built, tmp_path):
  out = tmp_path / 'one_device'
  scorers = _scorers(built)
  json_path, md_path = evaluate(_config(inputs, out), scorers, devices=jax.devices()[:1])
  doc = json.loads(open(json_path).read())
  assert set(doc['table']) == {'base', 'nocfg'}
  row = doc['table']['base']
  assert set(row) == {'geneval', 'geneval_image_accuracy', 'ocr', 'pickscore', 'clipscore',
                      'hpsv2', 'aesthetic'}
  # The stub finds 1 dog, 2 cups, 1 car: the single-object and counting prompts are correct;
  # the car's colour is whatever the tiny random CLIP says.
  tags = {t['tag']: t for t in doc['details']['base']['geneval']['geneval_summary']['tags']}
  assert tags['single_object']['accuracy'] == tags['counting']['accuracy'] == 1.0
  assert 0.0 <= row['ocr'] <= 1.0 and -1.0 <= row['clipscore'] <= 1.0
  assert all(np.isfinite(row[k]) for k in ('pickscore', 'hpsv2', 'aesthetic'))
  assert set(doc['average']) == {'base', 'nocfg'}
  assert all(v is None or 0.0 <= v <= 1.0 for v in doc['average'].values())
  assert 'Average' in doc['average_definition'] and '| base |' in open(md_path).read()
  assert doc['details']['base']['geneval']['geneval_summary']['images'] == 3
  assert os.path.exists(out / 'grids' / 'base_drawbench.png')
  assert scorers['drawbench'].images == 6 and scorers['geneval'].images == 6   # 2 models
  # CFG 1 and 4.5 give other images from the same keys.
  assert not np.array_equal(_images(out, 'base', 'drawbench', 3),
                            _images(out, 'nocfg', 'drawbench', 3))

  # Kills: one while sampling the OCR cell (its second image not written, nothing scored yet),
  # one while scoring DrawBench (its last score line torn). The rerun samples that one image
  # alone and scores only what has no complete record; the table is unchanged.
  before = _images(out, 'base', 'ocr', 2)
  first = out / 'base' / 'ocr' / 'images' / '00000.png'
  stamp = first.stat().st_mtime_ns
  os.remove(out / 'base' / 'ocr' / 'images' / '00001.png')
  os.remove(out / 'base' / 'ocr' / 'scores.jsonl')
  scores = out / 'base' / 'drawbench' / 'scores.jsonl'
  lines = scores.read_text().splitlines(keepends=True)
  scores.write_text(''.join(lines[:-1]) + lines[-1][:10])
  again = _scorers(built)
  evaluate(_config(inputs, out), again, devices=jax.devices()[:1])
  assert again['ocr'].images == 2 and again['drawbench'].images == 1
  assert again['geneval'].images == 0
  np.testing.assert_array_equal(_images(out, 'base', 'ocr', 2), before)
  assert first.stat().st_mtime_ns == stamp          # not sampled again
  redo = json.loads(open(json_path).read())
  assert redo['table'] == doc['table']
  assert len(scores.read_text().splitlines()) == 3

  # Four devices (batch split over the mesh's data axis): the same images up to a rounding step.
  out4 = tmp_path / 'four_devices'
  c4 = _config(inputs, out4)
  c4.models, c4.model_cfg = {'base': ''}, {}
  c4.benchmarks.geneval.prompts = c4.benchmarks.ocr.prompts = ''
  evaluate(c4, _scorers(built), devices=jax.devices()[:4])
  diff = np.abs(_images(out, 'base', 'drawbench', 3).astype(int) -
                _images(out4, 'base', 'drawbench', 3).astype(int))
  assert diff.max() <= 1, diff.max()

  # Other settings in the same out_dir are refused, naming the cell.
  with pytest.raises(InputError, match=r'settings.json: this evaluation was started with other '
                                       r'settings \(steps differ\)'):
    c = _config(inputs, out)
    c.sampling.steps = 4
    evaluate(c, _scorers(built), devices=jax.devices()[:1])


def test_embedding_cache_must_hold_the_prompt_files_prompts(inputs, built, tmp_path):
  c = _config(inputs, tmp_path / 'out')
  root, files, _ = inputs
  c.benchmarks.ocr.embeddings = files['drawbench'][1]     # another file's embeddings
  c.benchmarks.geneval.prompts = ''
  c.benchmarks.drawbench.prompts = ''
  with pytest.raises(InputError, match=r'config.benchmarks.ocr.embeddings: .*drawbench.npz entry 0 '
                                       r"holds 'A red colored car.'"):
    evaluate(c, _scorers(built), devices=jax.devices()[:1])


@pytest.mark.parametrize('field, value, message', [
    ('model_dir', '/nonexistent', r'config.model_dir: .* is not a folder'),
    ('models.base', '/no/adapter', r'config.models.base: /no/adapter not found'),
    ('sampling.dtype', 'float16', r'config.sampling.dtype'),
    ('benchmarks.ocr.embeddings', '', r'config.benchmarks.ocr.embeddings'),
])
def test_config_errors_name_the_field(inputs, tmp_path, field, value, message):
  from opd_jax.errors import UserError
  c = _config(inputs, tmp_path / 'out')
  node = c
  *path, last = field.split('.')
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(UserError, match=message):
    evaluate(c, {}, devices=jax.devices()[:1])
