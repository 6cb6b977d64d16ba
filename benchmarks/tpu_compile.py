"""HBM per TPU device of the SD3.5-M OPD round, compiled for TPU topologies on this CPU host.

    pip install "libtpu==0.0.42.*"      # jax 0.10.2's libtpu; it compiles, no TPU needed
    ulimit -s unlimited
    python benchmarks/tpu_compile.py [--topologies v5e:2x4 ...] [--options Fx3 9x3 ...]
    python benchmarks/tpu_compile.py --quick      # a tiny MMDiT at 64 image tokens
    python benchmarks/tpu_compile.py --attention splash ...   # the Pallas splash kernel

libtpu describes a TPU slice (`jax.experimental.topologies.get_topology_desc`) without one
attached; the OPD round of `configs/opd_sd35m.py` is built from shapes alone
(`opd_jax.opd.aot.abstract_round`: the SD3.5-M transformer config, 512 px, r32 LoRA, 3 tasks,
3 prompts per task per device, bfloat16, remat), sharded fsdp over the slice's devices, lowered
and compiled by the TPU compiler. Its `memory_analysis()` gives the bytes one device holds while
the round runs (arguments + outputs − donated + temporaries), compared here with its HBM; the
compiler refuses a program whose temporaries exceed it (reported as such).
An option `CxM` sets `train.timestep_chunks = C` (the 9 trained steps vmapped in C chunks) and
`train.num_microbatches = M` (each task's prompts in M micro-batches); `FxM` is the fused round
(`train.fused_vjp`: the VJP taken during the rollout, one trained step at a time) with M
micro-batches; a trailing `b` runs the network in bfloat16 everywhere instead of the config's
mixed precision (float32 matmul products, residual streams and output layer). The libtpu
compiler recurses deeply on these programs: run under `ulimit -s unlimited` (with the default
8 MiB stack one compile died of a stack overflow). Each row also gives the round's matmul FLOPs per device, counted from its jaxpr
with every loop multiplied out (`opd_jax.opd.aot.round_flops`; XLA's cost analysis counts a loop
body once), and the round time they imply at the stated MFU of the device's bf16 peak. Writes
benchmarks/results/tpu_compile[_quick].{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')   # the host runs on CPU; TPUs are only compiled for

import jax                                        # noqa: E402
import jax.numpy as jnp                           # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

from configs import opd_sd35m                     # noqa: E402
from model_size import SD35_MEDIUM                # noqa: E402
from opd_jax.opd import aot                       # noqa: E402
from opd_jax.parallel.mesh import make_mesh       # noqa: E402

GIB = 2 ** 30
# HBM per JAX device (GiB), from the published per-chip figures. libtpu describes v4 with one
# device per TensorCore (v4:2x2x1 → 8 devices; a chip's 32 GiB serve 2), v5p with one
# (megacore) device per chip, v5e and v6e chips have one TensorCore.
HBM_GIB = {'v4': 16, 'v5e': 16, 'v5p': 95, 'v6e': 32}
# Dense bf16 peak per JAX device (TFLOP/s), from the published per-chip figures (v4: a chip's
# 275 serve its 2 TensorCore devices).
PEAK_TFLOPS = {'v4': 137.5, 'v5e': 197.0, 'v5p': 459.0, 'v6e': 918.0}
MFU = 0.4     # the utilisation the implied round time assumes (stated in the table)
TOPOLOGIES = ('v4:2x2x1', 'v5e:2x4', 'v5p:2x2x1', 'v6e:2x4')
OPTIONS = ('Fx1', 'Fx3', 'Fx3b', '9x3')
TEXT_TOKENS = 77 + 128       # CLIP + T5 at the recipe's max_sequence_length
# --quick: a 2-block, 128-wide MMDiT on 16×16×16 latents (64 image tokens).
QUICK = dict(SD35_MEDIUM, num_layers=2, dual_attention_layers=[0], attention_head_dim=32,
             num_attention_heads=4, caption_projection_dim=128, joint_attention_dim=256,
             pooled_projection_dim=128, pos_embed_max_size=16)


def round_config(transformer: dict, option: str, scan_layers: bool, latent_size: int,
                 attention: str = ''):
  bf16_everywhere = option.endswith('b')
  chunks, micro = option.rstrip('b').split('x')
  fused = chunks.upper() == 'F'
  chunks, micro = (1 if fused else int(chunks)), int(micro)
  c = opd_sd35m.get_config()
  c.train.fused_vjp = fused
  if bf16_everywhere:   # instead of the config's float32 products / residual / output layer
    c.model.update(float32_matmul_output=False, float32_residual=False, float32_output=False)
  c.model.transformer = {k: v for k, v in transformer.items() if not k.startswith('_')}
  c.model.latent_size = latent_size       # 64: SD3.5-M at 512 px (the config's default)
  c.model.scan_layers = scan_layers
  c.model.attention = attention
  c.rollout.shift = 3.0                   # SD3.5-M's scheduler shift (no checkpoint is read)
  c.mesh.shape = {'data': 1, 'fsdp': -1, 'tensor': 1}
  c.train.timestep_chunks = chunks
  c.train.num_microbatches = micro
  return c


def negative(transformer: dict) -> dict:
  return {'context': jax.ShapeDtypeStruct((1, TEXT_TOKENS, transformer['joint_attention_dim']),
                                          jnp.float32),
          'pooled': jax.ShapeDtypeStruct((1, transformer['pooled_projection_dim']), jnp.float32)}


def measure(topology: str, option: str, transformer: dict, scan_layers: bool,
            latent_size: int, attention: str = '') -> dict:
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(platform='tpu', topology_name=topology).devices
  config = round_config(transformer, option, scan_layers, latent_size, attention)
  mesh = make_mesh(config.mesh.shape, devices)
  abstract = aot.abstract_round(config, mesh, negative(transformer))
  kind = topology.split(':')[0]
  tflops = aot.round_flops(abstract) / len(devices) / 1e12
  common = {'topology': topology, 'option': option, 'attention': attention or 'jax default',
            'devices': len(devices),
            'hbm_gib': HBM_GIB[kind], 'tflop_per_device': float(f'{tflops:.3g}'),
            'round_seconds_at_mfu': float(f'{tflops / (PEAK_TFLOPS[kind] * MFU):.3g}')}
  began = time.perf_counter()
  try:
    compiled = abstract.lower().compile()
  except Exception as e:   # the TPU compiler refuses a program that cannot fit
    text = str(e).strip().splitlines()
    return {**common, 'fits': False, 'error': text[0][:300] if text else type(e).__name__,
            'compile_seconds': round(time.perf_counter() - began, 1)}
  memory = aot.memory_per_device(compiled)
  hbm = HBM_GIB[kind]
  return {**common, 'per_device_gib': round(memory['total'] / GIB, 2),
          'temp_gib': round(memory['temp'] / GIB, 2),
          'argument_gib': round(memory['argument'] / GIB, 2),
          'fits': memory['total'] <= hbm * GIB,
          'compile_seconds': round(time.perf_counter() - began, 1)}


def markdown(rows: list[dict], meta: dict) -> str:
  out = [f'# HBM per device of the {meta["model"]} OPD round on TPU topologies', '',
         f'`{meta["command"]}` — compiled by libtpu {meta["libtpu"]} on {meta["machine"]} '
         f'({meta["date"]}, commit {meta["commit"]}). 3 tasks × 3 prompts per task per device, '
         f'{meta["latent"]}×{meta["latent"]}×16 latents ({meta["image_tokens"]} image + '
         f'{TEXT_TOKENS} text tokens), r32 LoRA, attention `{meta["attention"]}`, '
         'bfloat16 weights and matmuls (float32 products, residual streams and output layer '
         'unless the option ends in b: bfloat16 everywhere), remat, scan over blocks, fsdp over '
         'the devices. Option CxM: timestep '
         'chunks × micro-batches; FxM: the fused round (train.fused_vjp) with M micro-batches. '
         f'TFLOP: matmul FLOPs of one round per device, counted from the jaxpr (loops multiplied '
         f'out); round s: TFLOP / ({int(MFU * 100)} % of the device\'s bf16 peak: '
         + ', '.join(f'{k} {v:g}' for k, v in PEAK_TFLOPS.items()) + ' TFLOP/s) — an '
         'estimate, not a measurement.',
         '', '| topology | devices | option | HBM per device needed | of which temporaries | '
         'device HBM | fits | TFLOP per device | round s at '
         f'{int(MFU * 100)} % MFU | compile s |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    flops = f'{r["tflop_per_device"]} | {r["round_seconds_at_mfu"]}'
    if 'per_device_gib' in r:
      out.append(f'| {r["topology"]} | {r["devices"]} | {r["option"]} | {r["per_device_gib"]} GiB | '
                 f'{r["temp_gib"]} GiB | {r["hbm_gib"]} GiB | {"yes" if r["fits"] else "no"} | '
                 f'{flops} | {r["compile_seconds"]} |')
    else:
      out.append(f'| {r["topology"]} | {r["devices"]} | {r["option"]} | compile refused: '
                 f'{r["error"][:120]} | | {r["hbm_gib"]} GiB | no | {flops} | '
                 f'{r["compile_seconds"]} |')
  return '\n'.join(out) + '\n'


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--topologies', nargs='+', default=list(TOPOLOGIES))
  p.add_argument('--options', nargs='+', default=list(OPTIONS))
  p.add_argument('--pairs', nargs='+', default=None, metavar='TOPOLOGY/OPTION',
                 help='measure exactly these (e.g. v5e:2x4/Fx3 v6e:2x4/Fx1) instead of '
                      '--topologies × --options')
  p.add_argument('--scan_layers', action=argparse.BooleanOptionalAction, default=True,
                 help='lax.scan over identical blocks (much faster to compile; same memory)')
  p.add_argument('--quick', action='store_true', help='a 2-block, narrow MMDiT (a smoke run)')
  p.add_argument('--attention', default='', choices=['', 'xla', 'einsum', 'splash'],
                 help="config.model.attention ('': JAX chooses; 'splash': the Pallas kernel)")
  p.add_argument('--out_dir', default=os.path.join(ROOT, 'benchmarks', 'results'))
  args = p.parse_args(argv)
  transformer, latent = (QUICK, 16) if args.quick else (SD35_MEDIUM, 64)
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()   # the code being measured: read it first
  pairs = ([tuple(p.split('/')) for p in args.pairs] if args.pairs else
           [(t, o) for t in args.topologies for o in args.options])
  rows = []
  for topology, option in pairs:
    rows.append(measure(topology, option, transformer, args.scan_layers, latent,
                        args.attention))
    print(json.dumps(rows[-1]), flush=True)
  from importlib import metadata
  meta = {'model': 'tiny 2-block MMDiT (--quick)' if args.quick else 'SD3.5-Medium',
          'latent': latent, 'image_tokens': (latent // transformer['patch_size']) ** 2,
          'command': 'python benchmarks/tpu_compile.py ' + ' '.join(argv or sys.argv[1:]),
          'libtpu': metadata.version('libtpu'), 'commit': commit,
          'attention': args.attention or 'jax default',
          'machine': f'{platform.machine()} {os.cpu_count()}-core {platform.system()} host',
          'date': datetime.date.today().isoformat()}
  name = ('tpu_compile_quick' if args.quick else 'tpu_compile') + (
      f'_{args.attention}' if args.attention else '')
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, name + '.json'), 'w') as f:
    json.dump({'rows': rows, 'meta': meta}, f, indent=2)
  with open(os.path.join(args.out_dir, name + '.md'), 'w') as f:
    f.write(markdown(rows, meta))
  return rows


if __name__ == '__main__':
  main()
