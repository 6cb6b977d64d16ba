"""Tiny random SD3 pipelines for tests, built offline (no hub): byte-level BPE CLIP tokenizers,
a character Unigram T5 tokenizer, tiny CLIP-L/CLIP-G/T5 encoders, transformer and VAE.
"""

import string

import diffusers
import torch
import transformers

CLIP_LEN = 77
T5_WIDTH = 96  # > CLIP-L (32) + CLIP-G (48), as 4096 > 768 + 1280 in SD3.


def clip_tokenizer(pad_token: str) -> transformers.CLIPTokenizer:
  # CLIP's byte-level alphabet: 188 printable characters stand for themselves, the other 68
  # bytes map to chr(256 + i). Every byte (alone or word-final) is a token; two merges on top.
  chars = ([chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] +
           [chr(c) for c in range(174, 256)] + [chr(256 + i) for i in range(68)])
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + '</w>': len(chars) + i for i, c in enumerate(chars)})
  merges = [('a', 't</w>'), ('c', 'at</w>')]
  for token in ('at</w>', 'cat</w>', '<|startoftext|>', '<|endoftext|>'):
    vocab[token] = len(vocab)
  # SD3's CLIP-G tokenizer pads with "!" while CLIP-L pads with <|endoftext|>: keep that.
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LEN,
                                    pad_token=pad_token)


def t5_tokenizer() -> transformers.T5TokenizerFast:
  pieces = [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0), ('▁', -2.0)]
  pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + ',.']
  pieces += [('▁' + c, -2.5) for c in string.ascii_lowercase]
  return transformers.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def clip_encoder(tokenizer, hidden: int) -> transformers.CLIPTextModelWithProjection:
  config = transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
      num_attention_heads=4, projection_dim=hidden, max_position_embeddings=CLIP_LEN,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)
  return transformers.CLIPTextModelWithProjection(config).eval()


def tiny_pipeline(with_t5: bool = True, **transformer_kwargs
                  ) -> diffusers.StableDiffusion3Pipeline:
  """A StableDiffusion3Pipeline of tiny random models (transformer sizes overridable)."""
  torch.manual_seed(0)
  tok, tok2 = clip_tokenizer('<|endoftext|>'), clip_tokenizer('!')
  tok3 = t5_tokenizer()
  t5 = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=len(tok3), d_model=T5_WIDTH, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
      relative_attention_num_buckets=8)).eval()
  sizes = dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
               attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
               joint_attention_dim=T5_WIDTH, pooled_projection_dim=32 + 48)
  transformer = diffusers.SD3Transformer2DModel(**{**sizes, **transformer_kwargs})
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=(4,), latent_channels=4,
      down_block_types=('DownEncoderBlock2D',), up_block_types=('UpDecoderBlock2D',),
      norm_num_groups=1, layers_per_block=1, sample_size=8)
  return diffusers.StableDiffusion3Pipeline(
      transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
      tokenizer=tok, text_encoder=clip_encoder(tok, 32),
      tokenizer_2=tok2, text_encoder_2=clip_encoder(tok2, 48),
      tokenizer_3=tok3 if with_t5 else None, text_encoder_3=t5 if with_t5 else None)


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


# A tiny SD3.5-architecture transformer: dual attention in block 0, RMS qk-norm.
SD35 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            dual_attention_layers=(0,), qk_norm='rms_norm', pos_embed_max_size=8)


def save_sd35(root) -> diffusers.StableDiffusion3Pipeline:
  """Saves a tiny SD3.5 pipeline with non-trivial transformer weights (diffusers zero-inits the
  output layers) as the diffusers folder root/'sd35'; returns the pipeline."""
  pipe = tiny_pipeline(**SD35)
  with torch.no_grad():
    for p in pipe.transformer.parameters():
      p.normal_(0.0, 0.1)
  pipe.save_pretrained(root / 'sd35')
  return pipe


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
