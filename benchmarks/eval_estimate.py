"""How long the Table 1 evaluation of one SD3.5-M model takes on a GPU or a TPU slice: an estimate.

    python benchmarks/eval_estimate.py [--mfu 0.4] [--text_tokens 205]

Counts the matmul FLOPs of every network call the evaluation makes (`opd_jax.flops`, from the
jaxpr of each call on abstract weights — no weights, no compile) and divides by an assumed
utilisation of each device's dense bf16 peak. Per image: 40 Euler steps of the SD3.5-M transformer
at 512 px with CFG (a 2-sample call per step), one VAE decode; per DrawBench image the four
model-based rewards (PickScore and HPSv2.1: CLIP ViT-H-14 image + text towers; CLIPScore: CLIP
ViT-L/14 image + text; the aesthetic predictor: ViT-L/14 image tower, its MLP negligible); per
GenEval image CLIP-L's colour check of one object crop. Not counted, stated instead: the GenEval
detector (Mask2Former Swin-S, a separate service) and the OCR reward (rapidocr on the host CPU,
~0.4 s per 512² image measured on the 2-core VM, `rewards/ocr.py`), which overlap nothing here.
This is an estimate from FLOPs, not a measurement. Writes benchmarks/results/eval_estimate.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import jax                                                # noqa: E402
import jax.numpy as jnp                                   # noqa: E402
from flax import nnx                                      # noqa: E402

from model_size import CLIP_VIT_H_14, CLIP_VIT_L_14, SD3_VAE, SD35_MEDIUM   # noqa: E402
from opd_jax.flops import count_flops                     # noqa: E402
from opd_jax.models.clip import CLIPConfig, CLIPModel     # noqa: E402
from opd_jax.models.mmdit import MMDiT, MMDiTConfig       # noqa: E402
from opd_jax.models.vae import AutoencoderKL, VAEConfig   # noqa: E402

STEPS, RESOLUTION, LATENT_CHANNELS, VAE_FACTOR = 40, 512, 16, 8
IMAGES = {'geneval': 2212, 'ocr': 1018, 'drawbench': 1000}   # spec §4, one model
# Dense bf16 peak per device (TFLOP/s, published per-chip figures) and devices per target.
TARGETS = {'one H100 (SXM)': (989.0, 1), 'one H200': (989.0, 1), 'v5e-8': (197.0, 8)}


def _abstract(make):
  graphdef, state = nnx.split(nnx.eval_shape(make))
  return graphdef, state


def transformer_call_flops(text_tokens: int) -> int:
  """One guided transformer call for one image: the 2-sample (cond + uncond) batch."""
  cfg = MMDiTConfig.from_dict({k: v for k, v in SD35_MEDIUM.items() if not k.startswith('_')})
  graphdef, state = _abstract(lambda: MMDiT(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  side = RESOLUTION // VAE_FACTOR
  x = jax.ShapeDtypeStruct((2, side, side, LATENT_CHANNELS), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  ctx = jax.ShapeDtypeStruct((2, text_tokens, SD35_MEDIUM['joint_attention_dim']), jnp.float32)
  pooled = jax.ShapeDtypeStruct((2, SD35_MEDIUM['pooled_projection_dim']), jnp.float32)
  return count_flops(lambda s, x, t, c, p: nnx.merge(graphdef, s)(x, t, context=c, pooled=p),
                     state, x, t, ctx, pooled)


def vae_decode_flops() -> int:
  graphdef, state = _abstract(lambda: AutoencoderKL(VAEConfig.from_dict(SD3_VAE),
                                                    rngs=nnx.Rngs(0)))
  side = RESOLUTION // VAE_FACTOR
  z = jax.ShapeDtypeStruct((1, side, side, LATENT_CHANNELS), jnp.float32)
  return count_flops(lambda s, z: nnx.merge(graphdef, s).decode(z), state, z)


def clip_flops(config: dict) -> tuple[int, int]:
  """(image tower, text tower) FLOPs of one image / one 77-token prompt."""
  cfg = CLIPConfig.from_hf_dict(config)
  graphdef, state = _abstract(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  size = config['vision_config']['image_size']
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 77), jnp.int32)
  vision = count_flops(lambda s, x: nnx.merge(graphdef, s).get_image_features(x), state, image)
  text = count_flops(lambda s, i: nnx.merge(graphdef, s).get_text_features(i), state, ids)
  return vision, text


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--mfu', type=float, default=0.4)
  p.add_argument('--text_tokens', type=int, default=77 + 128,
                 help='CLIP + T5 tokens of the prompt cache (encode_prompts default: 77 + 128)')
  p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'eval_estimate'))
  args = p.parse_args(argv)
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
  step = transformer_call_flops(args.text_tokens)
  decode = vae_decode_flops()
  h_img, h_txt = clip_flops(CLIP_VIT_H_14)
  l_img, l_txt = clip_flops(CLIP_VIT_L_14)
  per_image = {
      'sampling (40 guided transformer calls)': STEPS * step,
      'VAE decode': decode,
  }
  rewards = {'pickscore': h_img + h_txt, 'hpsv2': h_img + h_txt, 'clipscore': l_img + l_txt,
             'aesthetic': l_img, 'geneval colour (1 crop)': l_img + 3 * 10 * l_txt}
  generate = sum(per_image.values())
  per_bench = {
      'geneval': IMAGES['geneval'] * (generate + rewards['geneval colour (1 crop)']),
      'ocr': IMAGES['ocr'] * generate,
      'drawbench': IMAGES['drawbench'] * (generate + rewards['pickscore'] + rewards['hpsv2']
                                          + rewards['clipscore'] + rewards['aesthetic']),
  }
  total = sum(per_bench.values())
  times = {name: total / (peak * 1e12 * n * args.mfu) for name, (peak, n) in TARGETS.items()}
  result = {'command': 'python benchmarks/eval_estimate.py ' + ' '.join(argv or sys.argv[1:]),
            'commit': commit, 'date': datetime.date.today().isoformat(), 'mfu': args.mfu,
            'text_tokens': args.text_tokens, 'gflop_per_image': {k: v / 1e9 for k, v in
                                                                 per_image.items()},
            'gflop_per_reward_call': {k: v / 1e9 for k, v in rewards.items()},
            'pflop_per_benchmark': {k: v / 1e15 for k, v in per_bench.items()},
            'pflop_total': total / 1e15, 'hours_per_model': {k: v / 3600 for k, v in
                                                             times.items()}}
  lines = ['# Table 1 evaluation of one SD3.5-M model: time estimated from FLOPs', '',
           f'`{result["command"]}` — commit {commit}, {result["date"]}. Matmul FLOPs counted from '
           'the jaxpr of each network call on abstract weights; time = FLOPs / '
           f'({args.mfu:.0%} of the dense bf16 peak). **An estimate, not a measurement.** '
           'Not counted: the GenEval detector service and the host OCR (~0.4 s per image on the '
           '2-core VM for the 1018 OCR images).', '',
           '| work | GFLOP |', '|---|---|']
  lines += [f'| {k}, per image | {v / 1e9:,.0f} |' for k, v in per_image.items()]
  lines += [f'| reward {k}, per image | {v / 1e9:,.1f} |' for k, v in rewards.items()]
  lines += ['', '| benchmark | images | PFLOP |', '|---|---|---|']
  lines += [f'| {k} | {IMAGES[k]} | {v / 1e15:,.1f} |' for k, v in per_bench.items()]
  lines += [f'| all | {sum(IMAGES.values())} | {total / 1e15:,.1f} |', '',
            '| target | devices × bf16 peak | hours per model |', '|---|---|---|']
  lines += [f'| {k} | {TARGETS[k][1]} × {TARGETS[k][0]:g} TFLOP/s | {v / 3600:.2f} |'
            for k, v in times.items()]
  with open(args.out + '.json', 'w') as f:
    json.dump(result, f, indent=2)
  with open(args.out + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  return result


if __name__ == '__main__':
  main()
