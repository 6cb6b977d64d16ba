"""LoRA import/export against diffusers + peft in PyTorch (tiny SD3.5 transformer, float32, 1e-4).

Import: adapters written by peft's `save_pretrained`, diffusers' `save_lora_adapter` and the
pipeline's `save_lora_weights` (with non-zero B, rsLoRA and an alpha_pattern) give the outputs of
the torch model carrying them, also when folded into a model of another rank and alpha.
Export: a JAX adapter with random non-zero A and B, written in either format, loads into
diffusers + peft and reproduces the JAX outputs.
"""

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
import jax
import jax.numpy as jnp

from opd_jax.models.loading.pretrained import load_mmdit
from opd_jax.models.lora import split_model
from opd_jax.models.peft_io import (RECIPE_LORA_TARGETS, AdapterError, load_lora_adapter,
                                    lora_slots, read_peft_adapter, save_lora_adapter)

TOL = 1e-4
CFG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
           pooled_projection_dim=10, out_channels=4, pos_embed_max_size=12,
           dual_attention_layers=(0,), qk_norm='rms_norm')


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """(state_dict, folder) of a random base transformer."""
  torch.manual_seed(0)
  model = SD3Transformer2DModel(**CFG).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  folder = tmp_path_factory.mktemp('base')
  model.save_pretrained(folder)
  return model.state_dict(), folder


def _torch_model(state_dict):
  model = SD3Transformer2DModel(**CFG).eval()
  model.load_state_dict(state_dict)
  return model


def _randomise_lora_b(model, seed=3):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_B' in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))


INPUTS = dict(x=torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(1)),
              ctx=torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2)),
              pooled=torch.randn(2, 10, generator=torch.Generator().manual_seed(4)),
              ts=torch.tensor([950.0, 120.0]))


def _torch_out(model):
  with torch.no_grad():
    return model(hidden_states=INPUTS['x'], encoder_hidden_states=INPUTS['ctx'],
                 pooled_projections=INPUTS['pooled'], timestep=INPUTS['ts']).sample.numpy()


@nnx.jit
def _forward(model, x, ts, ctx, pooled):
  return model(x, ts, ctx, pooled)


def _jax_out(model):
  out = _forward(model, jnp.asarray(INPUTS['x'].numpy().transpose(0, 2, 3, 1)),
                 jnp.asarray(INPUTS['ts'].numpy()), jnp.asarray(INPUTS['ctx'].numpy()),
                 jnp.asarray(INPUTS['pooled'].numpy()))
  return np.asarray(out).transpose(0, 3, 1, 2)


def _with_adapter(folder, path, rank, alpha):
  model = load_mmdit(folder, lora_rank=rank, lora_alpha=alpha)
  nnx.update(model, load_lora_adapter(path, model))
  return model


@pytest.mark.parametrize('rank,alpha', [(4, 8.0), (8, 3.0)])  # same layout; folded (pad + rescale)
def test_import_peft_folder(base, tmp_path, rank, alpha):
  state_dict, folder = base
  peft_model = get_peft_model(_torch_model(state_dict), LoraConfig(
      r=4, lora_alpha=8, init_lora_weights='gaussian', target_modules=list(RECIPE_LORA_TARGETS)))
  _randomise_lora_b(peft_model)
  peft_model.save_pretrained(tmp_path)
  model = _with_adapter(folder, tmp_path, rank, alpha)
  torch_targets = {n.removeprefix('base_model.model.') for n, m in peft_model.named_modules()
                   if hasattr(m, 'lora_A') and n.startswith('base_model.model.')}
  assert set(lora_slots(model)) == torch_targets
  ref = _torch_out(peft_model)
  assert np.abs(ref - _torch_out(_torch_model(state_dict))).max() > 1e-2  # the adapter matters
  np.testing.assert_allclose(_jax_out(model), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize('writer', ['save_lora_adapter', 'pipeline.save_lora_weights'])
def test_import_diffusers_files_with_rslora_and_alpha_pattern(base, tmp_path, writer):
  state_dict, folder = base
  config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={'attn.to_q': 2.0},
                      init_lora_weights='gaussian', target_modules=list(RECIPE_LORA_TARGETS))
  torch_model = _torch_model(state_dict)
  torch_model.add_adapter(config)
  _randomise_lora_b(torch_model)
  if writer == 'save_lora_adapter':
    torch_model.save_lora_adapter(tmp_path)
  else:
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(torch_model),
        transformer_lora_adapter_metadata=config.to_dict())
  peft = read_peft_adapter(tmp_path)
  assert peft.scale['transformer_blocks.0.attn.to_q'] == pytest.approx(2.0 / 2.0)
  assert peft.scale['transformer_blocks.0.attn.to_k'] == pytest.approx(8.0 / 2.0)
  np.testing.assert_allclose(_jax_out(_with_adapter(folder, tmp_path, 4, 8.0)),
                             _torch_out(torch_model), atol=TOL, rtol=0)


def _random_adapter(model, seed=7):
  _, _, adapter = split_model(model)
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape)
                                      for k, x in zip(keys, leaves)])


@pytest.mark.parametrize('fmt', ['peft', 'diffusers'])
def test_export_round_trip(base, tmp_path, fmt):
  state_dict, folder = base
  model = load_mmdit(folder, lora_rank=4, lora_alpha=8.0)
  adapter = _random_adapter(model)
  nnx.update(model, adapter)
  expected = _jax_out(model)
  save_lora_adapter(nnx.to_pure_dict(adapter), model, tmp_path, format=fmt)

  torch_model = _torch_model(state_dict)
  if fmt == 'peft':
    torch_model = PeftModel.from_pretrained(torch_model, tmp_path).eval()
  else:
    torch_model.load_lora_adapter(str(tmp_path), prefix='transformer', use_safetensors=True)
  np.testing.assert_allclose(_torch_out(torch_model), expected, atol=TOL, rtol=0)

  reread = load_lora_adapter(tmp_path, model)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(reread),
               nnx.to_pure_dict(adapter))


def test_adapter_errors(base, tmp_path):
  state_dict, folder = base
  torch_model = _torch_model(state_dict)
  torch_model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights='gaussian',
                                     target_modules=['attn.to_q', 'ff.net.0.proj']))
  torch_model.save_lora_adapter(tmp_path / 'ff')
  model = load_mmdit(folder, lora_rank=4, lora_alpha=8.0)
  with pytest.raises(AdapterError, match=r'without a LoRA slot.*ff\.net\.0\.proj.*lora_targets'):
    load_lora_adapter(tmp_path / 'ff', model)
  ff_model = load_mmdit(folder, lora_rank=4, lora_alpha=8.0,
                        lora_targets=('attn.to_q', 'ff.net.0.proj'))
  adapter = load_lora_adapter(tmp_path / 'ff', ff_model)
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(adapter))
  with pytest.raises(AdapterError, match='no LoRA slots'):
    load_lora_adapter(tmp_path / 'ff', load_mmdit(folder))
  with pytest.raises(AdapterError, match='adapter rank 2 exceeds the model LoRA rank 1'):
    load_lora_adapter(tmp_path / 'ff', load_mmdit(folder, lora_rank=1,
                                                   lora_targets=('attn.to_q', 'ff.net.0.proj')))

  dora = _torch_model(state_dict)
  dora.add_adapter(LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=['attn.to_q']))
  dora.save_lora_adapter(tmp_path / 'dora')
  with pytest.raises(AdapterError, match='unsupported tensor .*lora_magnitude_vector|use_dora'):
    load_lora_adapter(tmp_path / 'dora', model)
