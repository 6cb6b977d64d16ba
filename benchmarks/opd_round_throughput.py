"""One DiffusionOPD round in PyTorch (diffusers + peft) and in opd_jax, side by side.

    python benchmarks/opd_round_throughput.py                      # small SD3.5-like net, CPU
    python benchmarks/opd_round_throughput.py --size=sd35m --dtype=bfloat16 --prompts=3  # GPU

The round is the released recipe's (spec §5): for each of 3 tasks, a 10-step Euler ODE student
rollout with CFG 4.5 (no grad), then the first 9 steps re-evaluated with grad, the task's
teacher mean at the same states (teacher LoRA, its own CFG: 1.0 for the first task, 4.5 for the
others) and ½‖μ_S − μ_T‖² averaged over latent elements and steps; gradients accumulate over
steps and tasks; one AdamW step on the student LoRA (r, α on the eight attention projections).

PyTorch: `SD3Transformer2DModel` with peft adapters 'student' and 'teacher<k>' switched with
`set_adapter`, one backward per trained step (the way the official code bounds memory).
opd_jax: `opd.setup.build_opd` on the same weights (loaded torch-free from the saved folder) and
the same teacher LoRAs (PEFT files written by the torch side), one jitted round. Both get the
same batch shapes; timings exclude the first (compiling / warm-up) round.
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

SIZES = {
    # 4 blocks (2 with dual attention), 128 wide, 16×16×16 latents → 64 image tokens.
    'small': dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                  attention_head_dim=32, num_attention_heads=4, joint_attention_dim=256,
                  caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=16,
                  dual_attention_layers=(0, 1), qk_norm='rms_norm'),
    # SD3.5-Medium's transformer config (random weights), 512 px → 64×64×16 latents.
    'sd35m': dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                  dual_attention_layers=tuple(range(13)), qk_norm='rms_norm'),
}
LATENT = {'small': 16, 'sd35m': 64}
TEXT_TOKENS = {'small': 32, 'sd35m': 333}
TASK_CFG = (1.0, 4.5, 4.5)
STEPS, TRAINED, STUDENT_CFG, SHIFT = 10, 9, 4.5, 3.0


def sigmas() -> np.ndarray:
  from opd_jax.sampling.schedule import flow_match_sigmas
  return np.asarray(flow_match_sigmas(STEPS, SHIFT), np.float32)


def make_models(size: str, rank: int, alpha: float, folder: str, seed: int = 0):
  """Random base + 3 teacher LoRAs (saved for opd_jax) and the torch model with all adapters."""
  import torch
  from diffusers import SD3Transformer2DModel
  from peft import LoraConfig
  from opd_jax.models.peft_io import RECIPE_LORA_TARGETS
  torch.manual_seed(seed)
  model = SD3Transformer2DModel(**SIZES[size])
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


def batch_arrays(size: str, prompts: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  cfg = SIZES[size]
  shape = (3, prompts)
  return {'context': rng.standard_normal(shape + (TEXT_TOKENS[size], cfg['joint_attention_dim']),
                                         np.float32),
          'pooled': rng.standard_normal(shape + (cfg['pooled_projection_dim'],), np.float32),
          'neg_context': rng.standard_normal((1, TEXT_TOKENS[size], cfg['joint_attention_dim']),
                                             np.float32),
          'neg_pooled': rng.standard_normal((1, cfg['pooled_projection_dim']), np.float32)}


# --- PyTorch -------------------------------------------------------------------------------------
def torch_round_fn(model, arrays: dict, size: str, dtype: str, device: str):
  import torch
  tdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
  model.to(device)
  params = [p for n, p in model.named_parameters() if 'lora_' in n and '.student' in n]
  for n, p in model.named_parameters():
    p.requires_grad_('lora_' in n and '.student' in n)
  opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4)
  sig = torch.tensor(sigmas(), device=device)
  cond = {k: torch.tensor(v, device=device) for k, v in arrays.items()}
  c, lat = SIZES[size]['in_channels'], LATENT[size]
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
def jax_round_fn(folder: str, arrays: dict, size: str, dtype: str, rank: int, alpha: float):
  import jax
  import ml_collections
  from flax import nnx
  from configs.opd_sd35m import get_config
  from opd_jax.models.loading.pretrained import load_mmdit
  from opd_jax.models.lora import split_model
  from opd_jax.models.peft_io import load_lora_adapter
  from opd_jax.models.registry import DTYPES, make_module
  from opd_jax.parallel.mesh import make_mesh
  from opd_jax.opd.setup import build_opd, device_batch
  c = get_config()
  c.model.transformer = ml_collections.ConfigDict(
      {k: list(v) if isinstance(v, tuple) else v for k, v in SIZES[size].items()})
  c.model.update(latent_size=LATENT[size], latent_channels=SIZES[size]['in_channels'],
                 dtype=dtype, param_dtype=dtype, remat=size != 'small')
  c.lora.update(rank=rank, alpha=alpha)
  c.rollout.shift = 3.0
  c.data.batch_size_per_device = arrays['pooled'].shape[1]
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
  flops = None
  try:
    cost = setup.round_fn.lower(box['state'], setup.frozen, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', 0.0)) or None
  except Exception:  # cost analysis is best-effort; timing does not depend on it
    flops = None

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


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', choices=sorted(SIZES), default='small')
  p.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  p.add_argument('--prompts', type=int, default=2, help='prompts per task per round')
  p.add_argument('--rank', type=int, default=32)
  p.add_argument('--alpha', type=float, default=64.0)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results',
                                               'opd_round_throughput'))
  args = p.parse_args(argv)
  import torch
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  arrays = batch_arrays(args.size, args.prompts)
  with tempfile.TemporaryDirectory() as folder:
    model = make_models(args.size, args.rank, args.alpha, folder)
    torch_times = time_rounds(torch_round_fn(model, arrays, args.size, args.dtype, device),
                              args.rounds)
    del model
    jax_fn, flops = jax_round_fn(folder, arrays, args.size, args.dtype, args.rank, args.alpha)
    jax_times = time_rounds(jax_fn, args.rounds)
  trajectories = 3 * args.prompts
  import jax
  device_kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_FLOPS.items() if k in device_kind), None)
  t_jax, t_torch = float(np.median(jax_times)), float(np.median(torch_times))
  commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
  result = {
      'size': args.size, 'dtype': args.dtype, 'prompts_per_task': args.prompts,
      'trajectories_per_round': trajectories, 'lora_rank': args.rank,
      'seconds_per_round': {'pytorch': t_torch, 'opd_jax': t_jax},
      'samples_per_second': {'pytorch': trajectories / t_torch, 'opd_jax': trajectories / t_jax},
      'speedup_opd_jax_over_pytorch': t_torch / t_jax,
      'all_round_seconds': {'pytorch': torch_times, 'opd_jax': jax_times},
      'opd_jax_round_flops': flops,
      'mfu': (flops / t_jax / peak) if (flops and peak) else None,
      'device': f'{device_kind} ({jax.default_backend()}); torch on {device}',
      'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores',
      'command': 'python benchmarks/opd_round_throughput.py ' +
                 ' '.join(argv if argv is not None else sys.argv[1:]),
      'commit': commit,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  tag = f'{args.out}_{args.size}_{args.dtype}'
  with open(tag + '.json', 'w') as f:
    json.dump(result, f, indent=2)
  mfu = ('n/a (no accelerator peak known for this device)' if result['mfu'] is None
         else f'{100 * result["mfu"]:.1f} %')
  with open(tag + '.md', 'w') as f:
    f.write(f'# OPD round throughput: opd_jax vs PyTorch (diffusers + peft)\n\n'
            f'Command: `{result["command"]}`  \nCommit: `{commit}`  \n'
            f'Device: {result["device"]}; machine: {result["machine"]}\n\n'
            f'{args.size} SD3.5-architecture transformer, {args.dtype}, LoRA r{args.rank}, '
            f'3 tasks × {args.prompts} prompts, 10-step ODE rollout with CFG, 9 trained steps; '
            f'median of {args.rounds} rounds after one warm-up round.\n\n'
            '| implementation | s / round | samples / s |\n|---|---|---|\n'
            f'| PyTorch (diffusers + peft) | {t_torch:.3f} | {trajectories / t_torch:.2f} |\n'
            f'| opd_jax | {t_jax:.3f} | {trajectories / t_jax:.2f} |\n\n'
            f'Speed-up opd_jax / PyTorch: {t_torch / t_jax:.2f}×. MFU: {mfu}.\n')
  print(json.dumps(result, indent=2))
  return result


if __name__ == '__main__':
  main()
