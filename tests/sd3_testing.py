"""Tiny random SD3 pipelines for tests (built by `opd_jax.tools.tiny_sd3`, offline) and the
checks the SD3 tests share.
"""

import diffusers
import torch

from opd_jax.tools.tiny_sd3 import (CLIP_LEN, SD35, T5_WIDTH, clip_encoder,  # noqa: F401
                                    clip_tokenizer, t5_tokenizer, tiny_pipeline, write_sd35,
                                    write_teachers)


def assert_peft_matches(base_dir: str, adapter, peft_dir: str, rank: int, alpha: float,
                        atol: float = 1e-4) -> float:
  """diffusers + peft loading `peft_dir` on `base_dir`'s transformer give the velocities of our
  MMDiT with `adapter` (a pure-dict LoRA adapter); returns max |ours − base| (the adapter's
  effect, so a caller can check the comparison has teeth)."""
  import os
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from peft import PeftModel
  from opd_jax.models.loading.pretrained import load_mmdit
  from opd_jax.models.lora import split_model
  graphdef, base, lora = split_model(load_mmdit(base_dir, lora_rank=rank, lora_alpha=alpha))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 5, T5_WIDTH)).astype(np.float32)
  pooled = rng.standard_normal((2, 80)).astype(np.float32)
  ts = np.array([900.0, 300.0], np.float32)
  run = lambda adapter: np.asarray(nnx.merge(graphdef, nnx.to_pure_dict(base), adapter)(
      jnp.asarray(x), jnp.asarray(ts), jnp.asarray(ctx), jnp.asarray(pooled)))
  ours = run(jax.tree.map(jnp.asarray, adapter))
  torch_model = PeftModel.from_pretrained(
      diffusers.SD3Transformer2DModel.from_pretrained(os.path.join(base_dir, 'transformer')),
      peft_dir).eval()
  with torch.no_grad():
    ref = torch_model(hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2)),
                      encoder_hidden_states=torch.from_numpy(ctx),
                      pooled_projections=torch.from_numpy(pooled),
                      timestep=torch.from_numpy(ts)).sample.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)
  return float(np.abs(ours - run(nnx.to_pure_dict(lora))).max())


def save_sd35(root) -> diffusers.StableDiffusion3Pipeline:
  """Saves a tiny SD3.5 pipeline as the diffusers folder root/'sd35'; returns the pipeline."""
  return write_sd35(root / 'sd35')


def encode_prompt_files(root, prompts: dict) -> str:
  """Writes one prompt file per task and their cache (`opd_jax.tools.encode_prompts`, T5 length
  8) from the pipeline at root/'sd35'; returns the cache directory root/'cache'."""
  import os
  import subprocess
  import sys
  specs = []
  for task, lines in prompts.items():
    (root / f'{task}.txt').write_text('\n'.join(lines) + '\n')
    specs.append(f'{task}={root / f"{task}.txt"}')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-m', 'opd_jax.tools.encode_prompts',
                         f'--model_dir={root / "sd35"}', f'--out_dir={root / "cache"}',
                         f'--prompts={",".join(specs)}', '--max_sequence_length=8'],
                        cwd=repo, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(root / 'cache')
