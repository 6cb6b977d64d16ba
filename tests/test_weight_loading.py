"""Loading diffusers folders: single-file and sharded safetensors, bf16 storage, pipeline folders,
target shardings, one clear error for missing / unexpected / mis-shaped tensors, corrupt files —
and no torch anywhere on the loading path."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import SD3Transformer2DModel
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from opd_jax.models.loading.pretrained import abstract_mmdit, load_mmdit, mmdit_config
from opd_jax.models.loading.safetensors_io import CheckpointError
from opd_jax.models.loading.place import WeightMismatchError
from opd_jax.parallel.mesh import make_mesh
from opd_jax.parallel.sharding import state_shardings

CFG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
           pooled_projection_dim=10, out_channels=4, pos_embed_max_size=12,
           dual_attention_layers=(0,), qk_norm='rms_norm')
VAE_CFG = dict(down_block_types=['DownEncoderBlock2D'] * 2, up_block_types=['UpDecoderBlock2D'] * 2,
               block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
               use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1)
WEIGHTS = 'diffusion_pytorch_model.safetensors'


@pytest.fixture(scope='module')
def torch_model():
  torch.manual_seed(0)
  model = SD3Transformer2DModel(**CFG).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  return model


@pytest.fixture(scope='module')
def folder(torch_model, tmp_path_factory):
  path = tmp_path_factory.mktemp('single')
  torch_model.save_pretrained(path)
  return path


def _params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _copy_with(src, dst, edit):
  """Copies a model folder, editing its tensors dict with `edit`."""
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, 'config.json')) as f:
    config = f.read()
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    f.write(config)
  tensors = load_file(os.path.join(src, WEIGHTS))
  edit(tensors)
  save_file(tensors, os.path.join(dst, WEIGHTS))
  return dst


def test_single_file_values_and_layout(torch_model, folder):
  model = load_mmdit(folder)
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  blk = model.transformer_blocks[0]
  key = 'transformer_blocks.0.{}'.format
  np.testing.assert_array_equal(blk.attn.to_q.kernel[...], sd[key('attn.to_q.weight')].T)
  np.testing.assert_array_equal(blk.ff.fc_in.bias[...], sd[key('ff.net.0.proj.bias')])
  np.testing.assert_array_equal(blk.attn2.norm_k.weight[...], sd[key('attn2.norm_k.weight')])
  np.testing.assert_array_equal(model.pos_embed.proj.kernel[...],
                                sd['pos_embed.proj.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(model.pos_embed.pos_embed[...], sd['pos_embed.pos_embed'])


def test_sharded_and_pipeline_folders(torch_model, folder, tmp_path):
  pipeline = tmp_path / 'pipeline'
  torch_model.save_pretrained(pipeline / 'transformer', max_shard_size='20KB')
  shards = [f for f in os.listdir(pipeline / 'transformer') if f.endswith('.safetensors')]
  assert len(shards) > 1 and os.path.exists(pipeline / 'transformer' / (WEIGHTS + '.index.json'))
  assert mmdit_config(pipeline).dual_attention_layers == (0,)
  jax.tree.map(np.testing.assert_array_equal, _params(load_mmdit(pipeline)),
               _params(load_mmdit(folder)))


def test_bfloat16_checkpoint(torch_model, tmp_path):
  bf16 = SD3Transformer2DModel(**CFG)
  bf16.load_state_dict(torch_model.state_dict())
  bf16.to(torch.bfloat16).save_pretrained(tmp_path)
  model = load_mmdit(tmp_path)
  ref = bf16.transformer_blocks[1].attn.add_v_proj.weight.float().detach().numpy().T
  assert model.transformer_blocks[1].attn.add_v_proj.kernel[...].dtype == jnp.float32
  np.testing.assert_array_equal(model.transformer_blocks[1].attn.add_v_proj.kernel[...], ref)


def test_target_shardings(folder):
  mesh = make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2})
  abstract = abstract_mmdit(mmdit_config(folder), lora_rank=4, lora_alpha=8.0)
  shardings = state_shardings(nnx.state(abstract), mesh)
  model = load_mmdit(folder, lora_rank=4, lora_alpha=8.0, shardings=shardings)
  q = model.transformer_blocks[0].attn.to_q
  assert q.kernel[...].sharding.spec == P('fsdp', 'tensor')
  assert q.lora_a[...].sharding.spec == P('fsdp', None)
  assert model.context_embedder.kernel[...].sharding.spec == P(None, 'fsdp')
  jax.tree.map(np.testing.assert_array_equal, _params(model), _params(load_mmdit(folder)))


def test_missing_unexpected_and_misshaped_listed_together(folder, tmp_path):
  def edit(t):
    del t['transformer_blocks.0.attn.to_k.bias']
    t['transformer_blocks.1.attn.add_q_proj.weight'] = np.zeros((16, 8), np.float32)
    t['transformer_blocks.0.extra.weight'] = np.zeros((3,), np.float32)
  bad = _copy_with(folder, tmp_path / 'bad', edit)
  with pytest.raises(WeightMismatchError) as info:
    load_mmdit(bad)
  message = str(info.value)
  assert 'missing (1):\n    transformer_blocks.0.attn.to_k.bias [16]' in message
  assert 'unexpected (1):\n    transformer_blocks.0.extra.weight [3]' in message
  assert ('shape mismatch (1):\n    transformer_blocks.1.attn.add_q_proj.weight: '
          'checkpoint [16, 8], model expects [16, 16]') in message


def test_config_that_disagrees_with_weights(folder, tmp_path):
  bad = _copy_with(folder, tmp_path / 'bad', lambda t: None)
  with open(bad / 'config.json') as f:
    config = json.load(f)
  config['dual_attention_layers'] = [0, 1]
  with open(bad / 'config.json', 'w') as f:
    json.dump(config, f)
  with pytest.raises(WeightMismatchError) as info:
    load_mmdit(bad)
  assert 'missing (10):\n    transformer_blocks.1.attn2.norm_k.weight [8]' in str(info.value)
  assert ('transformer_blocks.1.norm1.linear.weight: checkpoint [96, 16], model expects '
          '[144, 16]') in str(info.value)


def test_corrupt_and_missing_files(folder, tmp_path):
  bad = _copy_with(folder, tmp_path / 'truncated', lambda t: None)
  path = bad / WEIGHTS
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError,
                     match='not a readable safetensors file.*truncated or corrupt'):
    load_mmdit(bad)
  path.write_bytes(b'not a safetensors file at all')
  with pytest.raises(CheckpointError, match='not a readable safetensors file'):
    load_mmdit(bad)
  path.unlink()
  with pytest.raises(CheckpointError, match='no diffusion_pytorch_model.safetensors'):
    load_mmdit(bad)
  with pytest.raises(CheckpointError, match='no config.json'):
    load_mmdit(tmp_path / 'nowhere')


def test_sharded_index_naming_a_missing_shard(torch_model, tmp_path):
  torch_model.save_pretrained(tmp_path, max_shard_size='20KB')
  shard = sorted(f for f in os.listdir(tmp_path) if f.endswith('.safetensors'))[-1]
  os.remove(tmp_path / shard)
  with pytest.raises(CheckpointError, match=f'{shard} not found'):
    load_mmdit(tmp_path)


def test_loading_path_never_imports_torch(folder, tmp_path):
  torch.manual_seed(0)
  TorchAutoencoderKL(**VAE_CFG).save_pretrained(tmp_path / 'vae')
  script = textwrap.dedent(f'''
      import sys
      import jax.numpy as jnp
      from opd_jax.models.loading.pretrained import load_mmdit, load_vae
      from opd_jax.models.peft_io import load_lora_adapter, save_lora_adapter
      model = load_mmdit({str(folder)!r}, lora_rank=2, lora_alpha=2.0)
      v = model(jnp.zeros((1, 4, 4, 4)), jnp.ones((1,)), jnp.zeros((1, 3, 12)), jnp.zeros((1, 10)))
      vae = load_vae({str(tmp_path / 'vae')!r})
      img = vae.decode(jnp.zeros((1, 2, 2, 4)))
      from opd_jax.models.lora import split_model
      save_lora_adapter(split_model(model)[2], model, {str(tmp_path / 'lora')!r})
      load_lora_adapter({str(tmp_path / 'lora')!r}, model)
      heavy = [m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules]
      assert not heavy, heavy
      print('ok', v.shape, img.shape)
  ''')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          env=env, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'ok (1, 4, 4, 4) (1, 4, 4, 3)' in result.stdout
