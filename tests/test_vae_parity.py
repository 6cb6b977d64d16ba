"""VAE parity with diffusers' AutoencoderKL on tiny random checkpoints (float32, 1e-4).

The SD3 layout (16-style latents, no quant convs, shift_factor) and the classic one (quant convs,
no mid-block attention) are both checked, on non-square images.
"""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from flax import nnx
import jax.numpy as jnp

from opd_jax.models.loading.pretrained import load_vae
from opd_jax.models.vae import AutoencoderKL, VAEConfig, images_to_uint8

TOL = 1e-4
SD3_LIKE = dict(in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D'] * 3,
                up_block_types=['UpDecoderBlock2D'] * 3, block_out_channels=[8, 16, 16],
                layers_per_block=1, latent_channels=6, norm_num_groups=4, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
CLASSIC = dict(SD3_LIKE, block_out_channels=[8, 16, 16], layers_per_block=2, latent_channels=4,
               use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=False,
               scaling_factor=0.18215, shift_factor=None)


@pytest.fixture(scope='module', params=['sd3_like', 'classic'])
def pair(request, tmp_path_factory):
  cfg = SD3_LIKE if request.param == 'sd3_like' else CLASSIC
  torch.manual_seed(0)
  model = TorchAutoencoderKL(**cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(folder)
  return model, load_vae(folder)


def _nhwc(t):
  return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def _nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def test_encode_matches_diffusers(pair):
  torch_model, model = pair
  images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
  with torch.no_grad():
    dist = torch_model.encode(images).latent_dist
  mean, logvar = model.encode_moments(_nhwc(images))
  np.testing.assert_allclose(_nchw(mean), dist.mean.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(_nchw(logvar), dist.logvar.numpy(), atol=TOL, rtol=0)
  np.testing.assert_array_equal(model.encode(_nhwc(images)), mean)


def test_decode_matches_diffusers(pair):
  torch_model, model = pair
  latents = torch.randn(2, model.config.latent_channels, 4, 3,
                        generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    ref = torch_model.decode(latents).sample.numpy()
  out = model.decode(_nhwc(latents))
  assert out.dtype == jnp.float32 and out.shape == (2, 16, 12, 3)
  np.testing.assert_allclose(_nchw(out), ref, atol=TOL, rtol=0)


def test_latent_scaling_is_the_pipelines(pair):
  torch_model, model = pair
  cfg = torch_model.config
  shift = cfg.shift_factor or 0.0
  z = jnp.linspace(-2, 2, 24).reshape(1, 2, 2, 6)[..., :model.config.latent_channels]
  np.testing.assert_allclose(model.to_model_latents(z), (z - shift) * cfg.scaling_factor,
                             rtol=1e-6)
  # StableDiffusion3Pipeline decodes latents / scaling_factor + shift_factor.
  np.testing.assert_allclose(model.from_model_latents(model.to_model_latents(z)), z, atol=1e-6)


def test_images_to_uint8_matches_pipeline_postprocess():
  images = torch.linspace(-1.2, 1.2, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
  ref = VaeImageProcessor().postprocess(images, output_type='np')
  ref = (ref * 255).round().astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(images_to_uint8(_nhwc(images))), ref)


def test_config_validation():
  with pytest.raises(ValueError, match='unsupported AutoencoderKL config keys'):
    VAEConfig.from_dict(dict(SD3_LIKE, temporal=True))
  with pytest.raises(ValueError, match='down_block_types'):
    cfg = dict(SD3_LIKE, down_block_types=['CrossAttnDownBlock2D'] * 3)
    AutoencoderKL(VAEConfig.from_dict(cfg), rngs=nnx.Rngs(0))
