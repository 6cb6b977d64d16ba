"""One DiffusionOPD round in PyTorch (diffusers + peft) and in opd_jax, side by side.

    python benchmarks/opd_round_throughput.py                    # CPU: 64 to 1024 image tokens
    python benchmarks/opd_round_throughput.py --points small:32 --rounds 3     # one point
    python benchmarks/opd_round_throughput.py --points small:64 --rounds 3 \
        --variants opd_jax_fused_einsum --out benchmarks/results/opd_round_throughput_1024
    python benchmarks/opd_round_throughput.py --points sd35m:64 --dtype=bfloat16 --prompts=3 \
        --remat                                                   # GPU: SD3.5-M at 512 px

A point `network:side` is a transformer (`NETWORKS`: tiny, small, sd35m) on side×side×16
latents, (side/2)² image tokens. The round is the released recipe's (spec §5): for each of 3
tasks, a 10-step Euler ODE student rollout with CFG 4.5 (no grad), then the first 9 steps
re-evaluated with grad, the task's teacher mean at the same states (teacher LoRA, its own CFG:
1.0 for the first task, 4.5 for the others) and ½‖μ_S − μ_T‖² averaged over latent elements and
steps; gradients accumulate over steps and tasks; one AdamW step on the student LoRA (r, α on
the eight attention projections).

PyTorch: `SD3Transformer2DModel` with peft adapters 'student' and 'teacher<k>' switched with
`set_adapter`, one backward per trained step (the way the official code bounds memory).
opd_jax: `opd.setup.build_opd` on the same weights (loaded torch-free from the saved folder) and
the same teacher LoRAs (PEFT files written by the torch side), one jitted round — timed twice:
the two-pass round (the reference, the same work as PyTorch's), the fused round
(`train.fused_vjp`: the student's VJP taken during the rollout, the 10th rollout step skipped),
and the fused round with the heads-major einsum attention (`model.attention='einsum'`).
Both sides get the same batch shapes, dtype and block checkpointing (`--remat`: diffusers'
gradient checkpointing / opd_jax's `model.remat`); timings are the median of `--rounds` rounds
after one warm-up (compiling) round, all in one process. FLOPs per round are matmul FLOPs
counted from the jaxpr of each opd_jax round (`opd_jax.flops`); the PyTorch round does the
two-pass round's work on the same shapes, so its count is the two-pass count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

from model_size import SD35_MEDIUM   # noqa: E402

NETWORKS = {
    # 2 blocks (1 with dual attention), 64 wide.
    'tiny': dict(patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                 attention_head_dim=32, num_attention_heads=2, joint_attention_dim=128,
                 caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=32,
                 dual_attention_layers=(0,), qk_norm='rms_norm'),
    # 4 blocks (2 with dual attention), 128 wide.
    'small': dict(patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                  attention_head_dim=32, num_attention_heads=4, joint_attention_dim=256,
                  caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=32,
                  dual_attention_layers=(0, 1), qk_norm='rms_norm'),
    # SD3.5-Medium's transformer config (random weights).
    'sd35m': {k: v for k, v in SD35_MEDIUM.items() if not k.startswith('_') and k != 'sample_size'},
}
TEXT_TOKENS = {'tiny': 32, 'small': 32, 'sd35m': 77 + 128}   # SD3.5-M: CLIP + T5 at 128
# Points `network:latent side`; image tokens = (side / 2)²: 16 → 64, 32 → 256, 64 → 1024.
CPU_POINTS = ('tiny:16', 'small:16', 'small:32', 'small:64')
TASK_CFG = (1.0, 4.5, 4.5)
STEPS, TRAINED, STUDENT_CFG, SHIFT = 10, 9, 4.5, 3.0


def sigmas() -> np.ndarray:
  from opd_jax.sampling.schedule import flow_match_sigmas
  return np.asarray(flow_match_sigmas(STEPS, SHIFT), np.float32)


def network(name: str, side: int) -> dict:
  return dict(NETWORKS[name], sample_size=side)


def make_models(net: dict, rank: int, alpha: float, folder: str, seed: int = 0):
  """Random base + 3 teacher LoRAs (saved for opd_jax) and the torch model with all adapters."""
  import torch
  from diffusers import SD3Transformer2DModel
  from peft import LoraConfig
  from opd_jax.models.peft_io import RECIPE_LORA_TARGETS
  torch.manual_seed(seed)
  model = SD3Transformer2DModel(**net)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.02)
  model.save_pretrained(os.path.join(folder, 'base'))
  targets = list(RECIPE_LORA_TARGETS)
  for k in range(3):
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights='gaussian',
                                 target_modules=targets), adapter_name=f'teacher{k}')
    g = torch.Generator().manual_seed(100 + k)
    with torch.no_grad():
      for name, p in model.named_parameters():
        if f'lora_B.teacher{k}' in name:
          p.copy_(0.01 * torch.randn(p.shape, generator=g))
    model.save_lora_adapter(os.path.join(folder, f'teacher{k}'), adapter_name=f'teacher{k}')
  model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights='gaussian',
                               target_modules=targets), adapter_name='student')
  return model


def batch_arrays(name: str, prompts: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  cfg, text = NETWORKS[name], TEXT_TOKENS[name]
  shape = (3, prompts)
  return {'context': rng.standard_normal(shape + (text, cfg['joint_attention_dim']), np.float32),
          'pooled': rng.standard_normal(shape + (cfg['pooled_projection_dim'],), np.float32),
          'neg_context': rng.standard_normal((1, text, cfg['joint_attention_dim']), np.float32),
          'neg_pooled': rng.standard_normal((1, cfg['pooled_projection_dim']), np.float32)}


# --- PyTorch -------------------------------------------------------------------------------------
def torch_round_fn(model, arrays: dict, net: dict, dtype: str, device: str, remat: bool):
  import torch
  tdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
  model.to(device)
  if remat:
    model.enable_gradient_checkpointing()
  else:
    model.disable_gradient_checkpointing()
  model.train(remat)   # diffusers checkpoints blocks only in training mode (no dropout here)
  params = [p for n, p in model.named_parameters() if 'lora_' in n and '.student' in n]
  for n, p in model.named_parameters():
    p.requires_grad_('lora_' in n and '.student' in n)
  opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4)
  sig = torch.tensor(sigmas(), device=device)
  cond = {k: torch.tensor(v, device=device) for k, v in arrays.items()}
  c, lat = net['in_channels'], net['sample_size']
  gen = torch.Generator(device=device).manual_seed(0)

  def velocity(x, t, ctx, pooled, neg_ctx, neg_pooled, w):
    b = x.shape[0]
    ts = torch.full((b,), float(t) * 1000.0, device=device)
    with torch.autocast(device_type=device.split(':')[0], dtype=tdtype,
                        enabled=tdtype != torch.float32):
      if w == 1.0:
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                     timestep=ts).sample.float()
      both = model(hidden_states=torch.cat([x, x]),
                   encoder_hidden_states=torch.cat([neg_ctx.expand_as(ctx), ctx]),
                   pooled_projections=torch.cat([neg_pooled.expand_as(pooled), pooled]),
                   timestep=torch.cat([ts, ts])).sample.float()
    v_u, v_c = both.chunk(2)
    return v_u + w * (v_c - v_u)

  def one_round():
    opt.zero_grad(set_to_none=True)
    for m in range(3):
      ctx, pooled = cond['context'][m], cond['pooled'][m]
      neg = (cond['neg_context'], cond['neg_pooled'])
      b = ctx.shape[0]
      x = torch.randn((b, c, lat, lat), generator=gen, device=device)
      states = [x]
      model.set_adapter('student')
      with torch.no_grad():
        for j in range(STEPS):
          v = velocity(x, sig[j], ctx, pooled, *neg, STUDENT_CFG)
          x = x + (sig[j + 1] - sig[j]) * v
          states.append(x)
      for j in range(TRAINED):
        xj, dt = states[j], sig[j + 1] - sig[j]
        model.set_adapter(f'teacher{m}')
        with torch.no_grad():
          mu_t = xj + dt * velocity(xj, sig[j], ctx, pooled, *neg, TASK_CFG[m])
        model.set_adapter('student')
        for n, p in model.named_parameters():   # set_adapter resets requires_grad
          if 'lora_' in n and '.student' in n:
            p.requires_grad_(True)
        mu_s = xj + dt * velocity(xj, sig[j], ctx, pooled, *neg, STUDENT_CFG)
        loss = 0.5 * torch.mean((mu_s - mu_t) ** 2) / TRAINED / 3
        loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if device.startswith('cuda'):
      torch.cuda.synchronize()
  return one_round


# --- opd_jax -------------------------------------------------------------------------------------
def jax_round_fn(folder: str, arrays: dict, net: dict, dtype: str, rank: int, alpha: float,
                 remat: bool, fused: bool, attention: str):
  """The jitted opd_jax round on the saved weights; returns (run one round, matmul FLOPs)."""
  import jax
  import ml_collections
  from flax import nnx
  from configs.opd_sd35m import get_config
  from opd_jax.models.loading.pretrained import load_mmdit
  from opd_jax.models.lora import split_model
  from opd_jax.models.peft_io import load_lora_adapter
  from opd_jax.models.registry import DTYPES, make_module
  from opd_jax.flops import count_flops
  from opd_jax.opd.setup import build_opd, device_batch
  from opd_jax.parallel.mesh import make_mesh
  c = get_config()
  c.model.transformer = ml_collections.ConfigDict(
      {k: list(v) if isinstance(v, tuple) else v for k, v in net.items()})
  c.model.update(latent_size=net['sample_size'], latent_channels=net['in_channels'],
                 dtype=dtype, param_dtype=dtype, remat=remat, attention=attention)
  c.lora.update(rank=rank, alpha=alpha)
  c.rollout.shift = SHIFT
  c.train.update(fused_vjp=fused, num_microbatches=1, timestep_chunks=1)
  prompts = arrays['pooled'].shape[1]
  c.data.batch_size_per_device = prompts
  mesh = make_mesh({'data': 1}, jax.devices()[:1])
  base = nnx.to_pure_dict(split_model(load_mmdit(os.path.join(folder, 'base'),
                                                 param_dtype=DTYPES[dtype]))[1])
  abstract = nnx.eval_shape(lambda: make_module(c.model, seed=0, lora_rank=rank,
                                                lora_alpha=alpha))
  teachers = [nnx.to_pure_dict(load_lora_adapter(os.path.join(folder, f'teacher{k}'), abstract))
              for k in range(3)]
  negative = {'context': arrays['neg_context'], 'pooled': arrays['neg_pooled']}
  setup = build_opd(c, mesh, negative, base_params=base, teachers=teachers)
  batch = device_batch(mesh, {'context': arrays['context'], 'pooled': arrays['pooled']},
                       setup.teacher_index)
  box = {'state': setup.init_state()}
  flops = count_flops(setup.round_fn, box['state'], setup.frozen, batch)   # traced, not run

  def one_round():
    box['state'], metrics = setup.round_fn(box['state'], setup.frozen, batch)
    jax.block_until_ready(metrics)
  return one_round, flops


def time_rounds(fn, rounds: int) -> list[float]:
  fn()   # warm-up / compile
  out = []
  for _ in range(rounds):
    began = time.perf_counter()
    fn()
    out.append(time.perf_counter() - began)
  return out


PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12}   # dense bf16 tensor-core peak (SXM)
# opd_jax variants timed at every point: label → (train.fused_vjp, model.attention).
VARIANTS = {'opd_jax': (False, ''), 'opd_jax_fused': (True, ''),
            'opd_jax_fused_einsum': (True, 'einsum')}
LABELS = {'opd_jax': 'opd_jax two-pass', 'opd_jax_fused': 'fused',
          'opd_jax_fused_einsum': 'fused + einsum attention'}


def measure_point(point: str, args, device: str) -> dict:
  """Both implementations at one point, in this process: PyTorch, opd_jax two-pass, fused."""
  name, side = point.split(':')
  net = network(name, int(side))
  arrays = batch_arrays(name, args.prompts)
  with tempfile.TemporaryDirectory() as folder:
    model = make_models(net, args.rank, args.alpha, folder)
    torch_times = time_rounds(torch_round_fn(model, arrays, net, args.dtype, device, args.remat),
                              args.rounds)
    del model
    times, flops = {'pytorch': torch_times}, {}
    for label, (fused, attention) in VARIANTS.items():
      if label not in args.variants and label not in ('opd_jax', 'opd_jax_fused'):
        continue
      fn, flops[label] = jax_round_fn(folder, arrays, net, args.dtype, args.rank, args.alpha,
                                      args.remat, fused, attention)
      if label in args.variants:    # the two-pass and fused FLOPs are counted in any case
        times[label] = time_rounds(fn, args.rounds)
  flops['pytorch'] = flops['opd_jax']
  seconds = {k: float(np.median(v)) for k, v in times.items()}
  return {'point': point, 'network': name, 'latent_side': int(side),
          'image_tokens': (int(side) // net['patch_size']) ** 2,
          'text_tokens': TEXT_TOKENS[name], 'seconds_per_round': seconds,
          'all_round_seconds': times, 'matmul_flops_per_round': flops,
          'speedup_over_pytorch': {k: seconds['pytorch'] / v for k, v in seconds.items()
                                   if k != 'pytorch'}}


def markdown(result: dict) -> str:
  peak = result['peak_flops']
  out = ['# OPD round throughput: opd_jax vs PyTorch (diffusers + peft)', '',
         f'Command: `{result["command"]}`  ', f'Commit: `{result["commit"]}`  ',
         f'Device: {result["device"]}; machine: {result["machine"]}', '',
         f'{result["dtype"]}, block checkpointing (remat) {"on" if result["remat"] else "off"} '
         f'on both sides, LoRA r{result["lora_rank"]}, 3 tasks × {result["prompts_per_task"]} '
         'prompts, 10-step ODE rollout with CFG, 9 trained steps; median of '
         f'{result["rounds"]} rounds after one warm-up round, both sides in one process. '
         'GFLOP: matmul FLOPs per round counted from the opd_jax jaxpr (PyTorch does the '
         'two-pass work).', '',
         '| network | image tokens | PyTorch s/round | '
         + ' | '.join(f'{LABELS[k]} s/round (× PyTorch)' for k in VARIANTS)
         + ' | GFLOP two-pass | GFLOP fused |', '|---|---|---|' + '---|' * (len(VARIANTS) + 2)]
  for r in result['points']:
    s, f, x = r['seconds_per_round'], r['matmul_flops_per_round'], r['speedup_over_pytorch']
    out.append(f'| {r["network"]} | {r["image_tokens"]} | {s["pytorch"]:.3f} | '
               + ' | '.join(f'{s[k]:.3f} ({x[k]:.2f}×)' if k in s else 'not timed'
                            for k in VARIANTS)
               + f' | {f["opd_jax"] / 1e9:.1f} | {f["opd_jax_fused"] / 1e9:.1f} |')
  if peak:
    out += ['', 'MFU (matmul FLOPs / s / bf16 peak): ' + '; '.join(
        f'{r["point"]}: ' + ', '.join(
            f'{LABELS.get(k, k)} {100 * r["matmul_flops_per_round"][k] / r["seconds_per_round"][k] / peak:.1f} %'
            for k in r['seconds_per_round']) for r in result['points'])]
  return '\n'.join(out) + '\n'


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--points', nargs='+', default=list(CPU_POINTS),
                 help='network:latent_side, e.g. small:32 (256 image tokens)')
  p.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  p.add_argument('--prompts', type=int, default=4, help='prompts per task per round')
  p.add_argument('--rank', type=int, default=32)
  p.add_argument('--alpha', type=float, default=64.0)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS),
                 help='the opd_jax rounds to time (the slowest points: fewer)')
  p.add_argument('--remat', action=argparse.BooleanOptionalAction, default=False,
                 help='block checkpointing on both sides')
  p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results',
                                               'opd_round_throughput'))
  args = p.parse_args(argv)
  for point in args.points:
    name, _, side = point.partition(':')
    if name not in NETWORKS or not side.isdigit():
      p.error(f'--points: {point!r} is not network:latent_side with a network from '
              f'{sorted(NETWORKS)}')
  import jax
  import torch
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()   # the code being measured: read it first
  points = []
  for point in args.points:
    points.append(measure_point(point, args, device))
    print(json.dumps(points[-1]), flush=True)
  device_kind = jax.devices()[0].device_kind
  result = {
      'points': points, 'dtype': args.dtype, 'remat': args.remat, 'rounds': args.rounds,
      'prompts_per_task': args.prompts, 'lora_rank': args.rank,
      'peak_flops': next((v for k, v in PEAK_FLOPS.items() if k in device_kind), None),
      'device': f'{device_kind} ({jax.default_backend()}); torch on {device}',
      'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores',
      'command': 'python benchmarks/opd_round_throughput.py ' +
                 ' '.join(argv if argv is not None else sys.argv[1:]),
      'commit': commit,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  tag = f'{args.out}_{jax.default_backend()}_{args.dtype}'
  with open(tag + '.json', 'w') as f:
    json.dump(result, f, indent=2)
  with open(tag + '.md', 'w') as f:
    f.write(markdown(result))
  print(markdown(result))
  return result


if __name__ == '__main__':
  main()
