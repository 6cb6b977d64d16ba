"""End-to-end sampling parity with diffusers' StableDiffusion3Pipeline (tiny random models).

A 10-step Euler ODE run with CFG 4.5 and schedule shift 3, from the same initial noise and the same
prompt / pooled / negative embeddings passed directly, gives the pipeline's latents within 1e-3 and
its decoded images within 1e-3; the `python -m opd_jax.sample` path writes the PNGs.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from flax import nnx
from PIL import Image

from opd_jax import sample
from opd_jax.models.loading import pretrained
from opd_jax.models.loading.pretrained import load_mmdit, load_vae
from opd_jax.models.lora import split_model
from opd_jax.models.peft_io import save_lora_adapter
from opd_jax.sampling.schedule import flow_match_sigmas

TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                   pooled_projection_dim=10, out_channels=4, pos_embed_max_size=12,
                   dual_attention_layers=(0,), qk_norm='rms_norm')
VAE = dict(down_block_types=['DownEncoderBlock2D'] * 2, up_block_types=['UpDecoderBlock2D'] * 2,
           block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
           use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
           shift_factor=0.0609)
STEPS, CFG, SHIFT, SIZE = 10, 4.5, 3.0, 16   # 16 px images = 8×8 latents (VAE factor 2)


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
  torch.manual_seed(0)
  transformer = SD3Transformer2DModel(**TRANSFORMER).eval()
  with torch.no_grad():
    for p in transformer.parameters():
      p.normal_(0.0, 0.2)
  vae = AutoencoderKL(**VAE).eval()
  scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
  folder = tmp_path_factory.mktemp('sd3')
  transformer.save_pretrained(folder / 'transformer')
  vae.save_pretrained(folder / 'vae')
  scheduler.save_pretrained(folder / 'scheduler')
  pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                                  text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
  pipe.set_progress_bar_config(disable=True)
  return pipe, folder


def _embeddings(n, seed=5):
  g = torch.Generator().manual_seed(seed)
  return dict(prompt_embeds=torch.randn(n, 7, 12, generator=g),
              pooled_prompt_embeds=torch.randn(n, 10, generator=g),
              negative_prompt_embeds=torch.randn(1, 7, 12, generator=g),
              negative_pooled_prompt_embeds=torch.randn(1, 10, generator=g))


def test_schedule_matches_scheduler(pipeline):
  pipe, folder = pipeline
  assert pretrained.scheduler_shift(folder) == SHIFT
  pipe.scheduler.set_timesteps(STEPS)
  np.testing.assert_array_equal(flow_match_sigmas(STEPS, SHIFT), pipe.scheduler.sigmas.numpy())


def test_euler_cfg_sampling_matches_pipeline(pipeline):
  pipe, folder = pipeline
  emb = _embeddings(2)
  noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
  call = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG,
              prompt_embeds=emb['prompt_embeds'], pooled_prompt_embeds=emb['pooled_prompt_embeds'],
              negative_prompt_embeds=emb['negative_prompt_embeds'].expand(2, -1, -1),
              negative_pooled_prompt_embeds=emb['negative_pooled_prompt_embeds'].expand(2, -1))
  with torch.no_grad():
    ref_latents = pipe(latents=noise, output_type='latent', **call).images.numpy()
    ref_images = pipe(latents=noise, output_type='np', **call).images

  sampler = sample.make_sampler(sample.load_transformer(folder),
                                sigmas=flow_match_sigmas(STEPS, SHIFT), cfg_scale=CFG,
                                latent_shape=(8, 8, 4))
  cond = {'context': jnp.asarray(emb['prompt_embeds'].numpy()),
          'pooled': jnp.asarray(emb['pooled_prompt_embeds'].numpy())}
  uncond = {'context': jnp.asarray(emb['negative_prompt_embeds'].expand(2, -1, -1).numpy()),
            'pooled': jnp.asarray(emb['negative_pooled_prompt_embeds'].expand(2, -1).numpy())}
  latents = sampler(cond, uncond, jax.random.split(jax.random.key(0), 2),
                    x_init=jnp.asarray(noise.numpy().transpose(0, 2, 3, 1)))
  assert np.abs(ref_latents).max() > 0.5     # a non-trivial trajectory
  np.testing.assert_allclose(np.asarray(latents).transpose(0, 3, 1, 2), ref_latents, atol=1e-3,
                             rtol=0)

  vae = load_vae(folder)
  images = np.clip(np.asarray(vae.decode(vae.from_model_latents(latents))) / 2 + 0.5, 0, 1)
  np.testing.assert_allclose(images, ref_images, atol=1e-3, rtol=0)


def test_sample_command_writes_pngs(pipeline, tmp_path):
  _, folder = pipeline
  emb = {k: v.numpy() for k, v in _embeddings(2).items()}
  np.savez(tmp_path / 'emb.npz', prompts=np.array(['a cat', 'a dog']), **emb)
  common = dict(steps=2, cfg=CFG, seed=3, resolution=SIZE, batch_size=2)
  paths = sample.generate(folder, tmp_path / 'emb.npz', tmp_path / 'base', **common)
  assert [os.path.basename(p) for p in paths] == ['00000.png', '00001.png']
  first = np.asarray(Image.open(paths[0]))
  assert first.shape == (SIZE, SIZE, 3) and first.dtype == np.uint8
  with open(tmp_path / 'base' / 'prompts.jsonl') as f:
    assert [json.loads(line)['prompt'] for line in f] == ['a cat', 'a dog']

  # A LoRA exported from JAX (random non-zero A and B) changes the images.
  lora_model = load_mmdit(folder, lora_rank=2, lora_alpha=2.0)
  adapter = jax.tree.map(lambda x: jnp.full(x.shape, 0.5),
                         nnx.to_pure_dict(split_model(lora_model)[2]))
  save_lora_adapter(adapter, lora_model, tmp_path / 'lora')
  paths = sample.generate(folder, tmp_path / 'emb.npz', tmp_path / 'lora_out',
                          adapter=tmp_path / 'lora', **common)
  assert np.abs(np.asarray(Image.open(paths[0]), np.int32) - first).max() > 0
