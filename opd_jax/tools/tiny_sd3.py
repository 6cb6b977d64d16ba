"""Tiny random SD3 / SD3.5 pipelines and PEFT teachers, built offline, to try the real setting.

    python -m opd_jax.tools.tiny_sd3 --out_dir=/tmp/tiny_sd35

writes `out_dir/sd35` (a diffusers StableDiffusion3Pipeline folder of the SD3.5 architecture —
dual attention in block 0, RMS qk-norm — with tiny random CLIP-L, CLIP-G, T5, transformer and
VAE; byte-level BPE CLIP tokenizers and a character Unigram T5 tokenizer, no hub) and one random
PEFT LoRA teacher per task, `out_dir/teacher_<task>`, on the recipe's LoRA targets. Every
command and notebook of the real setting (`configs/opd_sd35m.py`, `opd_jax.tools.encode_prompts`,
`opd_jax.sample`, `opd_jax.evaluate`, `notebooks/sd35_medium`) runs on these in seconds on a CPU;
the tests build theirs here too. The images mean nothing: the weights are random.
"""

from __future__ import annotations

import os
import string
import sys
from typing import Sequence

CLIP_LEN = 77
T5_WIDTH = 96  # > CLIP-L (32) + CLIP-G (48), as 4096 > 768 + 1280 in SD3.
TASKS = ('composition', 'text', 'aesthetics')
# A tiny SD3.5-architecture transformer: dual attention in block 0, RMS qk-norm.
SD35 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            dual_attention_layers=(0,), qk_norm='rms_norm', pos_embed_max_size=8)


def clip_tokenizer(pad_token: str):
  """A byte-level BPE CLIP tokenizer of every byte and two merges (CLIP's byte alphabet: 188
  printable characters stand for themselves, the other 68 bytes map to chr(256 + i))."""
  import transformers
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


def t5_tokenizer():
  """A character Unigram T5 tokenizer (letters, digits, ',' and '.')."""
  import transformers
  pieces = [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0), ('▁', -2.0)]
  pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + ',.']
  pieces += [('▁' + c, -2.5) for c in string.ascii_lowercase]
  return transformers.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def clip_encoder(tokenizer, hidden: int):
  """A 3-layer random CLIPTextModelWithProjection of width `hidden` for `tokenizer`."""
  import transformers
  config = transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
      num_attention_heads=4, projection_dim=hidden, max_position_embeddings=CLIP_LEN,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)
  return transformers.CLIPTextModelWithProjection(config).eval()


def tiny_pipeline(with_t5: bool = True, **transformer_kwargs):
  """A StableDiffusion3Pipeline of tiny random models (transformer sizes overridable; torch's
  global seed is set to 0 first, so the same call gives the same weights)."""
  import diffusers
  import torch
  import transformers
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


def write_sd35(folder: str | os.PathLike):
  """Saves a tiny SD3.5 pipeline with non-trivial transformer weights (diffusers zero-inits the
  output layers) as the diffusers folder `folder`; returns the pipeline."""
  import torch
  pipe = tiny_pipeline(**SD35)
  with torch.no_grad():
    for p in pipe.transformer.parameters():
      p.normal_(0.0, 0.1)
  pipe.save_pretrained(os.fspath(folder))
  return pipe


def write_teachers(base_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   tasks: Sequence[str] = TASKS, *, rank: int = 4, alpha: float = 8.0,
                   scale: float = 0.2, seed: int = 10) -> dict[str, str]:
  """One random PEFT LoRA per task on `base_dir`'s transformer (the recipe's LoRA targets;
  lora_B ~ N(0, scale²) so each teacher moves the base), saved by peft as
  `out_dir/teacher_<task>`; returns {task: folder}."""
  import diffusers
  import torch
  from peft import LoraConfig, get_peft_model
  from opd_jax.models.peft_io import RECIPE_LORA_TARGETS
  folders = {}
  for k, task in enumerate(tasks):
    transformer = diffusers.SD3Transformer2DModel.from_pretrained(
        os.path.join(os.fspath(base_dir), 'transformer'))
    model = get_peft_model(transformer, LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights='gaussian',
        target_modules=list(RECIPE_LORA_TARGETS)))
    g = torch.Generator().manual_seed(seed + k)
    with torch.no_grad():
      for name, p in model.named_parameters():
        if 'lora_B' in name:
          p.copy_(scale * torch.randn(p.shape, generator=g))
    folders[task] = os.path.join(os.fspath(out_dir), f'teacher_{task}')
    model.save_pretrained(folders[task])
  return folders


def write_all(out_dir: str | os.PathLike, tasks: Sequence[str] = TASKS) -> dict[str, object]:
  """`out_dir/sd35` and its teachers `out_dir/teacher_<task>`: {'base': folder, 'teachers':
  {task: folder}}."""
  out_dir = os.fspath(out_dir)
  base = os.path.join(out_dir, 'sd35')
  write_sd35(base)
  return {'base': base, 'teachers': write_teachers(base, out_dir, tasks)}


def main(argv: Sequence[str]) -> None:
  """`python -m opd_jax.tools.tiny_sd3 --out_dir=DIR [--tasks=a,b]`."""
  from absl import flags
  from opd_jax.errors import ConfigError, InputError, report_errors
  from opd_jax.errors import parse_absl_flags
  flags.DEFINE_string('out_dir', None, 'folder to create (must not exist)')
  flags.DEFINE_list('tasks', list(TASKS), 'one PEFT teacher per task')
  flags.DEFINE_bool('traceback', False, 'show tracebacks for user errors')
  rest = parse_absl_flags(list(argv))
  fv = flags.FLAGS
  with report_errors(fv.traceback):
    if len(rest) > 1:
      raise ConfigError(f'unexpected arguments {rest[1:]}; every input is a --flag')
    if not fv.out_dir:
      raise ConfigError('--out_dir: missing (the folder to create)')
    if os.path.exists(fv.out_dir):
      raise InputError(f'--out_dir: {fv.out_dir} already exists')
    if not fv.tasks or len(set(fv.tasks)) != len(fv.tasks):
      raise ConfigError(f'--tasks: distinct task names, got {fv.tasks}')
    written = write_all(fv.out_dir, fv.tasks)
  print(f'wrote {os.path.abspath(written["base"])} and teachers '
        f'{", ".join(os.path.basename(p) for p in written["teachers"].values())}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
