r"""Text-to-image sampling with SD3 / SD3.5 (+ an optional LoRA) from cached prompt embeddings.

    python -m opd_jax.sample --model_dir=/models/sd3.5-medium [--adapter=runs/opd/student_peft] \
        --embeddings=/data/prompt_cache --task=ocr --split=test --out_dir=samples/ocr \
        --steps=40 --cfg=4.5 --seed=0 [--resolution=512 --batch_size=4 --num_prompts=16]

It runs what diffusers' StableDiffusion3Pipeline runs — the FlowMatchEulerDiscreteScheduler
schedule (shift from `model_dir/scheduler/scheduler_config.json`), Euler ODE steps, CFG with the
empty-prompt embedding, the VAE decode of latents/scaling_factor + shift_factor — with the JAX
models loaded straight from the diffusers folder (no torch). `--embeddings` is a cache written by
`opd_jax.tools.encode_prompts` (pick `--task`/`--split`) or an .npz holding `prompt_embeds`
[N, L, D], `pooled_prompt_embeds` [N, P], optionally `negative_prompt_embeds` [L, D] /
`negative_pooled_prompt_embeds` [P] (needed when --cfg > 1) and `prompts` [N].
Image i is `out_dir/{i:05d}.png`, drawn from key fold_in(seed, i) whatever the batch size;
`out_dir/prompts.jsonl` maps indices to prompts when they are known. The evaluation recipe of
spec §5 is the default: 40 Euler steps, CFG 4.5.

Bad input — a missing or corrupt folder or file, embeddings that do not fit the transformer, a
resolution the model cannot sample, --cfg > 1 without a negative embedding — ends with one
`error: …` line naming the flag or path and exit status 1 (2 for a bad or missing flag);
`--traceback` shows the traceback. Flags, config files and embeddings are checked before any
weight is read.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.errors import ConfigError, InputError, parse_absl_flags, report_errors
from opd_jax.models.loading.pretrained import (load_mmdit, load_vae, mmdit_config,
                                               scheduler_shift, vae_config)
from opd_jax.models.mmdit import MMDiT, MMDiTConfig
from opd_jax.models.peft_io import adapter_from_peft, read_peft_adapter
from opd_jax.models.vae import AutoencoderKL, images_to_uint8
from opd_jax.sampling.rollout import rollout
from opd_jax.sampling.schedule import flow_match_sigmas

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
NPZ_KEYS = ('prompt_embeds', 'pooled_prompt_embeds')
NPZ_NEGATIVE_KEYS = ('negative_prompt_embeds', 'negative_pooled_prompt_embeds')


def load_transformer(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
                     dtype: Any = jnp.float32) -> MMDiT:
  """The pipeline's transformer, with a PEFT/diffusers LoRA applied when `adapter` is given.

  The model gets adapter slots exactly on the adapter's modules, at its largest rank with scale 1;
  `fold_adapter` absorbs each module's own alpha/r into B, so per-module alphas are exact.
  """
  if adapter is None:
    return load_mmdit(model_dir, dtype=dtype)
  try:
    peft = read_peft_adapter(adapter)
  except InputError as e:
    raise InputError(f'--adapter: {e}') from None
  rank = max(a.shape[0] for a in peft.a.values())
  model = load_mmdit(model_dir, lora_rank=rank, lora_alpha=float(rank),
                     lora_targets=sorted(peft.a), dtype=dtype)
  try:
    nnx.update(model, adapter_from_peft(peft, model))
  except InputError as e:
    raise InputError(f'--adapter: {adapter}: {e}') from None
  return model


def make_sampler(transformer: MMDiT, *, sigmas: np.ndarray, cfg_scale: float,
                 latent_shape: Sequence[int]) -> Callable[..., jax.Array]:
  """A jitted Euler-ODE sampler: (cond, uncond, keys [B], x_init=None) → final latents.

  `cond`/`uncond` are {'context': [B, L, D], 'pooled': [B, P]}; `uncond=None` skips CFG (what
  the pipeline does for cfg_scale ≤ 1). `x_init` [B, H, W, C] replaces the key-drawn noise.
  Latents are in the transformer's space (apply `decode_latents` for images).
  """
  graphdef, state = nnx.split(transformer)

  @jax.jit
  def run(state, cond, uncond, keys, x_init):
    def velocity(x, timestep, c):
      return nnx.merge(graphdef, state)(x, timestep, **c)
    trajectory = rollout(velocity, cond, uncond, keys, sigmas=sigmas,
                         latent_shape=tuple(latent_shape), kernel='ode', cfg_scale=cfg_scale,
                         x_init=x_init)
    return trajectory.latents[-1]

  def sample(cond, uncond, keys, x_init=None):
    return run(state, cond, uncond, keys, x_init)
  return sample


def decode_latents(vae: AutoencoderKL, latents: jax.Array) -> jax.Array:
  """Transformer-space latents [B, h, w, C] → uint8 images [B, h·f, w·f, 3]."""
  return images_to_uint8(vae.decode(vae.from_model_latents(latents)))


def load_embeddings(path: str | os.PathLike, *, task: str | None = None, split: str = 'train',
                    num_prompts: int | None = None):
  """(cond {'context', 'pooled'} as numpy [N, …], negative {…} [1, …] or None, prompts or None).

  `path` is an .npz file (see the module docstring) or an `encode_prompts` cache directory.

  Raises:
    InputError: a missing, unreadable or malformed file or cache (the message starts with
      `--embeddings:`); ConfigError: a cache without `task`.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    from opd_jax.data import prompt_embeddings as pe  # grain/TFDS only when reading a cache
    if task is None:
      raise ConfigError(f'--task: {path} is a prompt cache; pass --task (and --split)')
    try:
      source = pe.load_prompt_embeddings(path, task, split)
      n = len(source) if num_prompts is None else min(num_prompts, len(source))
      items = [source[i] for i in range(n)]
      neg = pe.load_negative(path)
    except InputError as e:
      raise InputError(f'--embeddings: {e}') from None
    if not items:
      raise InputError(f'--embeddings: {path} has no prompts in {task}/{split}')
    cond = {'context': np.stack([it['prompt_embeds'] for it in items]).astype(np.float32),
            'pooled': np.stack([it['pooled_prompt_embeds'] for it in items]).astype(np.float32)}
    negative = {'context': neg['prompt_embeds'][None], 'pooled': neg['pooled_prompt_embeds'][None]}
    return cond, negative, [pe.decode_text(it['prompt']) for it in items]
  if not os.path.isfile(path):
    raise InputError(f'--embeddings: {path} not found (expected an .npz file or a prompt cache '
                     'of opd_jax.tools.encode_prompts)')
  try:
    with np.load(path, allow_pickle=False) as data:
      return _npz_embeddings(path, data, num_prompts)
  except InputError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:   # numpy's, for a bad file
    raise InputError(f'--embeddings: {path} is not a readable .npz file '
                     f'({type(e).__name__}: {e})') from None


def _npz_embeddings(path: str, data, num_prompts: int | None):
  """`load_embeddings` of an open .npz: its arrays, checked and converted."""
  def need(*keys):
    missing = [k for k in keys if k not in data]
    if missing:
      raise InputError(f'--embeddings: {path} lacks {", ".join(missing)}')
  need(*NPZ_KEYS)
  n = data['prompt_embeds'].shape[0] if num_prompts is None else num_prompts
  cond = {'context': np.asarray(data['prompt_embeds'][:n], np.float32),
          'pooled': np.asarray(data['pooled_prompt_embeds'][:n], np.float32)}
  if cond['context'].ndim != 3 or cond['pooled'].ndim != 2:
    raise InputError(f'--embeddings: {path}: prompt_embeds must be [N, L, D] and '
                     f'pooled_prompt_embeds [N, P], got {list(cond["context"].shape)} and '
                     f'{list(cond["pooled"].shape)}')
  if len(cond['context']) != len(cond['pooled']) or not len(cond['context']):
    raise InputError(f'--embeddings: {path}: {len(cond["context"])} prompt_embeds and '
                     f'{len(cond["pooled"])} pooled_prompt_embeds (need the same number, > 0)')
  negative = None
  if 'negative_prompt_embeds' in data or 'negative_pooled_prompt_embeds' in data:
    need(*NPZ_NEGATIVE_KEYS)
    ctx, pooled = data['negative_prompt_embeds'], data['negative_pooled_prompt_embeds']
    if ctx.shape[-2:] != cond['context'].shape[1:] or pooled.shape[-1:] != cond['pooled'].shape[1:]:
      raise InputError(f'--embeddings: {path}: negative embeddings {list(ctx.shape)} / '
                       f'{list(pooled.shape)} do not match the prompts\' '
                       f'{list(cond["context"].shape[1:])} / {list(cond["pooled"].shape[1:])}')
    negative = {'context': np.asarray(ctx, np.float32).reshape((1,) + ctx.shape[-2:]),
                'pooled': np.asarray(pooled, np.float32).reshape(1, -1)}
  prompts = [str(p) for p in data['prompts'][:n]] if 'prompts' in data else None
  return cond, negative, prompts


def check_embeddings(cond, config: MMDiTConfig, path) -> None:
  """The embeddings' widths are the transformer's (else the first call fails deep in XLA)."""
  for key, name, field in (('context', 'prompt_embeds', 'joint_attention_dim'),
                           ('pooled', 'pooled_prompt_embeds', 'pooled_projection_dim')):
    width = getattr(config, field)
    if cond[key].shape[-1] != width:
      raise InputError(f'--embeddings: {path}: {name} have width {cond[key].shape[-1]}, the '
                       f'transformer\'s {field} is {width}')


def check_settings(*, steps: int, resolution: int, batch_size: int, num_prompts: int | None,
                   shift: float | None, dtype: str) -> None:
  """The numeric flags, before anything is read."""
  for name, value in (('steps', steps), ('resolution', resolution), ('batch_size', batch_size)):
    if value < 1:
      raise ConfigError(f'--{name}: must be >= 1, got {value}')
  if num_prompts is not None and num_prompts < 1:
    raise ConfigError(f'--num_prompts: must be >= 1 (or unset: all), got {num_prompts}')
  if shift is not None and not shift > 0:
    raise ConfigError(f'--shift: must be > 0 (or unset: the scheduler config\'s), got {shift}')
  if dtype not in DTYPES:
    raise ConfigError(f'--dtype: {dtype!r} is not one of {sorted(DTYPES)}')


def latent_size(resolution: int, transformer: MMDiTConfig, vae_factor: int) -> int:
  """Latent side length of `resolution`-pixel images; a size the models cannot sample is an
  error naming --resolution (checked from the config files, before weights are loaded)."""
  step = vae_factor * transformer.patch_size
  if resolution % step:
    raise ConfigError(f'--resolution: {resolution} must be a multiple of {step} (the VAE '
                      f'factor {vae_factor} × patch size {transformer.patch_size})')
  grid = resolution // step
  if transformer.pos_embed_max_size is not None and grid > transformer.pos_embed_max_size:
    raise ConfigError(f'--resolution: {resolution} gives a {grid}×{grid} patch grid, more than '
                      f'the transformer\'s pos_embed_max_size {transformer.pos_embed_max_size}')
  return resolution // vae_factor


def generate(model_dir: str | os.PathLike, embeddings: str | os.PathLike,
             out_dir: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
             task: str | None = None, split: str = 'train', steps: int = 40, cfg: float = 4.5,
             seed: int = 0, shift: float | None = None, resolution: int = 512,
             batch_size: int = 4, num_prompts: int | None = None,
             dtype: str = 'float32') -> list[str]:
  """Samples one image per prompt and writes PNGs; returns their paths (see module docstring).

  Raises:
    UserError (ConfigError / InputError): bad settings or inputs, named by their flag; every
      check that needs no weights runs before any weight is read.
  """
  from PIL import Image
  check_settings(steps=steps, resolution=resolution, batch_size=batch_size,
                 num_prompts=num_prompts, shift=shift, dtype=dtype)
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise InputError(f'--model_dir: {model_dir} not found (expected a diffusers SD3/SD3.5 '
                     'pipeline folder)')
  if adapter is not None and not os.path.exists(adapter):
    raise InputError(f'--adapter: {os.fspath(adapter)} not found (expected a PEFT folder or a '
                     'diffusers LoRA file)')
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise InputError(f'--out_dir: {os.fspath(out_dir)} exists and is not a directory')
  try:
    transformer_config = mmdit_config(model_dir)
    vae_factor = 2 ** (len(vae_config(model_dir).block_out_channels) - 1)
    if shift is None:
      shift = scheduler_shift(model_dir)
  except InputError as e:
    raise InputError(f'--model_dir: {e}') from None
  size = latent_size(resolution, transformer_config, vae_factor)
  cond, negative, prompts = load_embeddings(embeddings, task=task, split=split,
                                            num_prompts=num_prompts)
  check_embeddings(cond, transformer_config, embeddings)
  if cfg > 1 and negative is None:
    raise ConfigError(f'--cfg: {cfg} needs negative_prompt_embeds and '
                      f'negative_pooled_prompt_embeds in {os.fspath(embeddings)} (or --cfg=1)')
  transformer = load_transformer(model_dir, adapter, dtype=DTYPES[dtype])
  vae = load_vae(model_dir)
  sigmas = flow_match_sigmas(steps, shift)
  sampler = make_sampler(transformer, sigmas=sigmas, cfg_scale=cfg,
                         latent_shape=(size, size, transformer.config.in_channels))
  decode = jax.jit(lambda latents: decode_latents(vae, latents))
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise InputError(f'--out_dir: cannot create {os.fspath(out_dir)} ({e})') from None
  root, paths = jax.random.key(seed), []
  n = cond['context'].shape[0]
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(idx))
    batch = {k: jnp.asarray(v[idx]) for k, v in cond.items()}
    uncond = (None if cfg <= 1 else
              {k: jnp.broadcast_to(v, (len(idx),) + v.shape[1:]) for k, v in negative.items()})
    images = np.asarray(decode(sampler(batch, uncond, keys)))
    for i, image in zip(idx, images):
      paths.append(os.path.join(out_dir, f'{i:05d}.png'))
      Image.fromarray(image).save(paths[-1])
  if prompts is not None:
    with open(os.path.join(out_dir, 'prompts.jsonl'), 'w') as f:
      for i, prompt in enumerate(prompts):
        f.write(json.dumps({'index': i, 'prompt': prompt}) + '\n')
  return paths


def main(argv: Sequence[str]) -> None:
  with report_errors(_TRACEBACK.value):
    if len(argv) > 1:
      raise ConfigError(f'unexpected arguments {argv[1:]}; every input is a --flag')
    paths = generate(_MODEL_DIR.value, _EMBEDDINGS.value, _OUT_DIR.value, adapter=_ADAPTER.value,
                     task=_TASK.value, split=_SPLIT.value, steps=_STEPS.value, cfg=_CFG.value,
                     seed=_SEED.value, shift=_SHIFT.value, resolution=_RESOLUTION.value,
                     batch_size=_BATCH_SIZE.value, num_prompts=_NUM_PROMPTS.value,
                     dtype=_DTYPE.value)
  print(f'wrote {len(paths)} images to {_OUT_DIR.value}')


if __name__ == '__main__':
  # Flags are defined only when run as a command: tests import this module next to others that
  # define absl flags of the same names (e.g. opd_jax.tools.encode_prompts' --model_dir).
  from absl import app, flags
  _MODEL_DIR = flags.DEFINE_string('model_dir', None, 'diffusers SD3/SD3.5 pipeline folder.')
  _ADAPTER = flags.DEFINE_string('adapter', None, 'PEFT folder or diffusers LoRA file.')
  _EMBEDDINGS = flags.DEFINE_string('embeddings', None, 'Prompt cache dir or .npz.')
  _TASK = flags.DEFINE_string('task', None, 'Task of a prompt cache.')
  _SPLIT = flags.DEFINE_string('split', 'train', 'Split of a prompt cache.')
  _OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where the PNGs go.')
  _STEPS = flags.DEFINE_integer('steps', 40, 'Euler ODE steps.')
  _CFG = flags.DEFINE_float('cfg', 4.5, 'Guidance scale (≤ 1: no CFG).')
  _SEED = flags.DEFINE_integer('seed', 0, 'Image i uses fold_in(seed, i).')
  _SHIFT = flags.DEFINE_float('shift', None, 'Schedule shift (default: scheduler config).')
  _RESOLUTION = flags.DEFINE_integer('resolution', 512, 'Square image size in pixels.')
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', 4, 'Prompts per sampler call.')
  _NUM_PROMPTS = flags.DEFINE_integer('num_prompts', None, 'First N prompts only.')
  _DTYPE = flags.DEFINE_enum('dtype', 'float32', sorted(DTYPES), 'Transformer compute dtype.')
  _TRACEBACK = flags.DEFINE_bool('traceback', False, 'Show tracebacks of user errors too.')
  for name in ('model_dir', 'embeddings', 'out_dir'):
    flags.mark_flag_as_required(name)
  app.run(main, flags_parser=parse_absl_flags)
