"""CLIP in NNX against transformers: `CLIPModel` and the two towers with projection, both
activations, both EOS-pooling rules, a padded text batch; the torch-free loader (single and
sharded files, one tower of a two-tower folder, shardings, bf16 compute, one error for every
mismatched key); the open_clip and LAION-aesthetic converters and their command line."""

import importlib.util
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from opd_jax.errors import InputError
from opd_jax.models import aesthetic_head
from opd_jax.models import clip as clip_lib
from opd_jax.models.clip import CLIPConfig, text_attention_bias
from opd_jax.models.loading import clip_weights
from opd_jax.models.loading.clip_weights import load_aesthetic_head, load_clip
from opd_jax.models.loading.place import WeightMismatchError
from opd_jax.models.loading.safetensors_io import CheckpointError
from opd_jax.parallel.mesh import make_mesh
from opd_jax.parallel.sharding import state_shardings
from opd_jax.tools import convert_clip

PROJ = 24
VOCAB, LENGTH = 99, 16
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=LENGTH, bos_token_id=97,
            pad_token_id=0, projection_dim=PROJ)
VISION = dict(hidden_size=48, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, projection_dim=PROJ)
ATOL = 1e-5


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
  """These models are tiny: torch's thread pool only contends with XLA's for the CPU cores
  (one thread is ~50× faster here)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _perturb(model, seed: int):
  """Weights well away from transformers' tiny default init."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _text_batch(eos: int):
  """Token ids whose pooled position differs between the two EOS rules, and their mask
  (right and left padding: only left padding hides keys the causal mask would not).

  eos 50 (first position equal to eos): larger ids (90, 98) precede it, so argmax would pick
  them. eos 2 (legacy, argmax): the id 2 appears before the largest id."""
  if eos == 2:
    ids = np.array([[97, 2, 5, 7, 98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    [97, 11, 2, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 98, 2]])
    return ids, np.array([[1] * 5 + [0] * 11, [1] * 16])
  ids = np.array([[97, 90, 3, 50, 0, 0, 0, 0, 0, 0, 0, 0],
                  [97, 4, 98, 6, 7, 8, 9, 50, 50, 50, 50, 50],
                  [0, 0, 0, 97, 12, 13, 14, 15, 16, 17, 18, 50]])   # left-padded
  mask = np.array([[1] * 4 + [0] * 8, [1] * 8 + [0] * 4, [0] * 3 + [1] * 9])
  return ids, mask


def _images(n: int, seed: int) -> np.ndarray:
  """NCHW float32 'normalised' pixels (transformers' layout)."""
  return np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)


@jax.jit
def _forward(state, ids, pixels_nhwc, mask):
  return nnx.merge(*state)(ids, pixels_nhwc, mask)


def _run(model, ids, pixels_nchw, mask):
  """CLIPModel.__call__ on a transformers-layout batch."""
  out = _forward(nnx.split(model), jnp.asarray(ids),
                 jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)), jnp.asarray(mask))
  return jax.tree.map(np.asarray, out)


def _torch_run(model, ids, pixels, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                 attention_mask=torch.tensor(mask))


def _assert_close(out, ref):
  for name in ('logits_per_image', 'logits_per_text', 'text_embeds', 'image_embeds'):
    np.testing.assert_allclose(getattr(out, name), getattr(ref, name).numpy(), atol=ATOL, rtol=0,
                               err_msg=name)


def _params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope='module')
def clip(tmp_path_factory):
  """A two-tower CLIPModel: quick_gelu, legacy EOS rule (argmax of the ids), and its folder."""
  config = transformers.CLIPConfig(
      text_config=dict(TEXT, hidden_act='quick_gelu', eos_token_id=2),
      vision_config=dict(VISION, hidden_act='quick_gelu'), projection_dim=PROJ)
  model = _perturb(transformers.CLIPModel(config), seed=0)
  with torch.no_grad():
    model.logit_scale.fill_(2.3)
  folder = tmp_path_factory.mktemp('clip')
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope='module')
def towers(tmp_path_factory):
  """CLIPTextModelWithProjection (gelu, eos 50: first-EOS rule) and
  CLIPVisionModelWithProjection (gelu), and their folders."""
  text = _perturb(transformers.CLIPTextModelWithProjection(
      transformers.CLIPTextConfig(**TEXT, hidden_act='gelu', eos_token_id=50)), seed=1)
  vision = _perturb(transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**VISION, hidden_act='gelu')), seed=2)
  folders = tmp_path_factory.mktemp('text'), tmp_path_factory.mktemp('vision')
  text.save_pretrained(folders[0])
  vision.save_pretrained(folders[1])
  return (text, folders[0]), (vision, folders[1])


@pytest.fixture(scope='module')
def clip_model(clip):
  return load_clip(clip[1])


def test_clip_model_matches_transformers(clip, clip_model):
  hf, _ = clip
  ids, mask = _text_batch(2)
  pixels = _images(3, seed=3)
  model = clip_model
  assert model.config.text.hidden_act == 'quick_gelu' and model.config.text.eos_token_id == 2
  _assert_close(_run(model, ids, pixels, mask), _torch_run(hf, ids, pixels, mask))


def test_towers_with_projection(towers):
  """One-tower folders, exact GELU, the first-EOS rule on a padded batch, and the penultimate
  hidden state (what SD3 conditions on)."""
  (text_hf, text_folder), (vision_hf, vision_folder) = towers
  ids, mask = _text_batch(50)
  pixels = _images(2, seed=5)
  text, vision = load_clip(text_folder), load_clip(vision_folder)
  assert text.config.parts == ('text',) and text.vision_model is None
  assert vision.config.parts == ('vision',) and vision.logit_scale is None

  @jax.jit
  def run(text_state, vision_state, ids, mask, px):
    text, vision = nnx.merge(*text_state), nnx.merge(*vision_state)
    out = text.text_model(ids, mask, output_hidden_states=True)
    return (text.text_projection(out.pooler_output), out.hidden_states[-2],
            vision.get_image_features(px))
  embeds, hidden, image = jax.tree.map(np.asarray, run(
      nnx.split(text), nnx.split(vision), jnp.asarray(ids), jnp.asarray(mask),
      jnp.asarray(pixels.transpose(0, 2, 3, 1))))
  with torch.no_grad():
    ref = text_hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  output_hidden_states=True)
    ref_image = vision_hf(pixel_values=torch.tensor(pixels)).image_embeds.numpy()
  np.testing.assert_allclose(embeds, ref.text_embeds.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(image, ref_image, atol=ATOL, rtol=0)
  real = mask.astype(bool)   # padded positions' states are never read
  np.testing.assert_allclose(hidden[real], ref.hidden_states[-2].numpy()[real], atol=ATOL, rtol=0)

  with pytest.raises(ValueError, match='no vision tower'):
    text.get_image_features(jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(CheckpointError, match='no vision tower'):
    load_clip(text_folder, part='vision')


def test_sharded_folder_one_tower_and_old_position_ids(clip, clip_model, tmp_path):
  hf, folder = clip
  hf.save_pretrained(tmp_path / 'sharded', max_shard_size='20KB')
  assert os.path.exists(tmp_path / 'sharded' / 'model.safetensors.index.json')
  full = _params(clip_model)
  jax.tree.map(np.testing.assert_array_equal, _params(load_clip(tmp_path / 'sharded')), full)

  # Older transformers saved position_ids buffers; they are ignored, as transformers does.
  old = tmp_path / 'old'
  shutil.copytree(folder, old)
  tensors = load_file(old / 'model.safetensors')
  tensors['text_model.embeddings.position_ids'] = np.arange(LENGTH)[None]
  save_file(tensors, old / 'model.safetensors', metadata={'format': 'pt'})
  text = load_clip(old, part='text')
  assert text.vision_model is None and text.logit_scale is None
  expected = {k: full[k] for k in ('text_model', 'text_projection')}
  jax.tree.map(np.testing.assert_array_equal, _params(text), expected)


def test_mismatches_listed_together_and_config_errors(clip, tmp_path):
  _, folder = clip
  bad = tmp_path / 'bad'
  shutil.copytree(folder, bad)
  tensors = load_file(bad / 'model.safetensors')
  del tensors['text_model.encoder.layers.1.mlp.fc2.bias']
  tensors['vision_model.extra.weight'] = np.zeros(3, np.float32)
  tensors['visual_projection.weight'] = np.zeros((PROJ, 47), np.float32)
  save_file(tensors, bad / 'model.safetensors')
  with pytest.raises(WeightMismatchError) as info:
    load_clip(bad)
  message = str(info.value)
  assert 'missing (1)' in message and 'text_model.encoder.layers.1.mlp.fc2.bias' in message
  assert 'unexpected (1)' in message and 'vision_model.extra.weight' in message
  assert 'visual_projection.weight: checkpoint [24, 47], model expects [24, 48]' in message

  config = json.loads((folder / 'config.json').read_text())
  config['vision_config']['hidden_act'] = 'relu'
  (bad / 'config.json').write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r'config.json: vision_config.hidden_act \'relu\''):
    load_clip(bad)
  os.remove(bad / 'model.safetensors')
  (bad / 'pytorch_model.bin').write_bytes(b'')
  (bad / 'config.json').write_text((folder / 'config.json').read_text())
  with pytest.raises(CheckpointError, match='no model.safetensors.*pytorch_model.bin'):
    load_clip(bad)


def test_shardings(clip, clip_model):
  _, folder = clip
  mesh = make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2})
  abstract = clip_weights.abstract_clip(clip_weights.clip_config(folder))
  for path, param in nnx.to_flat_state(nnx.state(abstract)):   # every Param can be sharded
    axes = param.get_metadata().get('logical_axes')
    assert axes is not None and len(axes) == param.get_value().ndim, (path, axes)
  model = load_clip(folder, shardings=state_shardings(nnx.state(abstract), mesh))
  vision, text = model.vision_model, model.text_model
  assert vision.encoder.layers[0].self_attn.q_proj.kernel[...].sharding.spec == P('fsdp',
                                                                                  'tensor')
  assert text.encoder.layers[1].mlp.fc2.kernel[...].sharding.spec == P('tensor', 'fsdp')
  assert text.embeddings.token_embedding.weight[...].sharding.spec == P(None, 'fsdp')
  jax.tree.map(np.testing.assert_array_equal, _params(model), _params(clip_model))


def test_bfloat16_compute(towers):
  """bf16 matmuls and convolution on float32 parameters (the vision tower: every op kind but
  the text embeddings): float32 outputs within bf16 rounding of the reference."""
  _, (hf, folder) = towers
  model = load_clip(folder, dtype=jnp.bfloat16)
  assert model.vision_model.encoder.layers[0].mlp.fc1.kernel[...].dtype == jnp.float32
  pixels = _images(2, seed=7)
  ours = np.asarray(jax.jit(lambda s, px: nnx.merge(*s).get_image_features(px))(
      nnx.split(model), jnp.asarray(pixels.transpose(0, 2, 3, 1))))
  with torch.no_grad():
    ref = hf(pixel_values=torch.tensor(pixels)).image_embeds.numpy()
  assert ours.dtype == np.float32
  error = np.abs(ours - ref).max() / np.abs(ref).max()
  assert 1e-4 < error < 2e-2, error   # rounded (not float32), but only by bf16


def test_config_parsing_and_text_mask():
  config = CLIPConfig.from_hf_dict({'model_type': 'clip_vision_model', 'image_size': [64, 64],
                                    'patch_size': 16, 'projection_dim': 8})
  assert config.parts == ('vision',) and config.vision.grid == 4 and config.projection_dim == 8
  assert config.vision.hidden_act == 'quick_gelu'   # transformers' default
  with pytest.raises(ValueError, match='not square'):
    CLIPConfig.from_hf_dict({'model_type': 'clip_vision_model', 'image_size': [64, 32]})
  with pytest.raises(ValueError, match='without projection'):
    CLIPConfig.from_hf_dict({'model_type': 'clip_text_model', 'architectures': ['CLIPTextModel']})
  with pytest.raises(ValueError, match='one integer'):
    CLIPConfig.from_hf_dict({'model_type': 'clip_text_model', 'eos_token_id': [2, 3]})

  # Causal (no key after the query) and padding (key 0) masks, finite in float16.
  left_padded = np.asarray(text_attention_bias(jnp.array([[0, 1, 1]]), 3, jnp.float16))
  np.testing.assert_array_equal(left_padded[0, 0] < 0, [[1, 1, 1], [1, 0, 1], [1, 0, 0]])
  assert left_padded.dtype == np.float16 and np.isfinite(left_padded).all()


# --------------------------------------------------------------------------- converters


def _open_clip_state_dict(hf) -> dict:
  """The HF model's weights under open_clip's names (the reverse of the converter's map,
  written out independently here)."""
  sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
  out = {'token_embedding.weight': sd['text_model.embeddings.token_embedding.weight'],
         'positional_embedding': sd['text_model.embeddings.position_embedding.weight'],
         'ln_final.weight': sd['text_model.final_layer_norm.weight'],
         'ln_final.bias': sd['text_model.final_layer_norm.bias'],
         'text_projection': sd['text_projection.weight'].T.contiguous(),
         'logit_scale': sd['logit_scale'],
         'visual.class_embedding': sd['vision_model.embeddings.class_embedding'],
         'visual.conv1.weight': sd['vision_model.embeddings.patch_embedding.weight'],
         'visual.positional_embedding': sd['vision_model.embeddings.position_embedding.weight'],
         'visual.ln_pre.weight': sd['vision_model.pre_layrnorm.weight'],
         'visual.ln_pre.bias': sd['vision_model.pre_layrnorm.bias'],
         'visual.ln_post.weight': sd['vision_model.post_layernorm.weight'],
         'visual.ln_post.bias': sd['vision_model.post_layernorm.bias'],
         'visual.proj': sd['visual_projection.weight'].T.contiguous(),
         'attn_mask': torch.full((LENGTH, LENGTH), float('-inf')).triu(1)}
  for hf_tower, oc_tower in (('text_model.', ''), ('vision_model.', 'visual.')):
    for i in range(2):
      h, o = f'{hf_tower}encoder.layers.{i}.', f'{oc_tower}transformer.resblocks.{i}.'
      for leaf in ('weight', 'bias'):
        out[f'{o}ln_1.{leaf}'] = sd[f'{h}layer_norm1.{leaf}']
        out[f'{o}ln_2.{leaf}'] = sd[f'{h}layer_norm2.{leaf}']
        out[f'{o}attn.in_proj_{leaf}'] = torch.cat(
            [sd[f'{h}self_attn.{n}_proj.{leaf}'] for n in 'qkv'], dim=0)
        out[f'{o}attn.out_proj.{leaf}'] = sd[f'{h}self_attn.out_proj.{leaf}']
        out[f'{o}mlp.c_fc.{leaf}'] = sd[f'{h}mlp.fc1.{leaf}']
        out[f'{o}mlp.c_proj.{leaf}'] = sd[f'{h}mlp.fc2.{leaf}']
  return out


def test_open_clip_conversion(clip, tmp_path):
  """open_clip pools at argmax(ids), as transformers' legacy rule (eos 2) of `clip` does."""
  hf, _ = clip
  src = tmp_path / 'hps.pt'
  torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v
                                         for k, v in _open_clip_state_dict(hf).items()}}, src)
  out = tmp_path / 'converted'
  config = convert_clip.convert_open_clip(src, out, vision_heads=4, text_heads=4,
                                          hidden_act='quick_gelu')
  assert config['vision_config']['image_size'] == 32 and config['text_config']['eos_token_id'] == 2
  ids, mask = _text_batch(2)
  pixels = _images(3, seed=3)
  _assert_close(_run(load_clip(out), ids, pixels, mask), _torch_run(hf, ids, pixels, mask))
  # transformers reads the folder too, tensor for tensor.
  reloaded = transformers.CLIPModel.from_pretrained(out)
  for key, value in hf.state_dict().items():
    torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)

  with pytest.raises(InputError, match='already exists'):
    convert_clip.convert_open_clip(src, out, vision_heads=4, text_heads=4)
  with pytest.raises(InputError,
                     match=r'not an open_clip ViT-H-14: embed_dim 24 \(expected 1024\)'):
    convert_clip.convert_open_clip(src, tmp_path / 'h', arch='ViT-H-14')
  sd = _open_clip_state_dict(hf)
  del sd['visual.ln_post.bias']
  sd['visual.attnpool.weight'] = torch.zeros(2)
  with pytest.raises(InputError,
                     match=r"missing \['visual.ln_post.bias'\]; unexpected \['visual.attnpool"):
    convert_clip.open_clip_to_hf({k: v.numpy() for k, v in sd.items()},
                                 convert_clip.Heads(4, 4))


def test_aesthetic_head_conversion(tmp_path):
  class MLP(torch.nn.Module):   # LAION's improved-aesthetic-predictor layout
    def __init__(self):
      super().__init__()
      self.layers = torch.nn.Sequential(
          torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
          torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
          torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

  torch.manual_seed(0)
  mlp = MLP().eval()
  torch.save(mlp.state_dict(), tmp_path / 'head.pth')
  config = convert_clip.convert_aesthetic_head(tmp_path / 'head.pth', tmp_path / 'head')
  assert config['layer_dims'] == [768, 1024, 128, 64, 16, 1]
  head = load_aesthetic_head(tmp_path / 'head')
  embeds = np.random.default_rng(0).normal(size=(4, 768)).astype(np.float32)
  with torch.no_grad():
    x = torch.tensor(embeds)
    ref = mlp.layers(x).numpy()
    ref_score = mlp.layers(x / x.norm(dim=-1, keepdim=True))[:, 0].numpy()
  out, score = jax.jit(lambda s, e: (nnx.merge(*s)(e), nnx.merge(*s).score(e)))(
      nnx.split(head), jnp.asarray(embeds))
  np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(score), ref_score, atol=ATOL, rtol=0)

  state = mlp.state_dict()
  state['layers.3.weight'] = state.pop('layers.4.weight')
  torch.save(state, tmp_path / 'wrong.pth')
  with pytest.raises(InputError, match=r"missing \['layers.4.weight'\]"):
    convert_clip.convert_aesthetic_head(tmp_path / 'wrong.pth', tmp_path / 'w')


def test_command_line_errors_are_one_line(tmp_path, capsys):
  cases = [([f'--open_clip={tmp_path}/missing.pt', '--arch=ViT-H-14'],
            f'error: {tmp_path}/missing.pt: not found'),
           ([f'--open_clip={tmp_path}/missing.pt', '--arch=ViT-X-1'],
            "error: --arch: unknown open_clip arch 'ViT-X-1'"),
           ([f'--aesthetic_head={tmp_path}/x.pth', '--arch=ViT-H-14'],
            'error: --arch: only for --open_clip')]
  for args, start in cases:
    with pytest.raises(SystemExit) as info:
      convert_clip.main(['convert_clip', *args, f'--out={tmp_path}/out'])
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.startswith(start) and err.count('\n') == 1, err
  with pytest.raises(SystemExit) as info:
    convert_clip.main(['convert_clip', '--vision_heads=x'])
  assert info.value.code == 2 and capsys.readouterr().err.startswith('error: ')
  assert not os.path.exists(tmp_path / 'out')


def test_library_code_never_imports_torch(clip, tmp_path, monkeypatch):
  """With torch and transformers unimportable, this change's modules still import (their code
  run afresh), transformers folders load, and a .safetensors aesthetic head converts."""
  for name in ('torch', 'transformers'):
    monkeypatch.setitem(sys.modules, name, None)   # `import torch` raises ImportError
  for module in (clip_lib, aesthetic_head, clip_weights, convert_clip):
    spec = importlib.util.spec_from_file_location(f'fresh_{module.__name__}', module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)
    spec.loader.exec_module(fresh)
  assert load_clip(clip[1], part='vision').text_model is None
  rng = np.random.default_rng(0)
  dims = (12, 10, 8, 6, 4, 1)
  tensors = {}
  for i, din, dout in zip(aesthetic_head.SEQUENTIAL_INDEX, dims[:-1], dims[1:]):
    tensors[f'layers.{i}.weight'] = rng.normal(size=(dout, din)).astype(np.float32)
    tensors[f'layers.{i}.bias'] = rng.normal(size=(dout,)).astype(np.float32)
  save_file(tensors, tmp_path / 'head.safetensors')
  convert_clip.convert_aesthetic_head(tmp_path / 'head.safetensors', tmp_path / 'head')
  head = load_aesthetic_head(tmp_path / 'head')
  assert head.layer_dims == dims
  np.testing.assert_array_equal(head.layers[2].kernel[...], tensors['layers.4.weight'].T)


def test_loaded_logit_scale_is_a_scalar(tmp_path):
  """A 0-d checkpoint tensor (`logit_scale`) loads 0-d, as the model declares it."""
  import transformers
  from opd_jax.models.loading.clip_weights import load_clip
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=64, max_position_embeddings=8),
      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, image_size=16, patch_size=8),
      projection_dim=8)
  transformers.CLIPModel(config).save_pretrained(tmp_path)
  assert load_clip(str(tmp_path)).logit_scale[...].shape == ()
