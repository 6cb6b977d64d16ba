"""The real rewards (`rewards.clip_rewards`) and GenEval's colour classifier (`eval.geneval_colors`)
against torch references written from the upstream formulas, on tiny random transformers CLIPs
saved with `save_pretrained` and a tiny byte-level BPE tokenizer: PickScore (raw and /26),
CLIPScore, HPSv2.1, the LAION aesthetic, the aesthetics mix; batch padding, the host
preprocessing path, a 2-device mesh; one-line errors."""

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from opd_jax.errors import ConfigError, InputError
from opd_jax.eval import geneval
from opd_jax.eval.geneval_colors import clip_color_classifier
from opd_jax.parallel.mesh import make_mesh
from opd_jax.rewards import clip_rewards
from opd_jax.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, PREPROCESS

from clip_testing import reward_models

TOL = 1e-4
PROMPTS = ['a cat', 'A photo of a red-colored cat!', 'cat at a cat', 'x' * 120, 'at']


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  return reward_models(tmp_path_factory.mktemp('rewards'))


@pytest.fixture(scope='module')
def images():
  """5 float images 40×56 in [0, 1], slightly outside at places (the PIL rewards clip)."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:40, 0:56] / 56.0
  base = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], -1)
  return np.clip(base + 0.3 * rng.normal(size=(5, 40, 56, 3)), -0.05, 1.05).astype(np.float32)


def _uint8(images):
  return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- torch references


def _embeds(model, pixels_nhwc, ids=None, mask=None):
  with torch.no_grad():
    image = model.visual_projection(model.vision_model(
        pixel_values=torch.tensor(pixels_nhwc.transpose(0, 3, 1, 2))).pooler_output)
    if ids is None:
      return image, None
    text = model.text_projection(model.text_model(
        input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask)
    ).pooler_output)
  return image, text


def _unit(x):
  return x / x.norm(dim=-1, keepdim=True)


def torch_reference(name, hf, head, tok, images):
  """The upstream scorers' formulas in torch, on the host (upstream-recipe) preprocessing."""
  pixels = PREPROCESS[name].host(images)
  if name == 'aesthetic':
    image, _ = _embeds(hf['clip'], pixels)
    with torch.no_grad():
      return head.layers(_unit(image))[:, 0].numpy()
  if name == 'pickscore':   # PickScoreScorer: padding=True (longest), truncation, 77
    enc = tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors='np')
    image, text = _embeds(hf['pickscore'], pixels, enc['input_ids'], enc['attention_mask'])
    with torch.no_grad():
      return (hf['pickscore'].logit_scale.exp() * (_unit(text) @ _unit(image).T)).diag().numpy()
  if name == 'clipscore':   # ClipScorer: CLIPModel forward, logits_per_image diagonal / 100
    enc = tok(PROMPTS, padding='max_length', truncation=True, return_tensors='pt')
    with torch.no_grad():
      out = hf['clip'](pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)), **enc)
      return (out.logits_per_image.diagonal() / 100).numpy()
  # hpsv2: open_clip tokenizer (sot, tokens, eot, zeros to 77, no mask); normalised features
  ids = np.zeros((len(PROMPTS), 77), np.int64)
  for i, row in enumerate(tok(PROMPTS, truncation=True, max_length=77)['input_ids']):
    ids[i, :len(row)] = row
  image, text = _embeds(hf['hpsv2'], pixels, ids)
  with torch.no_grad():
    return (_unit(image) @ _unit(text).T).diagonal().numpy()


@pytest.fixture(scope='module')
def references(models, images):
  hf, head, tok, _ = models
  return {name: torch_reference(name, hf, head, tok, images)
          for name in ('pickscore', 'clipscore', 'hpsv2', 'aesthetic')}


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize('name', ['pickscore', 'clipscore', 'hpsv2', 'aesthetic'])
def test_reward_matches_upstream_formula(models, images, references, name):
  """5 images in batches of 4 (the tail padded), the JAX preprocessing, float32. The aesthetic
  reward is fed the images as uint8, as upstream feeds it: its PIL preprocessing rounds the float
  images to those same uint8 values, so the reference is unchanged."""
  folders = models[3]
  # The HPS folder has no tokenizer: it takes the clip folder's.
  wanted = {k: folders[k] for k in clip_rewards.FOLDERS[name] + (('clip',) * (name == 'hpsv2'))}
  reward = clip_rewards.load_reward(name, wanted, batch_size=4)
  out = reward(_uint8(images) if name == 'aesthetic' else images, PROMPTS)
  assert out.dtype == np.float32 and out.shape == (5,)
  np.testing.assert_allclose(out, references[name], atol=TOL, rtol=0)
  assert reward(images[:0], []).shape == (0,)


def test_scaled_pickscore_and_the_mix(models, images, references):
  folders = models[3]
  scaled = clip_rewards.load_reward('pickscore_scaled', folders, batch_size=4)
  np.testing.assert_allclose(scaled(images, PROMPTS), references['pickscore'] / 26, atol=TOL / 26,
                             rtol=0)
  mix = clip_rewards.load_reward('aesthetics_mix', folders, batch_size=4)
  want = references['pickscore'] / 26 + references['clipscore'] + references['hpsv2']
  np.testing.assert_allclose(mix(images, PROMPTS), want, atol=TOL, rtol=0)


def test_host_preprocessing_on_a_two_device_mesh(models, images, references):
  """preprocess='host' (numpy/PIL on host, pixels fed to the network) with each batch split over
  2 devices (weights replicated) gives the 1-device JAX-path scores."""
  folders = {k: models[3][k] for k in ('clip', 'aesthetic_head')}
  one = clip_rewards.load_reward('aesthetic', folders, batch_size=4)(_uint8(images), PROMPTS)
  mesh = make_mesh({'data': 2}, jax.devices()[:2])
  sharded = clip_rewards.load_reward('aesthetic', folders, batch_size=4, preprocess='host',
                                     mesh=mesh)
  assert sharded._state['head']['layers'][0]['kernel'][...].sharding.is_fully_replicated
  sharded.precompile(40, 56)      # the program the calls below run
  out = sharded(images, PROMPTS)
  np.testing.assert_allclose(out, one, atol=1e-5, rtol=0)
  np.testing.assert_allclose(out, references['aesthetic'], atol=TOL, rtol=0)
  pixels = PREPROCESS['aesthetic'].host(images)
  np.testing.assert_array_equal(sharded.score_pixels(pixels, PROMPTS), out)
  with pytest.raises(ConfigError, match=r'^batch_size 3: not a multiple'):
    clip_rewards.load_reward('aesthetic', folders, batch_size=3, mesh=mesh)


def test_one_line_errors(models, tmp_path):
  folders = models[3]
  cases = [
      (lambda: clip_rewards.load_reward('pickscore', {'pickscore': str(tmp_path / 'nope')}),
       InputError, f'{tmp_path}/nope: no such directory'),
      (lambda: clip_rewards.load_reward('hpsv2', {'hpsv2': folders['hpsv2']}),
       InputError, f'{folders["hpsv2"]}: no CLIP tokenizer files'),
      (lambda: clip_rewards.load_reward('hpsv2', {'hpsv2': folders['hpsv2'],
                                                  'tokenizer': folders['aesthetic_head']}),
       InputError, f'{folders["aesthetic_head"]}: no CLIP tokenizer files'),
      (lambda: clip_rewards.load_reward('aesthetic', {'clip': folders['clip']}),
       ConfigError, "folders['aesthetic_head']: the aesthetic reward needs it"),
      (lambda: clip_rewards.load_reward('imagereward', folders), ConfigError,
       "reward 'imagereward': unknown"),
      (lambda: clip_color_classifier(tmp_path / 'nope'), InputError,
       f'{tmp_path}/nope: no such directory'),
  ]
  for call, error, start in cases:
    with pytest.raises(error) as info:
      call()
    message = str(info.value)
    assert message.startswith(start) and '\n' not in message, message
  reward = clip_rewards.load_reward('hpsv2', {'hpsv2': folders['hpsv2'], 'clip': folders['clip']})
  with pytest.raises(InputError, match=r'^hpsv2: 2 images but 1 prompts$'):
    reward(np.zeros((2, 8, 8, 3), np.float32), ['a'])
  with pytest.raises(InputError, match=r'^hpsv2 images: expected uint8 or float'):
    reward(np.zeros((2, 8, 8), np.float32), ['a', 'b'])


# ---------------------------------------------------------------------------- colour classes


def _torch_crop_pixels(crop):
  """open_clip preprocess_val as upstream runs it: PIL bicubic shorter side → 224 (one call),
  torchvision CenterCrop (round half even), ToTensor, Normalize — in torch."""
  h, w = crop.shape[:2]
  size = (224, int(224 * w / h)) if h <= w else (int(224 * h / w), 224)
  image = Image.fromarray(crop).resize((size[1], size[0]), Image.Resampling.BICUBIC)
  top, left = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
  x = torch.tensor(np.asarray(image)).permute(2, 0, 1).float().div(255)
  x = x[:, top:top + 224, left:left + 224]
  mean, std = torch.tensor(OPENAI_MEAN)[:, None, None], torch.tensor(OPENAI_STD)[:, None, None]
  return ((x - mean) / std)[None]


def test_color_classifier_matches_zero_shot_reference(models):
  hf, _, tok, folders = models
  model = hf['clip']
  rng = np.random.default_rng(1)
  image = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
  image[10:30, 20:50] = (200, 30, 40)
  mask = np.zeros((48, 64), bool)
  mask[12:28, 22:44] = True
  # Boxes: a 13×9 crop (torchvision's round crop offset ≠ floor), a masked one, one partly
  # outside the image (black padding), one at fractional coordinates.
  objects = [geneval.DetectedObject(np.array([4, 6, 17, 15], np.float32), 0.9, None),
             geneval.DetectedObject(np.array([20, 10, 50, 30], np.float32), 0.8, mask),
             geneval.DetectedObject(np.array([50, 36, 70, 52], np.float32), 0.7, None),
             geneval.DetectedObject(np.array([30.4, 20.6, 45.5, 39.2], np.float32), 0.6, None)]
  classifier = clip_color_classifier(folders['clip'], batch_size=3)
  logits = classifier.logits(image, objects, 'cat')
  names = classifier(image, objects, 'cat')

  with torch.no_grad():
    weights = []
    for texts in geneval.color_prompts('cat'):
      enc = tok(list(texts), padding=True, return_tensors='pt')
      emb = _unit(model.text_projection(model.text_model(**enc).pooler_output))
      weights.append(_unit(emb.mean(0)))
    weights = torch.stack(weights, 1)
    pixels = torch.cat([_torch_crop_pixels(geneval.color_crop(image, o)) for o in objects])
    feats = _unit(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output))
    ref = (100.0 * feats @ weights).numpy()
  np.testing.assert_allclose(classifier.class_weights('cat'), weights.T.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits, ref, atol=TOL * 100, rtol=0)
  assert names == [geneval.COLORS[i] for i in ref.argmax(1)]
  assert set(names) <= set(geneval.COLORS) and len(names) == len(objects)
  empty = geneval.DetectedObject(np.array([5, 5, 5, 9], np.float32), 0.5, None)
  assert len(classifier(image, [empty], 'dog')) == 1 and classifier(image, [], 'cat') == []
