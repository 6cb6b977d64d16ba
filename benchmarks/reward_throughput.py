"""Seconds per 512×512 image of each real reward at the real model sizes, and the JAX-vs-host
preprocessing gap in score units — on random weights.

    python benchmarks/reward_throughput.py [--batch 8] [--reps 1] [--dtypes float32,bfloat16]
        [--rewards pickscore,hpsv2,clipscore,aesthetic] [--gap_images 2] [--size 512]

Models (no checkpoint needed): `opd_jax.models.clip.CLIPModel`s built from the real configs,
filled with random values (N(0, 0.02²) slices of one shared random pool, LayerNorm gains 1 and
biases 0, logit_scale ln 100) and the LAION head (random init):

  ViT-H/14  PickScore_v1 and HPSv2.1: vision 1280 wide × 32 layers, 16 heads, patch 14, 224²;
            text 1024 × 24, 16 heads, 77 tokens, vocabulary 49408; projection 1024; GELU
  ViT-L/14  openai CLIP-L (CLIPScore; the aesthetic reward's image tower): vision 1024 × 24,
            16 heads; text 768 × 12, 12 heads; projection 768; QuickGELU

Per reward and dtype (float32; bfloat16 = bf16 matmuls, float32 parameters and statistics):
`Reward.precompile` (timed: "compile s"), then `--reps` calls, each on `--batch` uint8
`--size`² images (what the evaluation passes) and the first DrawBench prompts; the median call
time / batch = seconds per image. A call is everything `load_reward`'s function does:
tokenisation (here a byte-level stand-in for CLIP's BPE, whose vocabulary files are not on this
machine; ~0.1 ms per prompt either way), host→device copy, the JAX preprocessing, both towers,
the score, device→host. `aesthetics_mix` runs PickScore, CLIPScore and HPSv2.1 in turn: its
time is their sum (derived, not measured again). The default of one timed call after the
compile, instead of a median of three after a warm-up call, keeps a 2-core CPU run near ten
minutes (a ViT-H/14 batch of 8 takes about a minute there); pass `--reps 3` where that is cheap.

Score gap: `preprocess.score_gap(reward.score_pixels, images, reward)` on `--gap_images`
structured images (`benchmarks/preprocess_gap.structured_images`) with the float32 random-weight
models: the same network scores the JAX and the host (upstream-recipe) crops. The weights are
random, so this bounds the pipeline's numerical gap on networks of the real shape, not the real
models' (whose sensitivity to pixels differs); the score spread over the images is printed next
to it for scale.

Writes benchmarks/results/reward_throughput_cpu.{md,json} (`--out_name` to change);
`--render RESULT.json` only rewrites the .md next to a result .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

from opd_jax.models.aesthetic_head import AestheticHead  # noqa: E402
from opd_jax.models.clip import CLIPConfig  # noqa: E402
from opd_jax.models.loading.clip_weights import abstract_clip  # noqa: E402
from opd_jax.rewards import clip_rewards  # noqa: E402
from opd_jax.rewards import preprocess as pp  # noqa: E402
from preprocess_gap import structured_images  # noqa: E402

MODELS = {
    'ViT-H/14': {'model_type': 'clip', 'projection_dim': 1024,
                 'text_config': dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                     num_hidden_layers=24, num_attention_heads=16,
                                     max_position_embeddings=77, hidden_act='gelu',
                                     eos_token_id=2),
                 'vision_config': dict(hidden_size=1280, intermediate_size=5120,
                                       num_hidden_layers=32, num_attention_heads=16,
                                       image_size=224, patch_size=14, hidden_act='gelu')},
    'ViT-L/14': {'model_type': 'clip', 'projection_dim': 768,
                 'text_config': dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                     num_hidden_layers=12, num_attention_heads=12,
                                     max_position_embeddings=77, hidden_act='quick_gelu',
                                     eos_token_id=2),
                 'vision_config': dict(hidden_size=1024, intermediate_size=4096,
                                       num_hidden_layers=24, num_attention_heads=16,
                                       image_size=224, patch_size=14, hidden_act='quick_gelu')},
}
REWARD_MODEL = {'pickscore': 'ViT-H/14', 'hpsv2': 'ViT-H/14', 'clipscore': 'ViT-L/14',
                'aesthetic': 'ViT-L/14'}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
PROMPTS_FILE = '/work/shared/data/eval_prompts/drawbench_test.txt'
POOL_SIZE = 1 << 26


class ByteTokenizer:
  """Stand-in for CLIP's tokenizer: start id 49406, the prompt's UTF-8 bytes as ids, end id 49407
  (the largest id: the pooled one), padded with the end id to `max_length`, truncated to it."""

  START, END = 49406, 49407

  def __call__(self, prompts, *, padding, truncation, max_length, return_tensors):
    del padding, truncation, return_tensors
    ids = np.full((len(prompts), max_length), self.END, np.int64)
    mask = np.zeros((len(prompts), max_length), np.int64)
    for i, prompt in enumerate(prompts):
      row = [self.START] + list(prompt.encode())[:max_length - 2] + [self.END]
      ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return {'input_ids': ids, 'attention_mask': mask}


def random_state(abstract_state, seed: int = 0):
  """float32 values for every parameter of an abstract CLIP state (module docstring)."""
  rng = np.random.default_rng(seed)
  pool = 0.02 * rng.standard_normal(POOL_SIZE, dtype=np.float32)

  def fill(path, leaf):
    names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
    if names[0] == 'logit_scale':
      return jnp.asarray(math.log(100.0), leaf.dtype)
    if any('norm' in n for n in names):
      value = 1.0 if 'weight' in names else 0.0
      return jnp.full(leaf.shape, value, leaf.dtype)
    size = math.prod(leaf.shape)
    start = int(rng.integers(0, POOL_SIZE - size))
    return jnp.asarray(pool[start:start + size].reshape(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract_state)


def build_models() -> dict:
  """Per model name: its config and one random state (shared by the dtypes)."""
  out = {}
  for i, (name, config_dict) in enumerate(MODELS.items()):
    start = time.perf_counter()
    config = CLIPConfig.from_hf_dict(config_dict)
    _, state = nnx.split(abstract_clip(config))
    out[name] = (config, random_state(state, seed=i))
    print(f'{name}: random weights in {time.perf_counter() - start:.1f} s', flush=True)
  return out


def make_reward(name: str, models: dict, dtype, batch: int) -> clip_rewards.Reward:
  config, state = models[REWARD_MODEL[name]]
  graphdef, _ = nnx.split(abstract_clip(config, dtype=dtype))
  clip = nnx.merge(graphdef, state)
  head = AestheticHead(rngs=nnx.Rngs(0)) if name == 'aesthetic' else None
  tokenizer = None if name == 'aesthetic' else ByteTokenizer()
  return clip_rewards.Reward(name, clip_rewards.RewardNet(name, clip, head), tokenizer,
                             batch_size=batch, preprocess='jax')


def prompts(n: int) -> list[str]:
  if os.path.exists(PROMPTS_FILE):
    with open(PROMPTS_FILE) as f:
      lines = [line.strip() for line in f if line.strip()]
    return (lines * n)[:n]
  return [f'a photo of a red cat number {i} on a blue sofa' for i in range(n)]


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return (f'{cpu}, {os.cpu_count()} cores, {platform.system()}; jax {jax.__version__} on '
          f'{jax.default_backend()} ({jax.devices()[0].device_kind})')


def write_markdown(result: dict, path: str) -> None:
  """The .md report of a result dict (what `main` writes to the .json)."""
  rows, mix, gaps, meta = result['rows'], result['aesthetics_mix'], result['score_gap'], \
      result['meta']
  reps = len(rows[0]['call_s']) if rows else 0
  gap_images = gaps[0]['images'] if gaps else 0
  lines = ['# Reward throughput at the real model sizes (random weights)', '',
           f'`{meta["command"]}` at commit {meta["commit"]} on {meta["machine"]} '
           f'({meta["date"]}); '
           f'{meta["images"]}, DrawBench prompts; whole run {meta["total_s"]:.0f} s. '
           f'Median of {reps} call(s) after `Reward.precompile`; a call = tokenise, copy, '
           'JAX preprocessing, both towers, score, copy back.', '',
           '| reward | network | dtype | compile s | s per call | s per image |',
           '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["reward"]} | {r["model"]} | {r["dtype"]} | {r["compile_s"]:.1f} | '
                 f'{r["median_call_s"]:.1f} | {r["s_per_image"]:.2f} |')
  for m in mix:
    lines.append(f'| aesthetics_mix (sum of the three) | ViT-H + ViT-H + ViT-L | {m["dtype"]} '
                 f'| — | — | {m["s_per_image"]:.2f} |')
  same = []
  for dtype in sorted({r['dtype'] for r in rows}):
    pair = {r['reward']: r['s_per_image'] for r in rows if r['dtype'] == dtype}
    if {'pickscore', 'hpsv2'} <= set(pair):
      same.append(f'{abs(pair["pickscore"] / pair["hpsv2"] - 1):.0%} in {dtype}')
  if same:
    lines += ['', 'PickScore and HPSv2.1 run the same ViT-H/14 network (their crops differ by '
              'about 40 ms per image): their rows differ by ' + ' and '.join(same) + ', which is '
              'the run-to-run noise of single timed calls on this machine (its 2 cores are '
              'shared with other jobs). Read the table to about that precision.']
  if gaps:
    lines += ['', f'JAX vs host preprocessing, in score units, float32, {gap_images} '
              'structured 512² images (seed 1). **Random weights**: this bounds the numerical gap '
              'of the pipeline on networks of the real shapes, not the gap of the real models.', '',
              '| reward | max abs gap | mean abs gap | host scores (for scale) |', '|---|---|---|---|']
    for g in gaps:
      host = ', '.join(f'{v:.5g}' for v in g['host_scores'])
      lines.append(f'| {g["reward"]} | {g["max_abs"]:.3g} | {g["mean_abs"]:.3g} | {host} |')
  lines += ['', 'PickScore and the aesthetic crop are bit-identical on both paths (Pillow-exact '
            'fixed point), so their gap is 0 whatever the weights; CLIPScore and HPSv2.1 differ by '
            'float32 rounding of the resize (≈1e-6 normalised units, '
            '`benchmarks/results/preprocess_gap.md`). The bfloat16 option is meant for '
            'accelerators; on a CPU compare its rows with float32 above.']
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--reps', type=int, default=1)
  p.add_argument('--dtypes', default='float32,bfloat16')
  p.add_argument('--rewards', default='pickscore,hpsv2,clipscore,aesthetic')
  p.add_argument('--gap_images', type=int, default=2)
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--out_dir', default=os.path.join(ROOT, 'benchmarks', 'results'))
  p.add_argument('--out_name', default='reward_throughput_cpu')
  p.add_argument('--render', default='', help='only rewrite the .md of this result .json')
  args = p.parse_args(argv)
  if args.render:
    with open(args.render) as f:
      result = json.load(f)
    write_markdown(result, os.path.splitext(args.render)[0] + '.md')
    return result
  names = [r for r in args.rewards.split(',') if r]
  dtypes = [d for d in args.dtypes.split(',') if d]
  unknown = sorted(set(names) - set(REWARD_MODEL)) + sorted(set(dtypes) - set(DTYPES))
  if unknown:
    p.error(f'unknown rewards/dtypes {unknown}')
  begin = time.perf_counter()
  models = build_models()
  texts = prompts(args.batch)
  images = pp.to_uint8(structured_images(args.batch, args.size, args.size))

  rows = []
  for dtype in dtypes:
    for name in names:
      reward = make_reward(name, models, DTYPES[dtype], args.batch)
      start = time.perf_counter()
      reward.precompile(args.size, args.size)
      compile_s = time.perf_counter() - start
      times, scores = [], None
      for _ in range(args.reps):
        start = time.perf_counter()
        scores = reward(images, texts)
        times.append(time.perf_counter() - start)
      call_s = statistics.median(times)
      row = {'reward': name, 'model': REWARD_MODEL[name], 'dtype': dtype, 'batch': args.batch,
             'compile_s': compile_s, 'call_s': times, 'median_call_s': call_s,
             's_per_image': call_s / args.batch, 'finite': bool(np.all(np.isfinite(scores)))}
      rows.append(row)
      print(json.dumps(row), flush=True)
      del reward

  mix = []
  for dtype in dtypes:
    parts = {r['reward']: r['s_per_image'] for r in rows if r['dtype'] == dtype}
    if {'pickscore', 'clipscore', 'hpsv2'} <= set(parts):
      mix.append({'dtype': dtype, 's_per_image': parts['pickscore'] + parts['clipscore'] +
                  parts['hpsv2']})

  gaps = []
  if args.gap_images > 0:
    gap_images = structured_images(args.gap_images, args.size, args.size, seed=1)
    for name in names:
      reward = make_reward(name, models, jnp.float32, args.gap_images)
      gap = pp.score_gap(lambda px, r=reward: r.score_pixels(px, texts[:args.gap_images]),
                         gap_images, name)
      row = {'reward': name, 'images': args.gap_images, 'max_abs': gap['max_abs'],
             'mean_abs': gap['mean_abs'], 'host_scores': gap['host_scores'].tolist(),
             'jax_scores': gap['jax_scores'].tolist()}
      gaps.append(row)
      print(json.dumps(row), flush=True)
      del reward

  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
  meta = {'command': ' '.join(['python benchmarks/reward_throughput.py'] +
                              (argv if argv is not None else sys.argv[1:])),
          'commit': commit, 'machine': machine(), 'date': datetime.date.today().isoformat(),
          'images': f'{args.batch} × {args.size}×{args.size} uint8 structured (seed 0)',
          'total_s': time.perf_counter() - begin}
  result = {'rows': rows, 'aesthetics_mix': mix, 'score_gap': gaps, 'meta': meta}
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, args.out_name + '.json'), 'w') as f:
    json.dump(result, f, indent=2)

  write_markdown(result, os.path.join(args.out_dir, args.out_name + '.md'))
  return result


if __name__ == '__main__':
  main()
