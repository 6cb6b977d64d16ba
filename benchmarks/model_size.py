"""Parameter count and parameter memory of the SD3.5-Medium MMDiT (and the SD3 VAE) in opd_jax.

Everything is built with `nnx.eval_shape` — shapes only, no weights, no accelerator — from the
configs written below, so the script runs anywhere in seconds:

    python benchmarks/model_size.py [--out benchmarks/results/model_size.md]

The SD3.5-M config matches stabilityai/stable-diffusion-3.5-medium's transformer/config.json:
hidden 1536 = 24 heads × 64 (diffusers' single-file loader tells SD3-family checkpoints apart by
adaLN width 9216 = 6·1536 and identifies SD3.5-M by its 147456 = 384² position table), 24 layers,
MMDiT-X dual attention on layers 0–12, RMS qk-norm. The VAE config is SD3's (16 latent channels,
scaling 1.5305, shift 0.0609, no quant convs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import jax
import numpy as np
from flax import nnx

from opd_jax.models.lora import LoRAParam
from opd_jax.models.mmdit import MMDiT, MMDiTConfig
from opd_jax.models.peft_io import RECIPE_LORA_TARGETS
from opd_jax.models.vae import AutoencoderKL, VAEConfig

SD35_MEDIUM = {
    '_class_name': 'SD3Transformer2DModel',
    'attention_head_dim': 64,
    'caption_projection_dim': 1536,
    'dual_attention_layers': list(range(13)),
    'in_channels': 16,
    'joint_attention_dim': 4096,
    'num_attention_heads': 24,
    'num_layers': 24,
    'out_channels': 16,
    'patch_size': 2,
    'pooled_projection_dim': 2048,
    'pos_embed_max_size': 384,
    'qk_norm': 'rms_norm',
    'sample_size': 128,
}

SD3_VAE = {
    '_class_name': 'AutoencoderKL',
    'act_fn': 'silu',
    'block_out_channels': [128, 256, 512, 512],
    'down_block_types': ['DownEncoderBlock2D'] * 4,
    'force_upcast': True,
    'in_channels': 3,
    'latent_channels': 16,
    'layers_per_block': 2,
    'mid_block_add_attention': True,
    'norm_num_groups': 32,
    'out_channels': 3,
    'sample_size': 1024,
    'scaling_factor': 1.5305,
    'shift_factor': 0.0609,
    'up_block_types': ['UpDecoderBlock2D'] * 4,
    'use_post_quant_conv': False,
    'use_quant_conv': False,
}

# The reward backbones (transformers CLIPConfig dicts): open_clip / HF ViT-H-14 (PickScore,
# HPSv2.1) and openai CLIP ViT-L/14 (CLIPScore, the aesthetic predictor, GenEval's colours).
CLIP_VIT_H_14 = {
    'model_type': 'clip', 'projection_dim': 1024,
    'text_config': {'hidden_size': 1024, 'intermediate_size': 4096, 'num_hidden_layers': 24,
                    'num_attention_heads': 16, 'vocab_size': 49408,
                    'max_position_embeddings': 77, 'hidden_act': 'gelu'},
    'vision_config': {'hidden_size': 1280, 'intermediate_size': 5120, 'num_hidden_layers': 32,
                      'num_attention_heads': 16, 'image_size': 224, 'patch_size': 14,
                      'hidden_act': 'gelu'},
}
CLIP_VIT_L_14 = {
    'model_type': 'clip', 'projection_dim': 768,
    'text_config': {'hidden_size': 768, 'intermediate_size': 3072, 'num_hidden_layers': 12,
                    'num_attention_heads': 12, 'vocab_size': 49408,
                    'max_position_embeddings': 77, 'hidden_act': 'quick_gelu'},
    'vision_config': {'hidden_size': 1024, 'intermediate_size': 4096, 'num_hidden_layers': 24,
                      'num_attention_heads': 16, 'image_size': 224, 'patch_size': 14,
                      'hidden_act': 'quick_gelu'},
}

LORA_RANK, LORA_ALPHA = 32, 64.0  # the recipe's student (spec §5)


def count(state) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def gib(n_elements: int, bytes_per: int) -> str:
  return f'{n_elements * bytes_per / 2**30:.3f} GiB'


def measure() -> dict:
  cfg = MMDiTConfig.from_dict(SD35_MEDIUM)
  model = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0), lora_rank=LORA_RANK,
                                       lora_alpha=LORA_ALPHA, lora_targets=RECIPE_LORA_TARGETS))
  base = nnx.state(model, nnx.Param)
  lora = nnx.state(model, LoRAParam)
  pos_table = count(nnx.state(model.pos_embed, nnx.Param)['pos_embed'])
  blocks = count(nnx.state(model.transformer_blocks, nnx.Param))
  vae = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig.from_dict(SD3_VAE), rngs=nnx.Rngs(0)))
  return dict(
      base=count(base), pos_table=pos_table, blocks=blocks, lora=count(lora),
      lora_layers=sum(1 for _ in jax.tree.leaves(lora)) // 2,
      vae=count(nnx.state(vae, nnx.Param)),
      vae_decoder=count(nnx.state(vae.decoder, nnx.Param)),
  )


def report(m: dict, command: str) -> str:
  weights = m['base'] - m['pos_table']
  rows = [
      ('MMDiT weights (diffusers `parameters()`)', weights),
      ('position table `pos_embed.pos_embed` (a persistent buffer, 384²×1536)', m['pos_table']),
      ('MMDiT total as loaded (base Params)', m['base']),
      ('  of which the 24 joint blocks', m['blocks']),
      (f'LoRA r{LORA_RANK} on the 8 recipe targets ({m["lora_layers"]} layers)', m['lora']),
      ('SD3 VAE (encoder + decoder)', m['vae']),
      ('  of which the decoder', m['vae_decoder']),
  ]
  lines = [
      '# Model size: SD3.5-Medium MMDiT in opd_jax',
      '',
      f'Command: `{command}`',
      '',
      f'Machine: {platform.node()} — {platform.platform()}, {os.cpu_count()} CPU cores, '
      f'Python {platform.python_version()}, jax {jax.__version__}; shapes only '
      '(`nnx.eval_shape`), no device memory used.',
      f'Date: {datetime.date.today().isoformat()}',
      '',
      '| item | parameters | fp32 | bf16 |',
      '|---|---:|---:|---:|',
  ]
  for name, n in rows:
    lines.append(f'| {name} | {n:,} | {gib(n, 4)} | {gib(n, 2)} |')
  lines += [
      '',
      f'LoRA fraction of the MMDiT weights: {100 * m["lora"] / weights:.3f} %. The adapter '
      'slots cover attn.{to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out} '
      'of every joint block (the last block has no to_add_out; the MMDiT-X `attn2` layers are '
      'not matched by `attn.*`), as PEFT resolves the recipe\'s target_modules.',
      '',
      'Training footprint of the student per replica (fp32 LoRA master weights + AdamW moments '
      f'= 3 copies): {gib(3 * m["lora"], 4)}; each frozen teacher adapter adds '
      f'{gib(m["lora"], 4)} (fp32) on top of one shared base.',
  ]
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results',
                                                    'model_size.md'))
  args = parser.parse_args(argv)
  text = report(measure(), 'python benchmarks/model_size.py' +
                ('' if argv is None and len(sys.argv) == 1 else ' ' + ' '.join(sys.argv[1:])))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
