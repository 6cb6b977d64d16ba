"""MMDiT parity with diffusers' SD3Transformer2DModel on tiny random checkpoints (float32, 1e-4).

Covers SD3 (plain joint blocks) and SD3.5 (RMS qk-norm, MMDiT-X dual attention), square and
non-square latents, the centre crop of the position table, and the model's options (bf16 compute,
remat, context mask, LoRA slot placement).
"""

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from flax import nnx
import jax
import jax.numpy as jnp

from opd_jax.models.loading.pretrained import load_mmdit
from opd_jax.models.lora import split_model
from opd_jax.models.mmdit import MMDiT, MMDiTConfig, sd3_pos_embed_table

# float32 through three joint blocks: outputs of magnitude ~3 differ from torch by ~1e-4
# depending on reduction order (thread count), so a relative term as well as an absolute one.
TOL = 1e-4
RTOL = 1e-4
SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
           pooled_projection_dim=10, out_channels=4, pos_embed_max_size=12)
SD35 = dict(SD3, dual_attention_layers=(0, 1), qk_norm='rms_norm')


def _random_checkpoint(cfg, folder, seed=0):
  """A diffusers transformer with every parameter and the position buffer randomised."""
  torch.manual_seed(seed)
  model = SD3Transformer2DModel(**cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
    model.pos_embed.pos_embed.normal_(0.0, 0.5)
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  pairs = {}
  for name, cfg in (('sd3', SD3), ('sd35', SD35)):
    folder = tmp_path_factory.mktemp(name)
    pairs[name] = _random_checkpoint(cfg, folder), load_mmdit(folder)
  return pairs


def _inputs(h, w, batch=2, seed=1):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(batch, 4, h, w, generator=g)
  ctx = torch.randn(batch, 5, 12, generator=g)
  pooled = torch.randn(batch, 10, generator=g)
  ts = torch.tensor([999.0, 412.5][:batch])
  return x, ctx, pooled, ts


@nnx.jit
def _forward(model, *args, **kw):
  return model(*args, **kw)


def _ours(model, x, ctx, pooled, ts, **kw):
  out = _forward(model, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(ts.numpy()),
              jnp.asarray(ctx.numpy()), jnp.asarray(pooled.numpy()), **kw)
  assert out.dtype == jnp.float32
  return np.asarray(out).transpose(0, 3, 1, 2)


# (8, 8) and (6, 10) crop the 12×12 position table; (24, 4) uses its full height.
@pytest.mark.parametrize('variant,h,w', [('sd3', 8, 8), ('sd3', 6, 10), ('sd35', 8, 8),
                                         ('sd35', 24, 4)])
def test_matches_diffusers(checkpoints, variant, h, w):
  torch_model, model = checkpoints[variant]
  x, ctx, pooled, ts = _inputs(h, w)
  with torch.no_grad():
    ref = torch_model(x, ctx, pooled, ts).sample.numpy()
  np.testing.assert_allclose(_ours(model, x, ctx, pooled, ts), ref, atol=TOL, rtol=RTOL)


@pytest.mark.parametrize('variant', ['sd3', 'sd35'])
def test_structure(checkpoints, variant):
  torch_model, model = checkpoints[variant]
  cfg = model.config
  for i, block in enumerate(model.transformer_blocks):
    assert (block.attn2 is not None) == (i in cfg.dual_attention_layers)
    assert block.context_pre_only == (i == cfg.num_layers - 1)
  last = model.transformer_blocks[-1]
  assert last.attn.to_add_out is None and last.ff_context is None
  n_torch = (sum(p.numel() for p in torch_model.parameters())
             + torch_model.pos_embed.pos_embed.numel())  # a persistent buffer, a Param here
  n_ours = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_ours == n_torch


def test_grid_larger_than_table_is_rejected(checkpoints):
  _, model = checkpoints['sd3']
  x = jnp.zeros((1, 26, 8, 4))
  with pytest.raises(ValueError, match='exceeds pos_embed_max_size'):
    model(x, jnp.zeros((1,)), jnp.zeros((1, 5, 12)), jnp.zeros((1, 10)))


def test_fresh_position_table_matches_diffusers():
  ref = get_2d_sincos_pos_embed(32, 12, base_size=4, output_type='pt').float().numpy()
  np.testing.assert_allclose(np.asarray(sd3_pos_embed_table(32, 12, 4))[0], ref, atol=2e-6)


def test_options(tmp_path):
  """bf16 compute stays close; an all-true context mask is a no-op while hiding tokens is not;
  remat leaves values and gradients unchanged on the trainers' path (merge inside jax.grad)."""
  folder = tmp_path
  # One block: it is both the MMDiT-X block and the context_pre_only one.
  _random_checkpoint(dict(SD35, num_layers=1, dual_attention_layers=(0,)), folder)
  x, ctx, pooled, ts = _inputs(8, 8)
  args = (jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(ts.numpy()),
          jnp.asarray(ctx.numpy()), jnp.asarray(pooled.numpy()))
  base = load_mmdit(folder, lora_rank=2, lora_alpha=4.0)
  ref = _forward(base, *args)
  out = _forward(load_mmdit(folder, dtype=jnp.bfloat16), *args)
  assert out.dtype == jnp.float32
  assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())

  def masked(mask):
    return _forward(base, *args, context_mask=mask)
  mask = jnp.ones((2, 5), bool)
  np.testing.assert_allclose(masked(mask), ref, atol=1e-5)
  hidden = masked(mask.at[:, 3:].set(False))
  assert float(jnp.abs(hidden - ref).max()) > 1e-3
  # The heads-major einsum attention (config.model.attention='einsum') is the same attention.
  einsum = load_mmdit(folder, lora_rank=2, lora_alpha=4.0, attention_impl='einsum')
  np.testing.assert_allclose(_forward(einsum, *args), ref, atol=1e-5)
  np.testing.assert_allclose(_forward(einsum, *args, context_mask=mask.at[:, 3:].set(False)),
                             hidden, atol=1e-5)

  def value_and_lora_grad(model):
    graphdef, base_state, lora_state = split_model(model)

    def loss(lora_state):
      return jnp.mean(nnx.merge(graphdef, base_state, lora_state)(*args) ** 2)
    return jax.jit(jax.value_and_grad(loss))(lora_state)
  (v0, g0), (v1, g1) = (value_and_lora_grad(m) for m in (
      base, load_mmdit(folder, lora_rank=2, lora_alpha=4.0, remat=True,
                       remat_policy='nothing_saveable')))
  np.testing.assert_allclose(v0, v1, rtol=1e-6)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_lora_slots_follow_targets(tmp_path):
  cfg = MMDiTConfig.from_dict(SD35)
  model = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0), lora_rank=4, lora_alpha=8.0))
  block = model.transformer_blocks[0]
  assert block.attn.to_q.lora_rank == 4 and block.attn.to_out[0].lora_rank == 4
  assert block.attn2.to_q.lora_rank == 0      # 'attn.to_q' does not match 'attn2.to_q'
  assert block.ff.fc_in.lora_rank == 0 and model.proj_out.lora_rank == 0
  ff = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0), lora_rank=2,
                                    lora_targets=('ff.net.0.proj', 'attn2.to_q')))
  blk = ff.transformer_blocks[0]
  assert blk.ff.fc_in.lora_rank == 2 and blk.ff_context.fc_in.lora_rank == 0
  assert blk.attn2.to_q.lora_rank == 2 and blk.attn.to_q.lora_rank == 0
  regex = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0), lora_rank=2,
                                       lora_targets=r'.*\.attn\.to_(q|k)'))
  assert regex.transformer_blocks[1].attn.to_k.lora_rank == 2
  assert regex.transformer_blocks[1].attn.to_v.lora_rank == 0


def test_config_validation():
  with pytest.raises(ValueError, match='unsupported SD3Transformer2DModel config keys'):
    MMDiTConfig.from_dict(dict(SD3, new_feature=1))
  with pytest.raises(ValueError, match='qk_norm'):
    MMDiT(MMDiTConfig.from_dict(dict(SD3, qk_norm='l2')), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='caption_projection_dim'):
    MMDiT(MMDiTConfig.from_dict(dict(SD3, caption_projection_dim=8)), rngs=nnx.Rngs(0))
