"""Converts open_clip CLIP state dicts and the LAION aesthetic head to folders the JAX loaders read.

Both reward models of spec §2 that do not ship in transformers' format are converted here once:

  * `--open_clip=STATE_DICT --arch=ViT-H-14`: an open_clip `CLIP` state dict (HPSv2.1's
    `HPS_v2.1_compressed.pt` is one: a ViT-H-14 under a 'state_dict' key) → a transformers
    `CLIPModel` folder (config.json + model.safetensors), read by
    `opd_jax.models.loading.clip_weights.load_clip` and by transformers' `CLIPModel` alike.
  * `--aesthetic_head=sac+logos+ava1-l14-linearMSE.pth`: the LAION aesthetic MLP → config.json
    (its layer widths) + model.safetensors (its keys unchanged), read by `load_aesthetic_head`.

The open_clip → transformers names map one to one:

    token_embedding.weight, positional_embedding  → text_model.embeddings.{token,position}_embedding
    [visual.]transformer.resblocks.i.ln_1 / ln_2  → {text,vision}_model.encoder.layers.i.layer_norm1/2
    … .attn.in_proj_{weight,bias} (rows q | k | v) → … .self_attn.{q,k,v}_proj.{weight,bias}
    … .attn.out_proj, .mlp.c_fc, .mlp.c_proj       → … .self_attn.out_proj, .mlp.fc1, .mlp.fc2
    ln_final                                       → text_model.final_layer_norm
    text_projection [width, proj] (x @ P)          → text_projection.weight = Pᵀ
    visual.conv1, visual.class_embedding,          → vision_model.embeddings.patch_embedding,
      visual.positional_embedding                    .class_embedding, .position_embedding
    visual.ln_pre, visual.ln_post                  → vision_model.pre_layrnorm, .post_layernorm
    visual.proj [width, proj]                      → visual_projection.weight = projᵀ
    logit_scale                                    → logit_scale

Widths, depths, patch and image sizes, context length and vocabulary are read from the tensors'
shapes; the head counts and the activation (open_clip's GELU, or QuickGELU for OpenAI-trained
weights: an `-quickgelu` arch) come from `--arch`, or from `--vision_heads`, `--text_heads` and
`--hidden_act` for an architecture not in `OPEN_CLIP_ARCHS`. A named arch is also checked
against the tensors. open_clip pools the text at the largest token id (its end-of-text token);
the written config says so with transformers' legacy `eos_token_id: 2`, which pools the same way.

Usage:
  python -m opd_jax.tools.convert_clip --open_clip=HPS_v2.1_compressed.pt --arch=ViT-H-14 \
      --out=/models/hpsv2.1
  python -m opd_jax.tools.convert_clip --aesthetic_head=sac+logos+ava1-l14-linearMSE.pth \
      --out=/models/laion_aesthetic

torch is imported only to read `.pt`/`.pth`/`.bin` pickles (`weights_only=True`); `.safetensors`
inputs need no torch. Bad input — a missing or unreadable file, an unknown arch, keys or shapes
that do not fit — ends with one `error: …` line and exit status 1 (2 for a bad flag); nothing is
left at `--out` (files are written to a temporary sibling and renamed at the end).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np
from absl import flags
from flax import nnx
from safetensors.numpy import save_file

from opd_jax.errors import (ConfigError, InputError, one_line, report_errors, show_tracebacks)
from opd_jax.models import aesthetic_head as head_lib
from opd_jax.models.clip import ACTIVATIONS, LEGACY_EOS_TOKEN_ID, CLIPConfig, CLIPModel
from opd_jax.models.loading.clip_weights import WEIGHTS_NAME
from opd_jax.models.loading.place import WeightMismatchError, check_checkpoint
from opd_jax.models.loading.safetensors_io import CONFIG_NAME

TORCH_SUFFIXES = ('.pt', '.pth', '.bin', '.ckpt')
QUICKGELU_SUFFIX = '-quickgelu'
_LAYER_NORM_EPS = 1e-5   # open_clip's LayerNorm default


@dataclasses.dataclass(frozen=True)
class OpenClipArch:
  """An open_clip model config (src/open_clip/model_configs/*.json); heads = width/head_width."""
  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  text_width: int
  text_layers: int
  text_heads: int
  context_length: int = 77
  vocab_size: int = 49408


OPEN_CLIP_ARCHS: dict[str, OpenClipArch] = {
    'ViT-B-32': OpenClipArch(512, 224, 32, 768, 12, 12, 512, 12, 8),
    'ViT-B-16': OpenClipArch(512, 224, 16, 768, 12, 12, 512, 12, 8),
    'ViT-L-14': OpenClipArch(768, 224, 14, 1024, 24, 16, 768, 12, 12),
    'ViT-L-14-336': OpenClipArch(768, 336, 14, 1024, 24, 16, 768, 12, 12),
    'ViT-H-14': OpenClipArch(1024, 224, 14, 1280, 32, 16, 1024, 24, 16),
    'ViT-g-14': OpenClipArch(1024, 224, 14, 1408, 40, 16, 1024, 24, 16),
    'ViT-bigG-14': OpenClipArch(1280, 224, 14, 1664, 48, 16, 1280, 32, 20),
}


# --------------------------------------------------------------------------- reading


def _to_numpy(tensor) -> np.ndarray:
  import torch
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a `.safetensors` file or a torch pickle of a state dict.

  A pickle may hold the state dict itself or a checkpoint dict with it under 'state_dict'
  (HPSv2's format); a 'module.' prefix on every key (DistributedDataParallel) is removed.

  Raises:
    InputError: a missing or unreadable file, or one holding no tensors.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InputError(f'{path}: not found')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    try:
      return load_file(path)
    except Exception as e:   # SafetensorError is not importable
      raise InputError(f'{path}: not a readable safetensors file ({e})') from None
  if not path.endswith(TORCH_SUFFIXES):
    raise InputError(f'{path}: unknown file type (expected .safetensors or one of '
                     f'{list(TORCH_SUFFIXES)})')
  import torch
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:   # pickle, zip and weights_only errors of every kind
    raise InputError(f'{path}: not a readable torch state dict ({type(e).__name__}: '
                     f'{one_line(str(e))[:200]})') from None
  if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
    obj = obj['state_dict']
  tensors = ({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
             if isinstance(obj, Mapping) else {})
  if not tensors:
    raise InputError(f'{path}: holds no tensors (expected a state dict)')
  if all(k.startswith('module.') for k in tensors):
    tensors = {k[len('module.'):]: v for k, v in tensors.items()}
  return {k: _to_numpy(v) for k, v in tensors.items()}


# --------------------------------------------------------------------------- open_clip → HF


@dataclasses.dataclass(frozen=True)
class Heads:
  """What the tensors do not say: attention heads per tower and the activation."""
  vision: int
  text: int
  hidden_act: str = 'gelu'


def resolve_arch(arch: str | None, vision_heads: int | None = None,
                 text_heads: int | None = None,
                 hidden_act: str | None = None) -> tuple[Heads, OpenClipArch | None]:
  """Heads and activation from an open_clip arch name (optionally `-quickgelu`) or given
  explicitly; the named arch, if any, to check the tensors against.

  Raises:
    ConfigError: an unknown name, both a name and explicit values, or missing head counts.
  """
  if arch:
    if vision_heads is not None or text_heads is not None or hidden_act is not None:
      raise ConfigError('--arch: give either an arch name or --vision_heads/--text_heads/'
                        '--hidden_act, not both')
    quick = arch.endswith(QUICKGELU_SUFFIX)
    base = arch[:-len(QUICKGELU_SUFFIX)] if quick else arch
    if base not in OPEN_CLIP_ARCHS:
      raise ConfigError(f'--arch: unknown open_clip arch {arch!r}; known: '
                        f'{sorted(OPEN_CLIP_ARCHS)} (each also with {QUICKGELU_SUFFIX}), or give '
                        '--vision_heads and --text_heads')
    spec = OPEN_CLIP_ARCHS[base]
    return Heads(spec.vision_heads, spec.text_heads, 'quick_gelu' if quick else 'gelu'), spec
  if vision_heads is None or text_heads is None:
    raise ConfigError('--arch: missing; give an open_clip arch name (e.g. ViT-H-14) or both '
                      '--vision_heads and --text_heads')
  for name, value in (('--vision_heads', vision_heads), ('--text_heads', text_heads)):
    if value <= 0:
      raise ConfigError(f'{name}: must be positive, got {value}')
  act = hidden_act or 'gelu'
  if act not in ACTIVATIONS:
    raise ConfigError(f'--hidden_act: {act!r} is not one of {list(ACTIVATIONS)}')
  return Heads(vision_heads, text_heads, act), None


def _layer_count(state_dict: Mapping[str, Any], prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r'transformer\.resblocks\.(\d+)\.')
  found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
  return max(found) + 1 if found else 0


def _shape(state_dict: Mapping[str, np.ndarray], key: str, ndim: int, what: str) -> tuple:
  if key not in state_dict:
    raise InputError(f'{what}: no {key!r}; not an open_clip CLIP state dict')
  shape = tuple(state_dict[key].shape)
  if len(shape) != ndim:
    raise InputError(f'{what}: {key} has shape {list(shape)}, expected {ndim} dimensions')
  return shape


def hf_config(state_dict: Mapping[str, np.ndarray], heads: Heads,
              what: str = 'state dict') -> dict[str, Any]:
  """The transformers `CLIPModel` config.json of an open_clip state dict (sizes from shapes)."""
  vocab, text_width = _shape(state_dict, 'token_embedding.weight', 2, what)
  context = _shape(state_dict, 'positional_embedding', 2, what)[0]
  text_proj = _shape(state_dict, 'text_projection', 2, what)[1]
  text_mlp = _shape(state_dict, 'transformer.resblocks.0.mlp.c_fc.weight', 2, what)[0]
  vision_width, channels, patch, _ = _shape(state_dict, 'visual.conv1.weight', 4, what)
  positions = _shape(state_dict, 'visual.positional_embedding', 2, what)[0]
  vision_proj = _shape(state_dict, 'visual.proj', 2, what)[1]
  vision_mlp = _shape(state_dict, 'visual.transformer.resblocks.0.mlp.c_fc.weight', 2, what)[0]
  grid = math.isqrt(positions - 1)
  if grid * grid != positions - 1:
    raise InputError(f'{what}: visual.positional_embedding has {positions} rows, not 1 + a '
                     'square number of patches')
  if text_proj != vision_proj:
    raise InputError(f'{what}: text_projection width {text_proj} differs from visual.proj '
                     f'width {vision_proj}')
  tower = dict(layer_norm_eps=_LAYER_NORM_EPS, hidden_act=heads.hidden_act,
               projection_dim=text_proj)
  return {
      'architectures': ['CLIPModel'],
      'model_type': 'clip',
      'projection_dim': text_proj,
      'logit_scale_init_value': 2.6592,
      'text_config': dict(
          model_type='clip_text_model', vocab_size=vocab, hidden_size=text_width,
          intermediate_size=text_mlp, num_hidden_layers=_layer_count(state_dict, ''),
          num_attention_heads=heads.text, max_position_embeddings=context,
          # open_clip pools at argmax(token ids): transformers' legacy eos_token_id does too.
          eos_token_id=LEGACY_EOS_TOKEN_ID, bos_token_id=vocab - 2, **tower),
      'vision_config': dict(
          model_type='clip_vision_model', hidden_size=vision_width,
          intermediate_size=vision_mlp, num_hidden_layers=_layer_count(state_dict, 'visual.'),
          num_attention_heads=heads.vision, num_channels=channels, image_size=grid * patch,
          patch_size=patch, **tower),
  }


def check_arch(config: Mapping[str, Any], name: str, arch: OpenClipArch, what: str) -> None:
  """InputError listing every size of `config` that differs from the named arch."""
  t, v = config['text_config'], config['vision_config']
  found = dict(embed_dim=config['projection_dim'], image_size=v['image_size'],
               patch_size=v['patch_size'], vision_width=v['hidden_size'],
               vision_layers=v['num_hidden_layers'], vision_heads=v['num_attention_heads'],
               text_width=t['hidden_size'], text_layers=t['num_hidden_layers'],
               text_heads=t['num_attention_heads'], context_length=t['max_position_embeddings'],
               vocab_size=t['vocab_size'])
  wrong = [f'{k} {found[k]} (expected {getattr(arch, k)})'
           for k in found if found[k] != getattr(arch, k)]
  if wrong:
    raise InputError(f'{what}: not an open_clip {name}: ' + ', '.join(wrong))


def _tower_keys(src: str, dst: str, layers: int) -> dict[str, tuple[str, Any]]:
  """{hf key: (open_clip key, how)} of one tower's transformer blocks."""
  out = {}
  for i in range(layers):
    s, d = f'{src}transformer.resblocks.{i}.', f'{dst}encoder.layers.{i}.'
    for leaf in ('weight', 'bias'):
      out[f'{d}layer_norm1.{leaf}'] = (f'{s}ln_1.{leaf}', None)
      out[f'{d}layer_norm2.{leaf}'] = (f'{s}ln_2.{leaf}', None)
      out[f'{d}self_attn.out_proj.{leaf}'] = (f'{s}attn.out_proj.{leaf}', None)
      out[f'{d}mlp.fc1.{leaf}'] = (f'{s}mlp.c_fc.{leaf}', None)
      out[f'{d}mlp.fc2.{leaf}'] = (f'{s}mlp.c_proj.{leaf}', None)
      for j, name in enumerate(('q_proj', 'k_proj', 'v_proj')):
        out[f'{d}self_attn.{name}.{leaf}'] = (f'{s}attn.in_proj_{leaf}', ('third', j))
  return out


def key_map(config: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
  """{transformers key: (open_clip key, transform)} for a model of `config`; transform is None
  (copy), 'T' (transpose), 'scalar' (reshape to ()) or ('third', j) (rows j·D:(j+1)·D)."""
  out = {
      'text_model.embeddings.token_embedding.weight': ('token_embedding.weight', None),
      'text_model.embeddings.position_embedding.weight': ('positional_embedding', None),
      'text_model.final_layer_norm.weight': ('ln_final.weight', None),
      'text_model.final_layer_norm.bias': ('ln_final.bias', None),
      'text_projection.weight': ('text_projection', 'T'),
      'vision_model.embeddings.class_embedding': ('visual.class_embedding', None),
      'vision_model.embeddings.patch_embedding.weight': ('visual.conv1.weight', None),
      'vision_model.embeddings.position_embedding.weight': ('visual.positional_embedding', None),
      'vision_model.pre_layrnorm.weight': ('visual.ln_pre.weight', None),
      'vision_model.pre_layrnorm.bias': ('visual.ln_pre.bias', None),
      'vision_model.post_layernorm.weight': ('visual.ln_post.weight', None),
      'vision_model.post_layernorm.bias': ('visual.ln_post.bias', None),
      'visual_projection.weight': ('visual.proj', 'T'),
      'logit_scale': ('logit_scale', 'scalar'),
  }
  out.update(_tower_keys('', 'text_model.', config['text_config']['num_hidden_layers']))
  out.update(_tower_keys('visual.', 'vision_model.',
                         config['vision_config']['num_hidden_layers']))
  return out


def _transform(array: np.ndarray, how: Any) -> np.ndarray:
  if how == 'T':
    array = array.T
  elif how == 'scalar':
    array = array.reshape(())
  elif how is not None:
    _, j = how
    rows = array.shape[0] // 3
    array = array[j * rows:(j + 1) * rows]
  return np.asarray(array, order='C')   # (np.ascontiguousarray would make a scalar 1-d)


# open_clip buffers some checkpoints still hold (the causal mask is rebuilt from the length).
_IGNORED_OPEN_CLIP_KEYS = ('attn_mask',)


class _ArrayReader:
  """`place.check_checkpoint`'s view of a dict of arrays."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self._arrays = arrays

  def keys(self) -> list[str]:
    return sorted(self._arrays)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._arrays[key].shape)


def open_clip_to_hf(state_dict: Mapping[str, np.ndarray], heads: Heads, *,
                    arch: tuple[str, OpenClipArch] | None = None,
                    what: str = 'state dict') -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(transformers tensors, config.json dict) of an open_clip CLIP state dict.

  Every key is used exactly once and every converted shape is checked against the model the
  config describes; problems are reported together.

  Raises:
    InputError: a missing or unexpected key, a shape that does not fit, or sizes that differ
      from the named `arch`.
  """
  config = hf_config(state_dict, heads, what)
  if arch is not None:
    check_arch(config, *arch, what)
  mapping = key_map(config)
  used = {src for src, _ in mapping.values()}
  missing = sorted(used - set(state_dict))
  unexpected = sorted(k for k in set(state_dict) - used if k not in _IGNORED_OPEN_CLIP_KEYS)
  if missing or unexpected:
    parts = [f'missing {missing[:10]}' if missing else '',
             f'unexpected {unexpected[:10]}' if unexpected else '']
    raise InputError(f'{what}: not an open_clip CLIP state dict of this layout: '
                     + '; '.join(p for p in parts if p))
  try:
    model_config = CLIPConfig.from_hf_dict(config)
  except ValueError as e:
    raise InputError(f'{what}: {e}') from None
  tensors = {}
  for dst, (src, how) in mapping.items():
    array = state_dict[src]
    if isinstance(how, tuple) and array.shape[0] % 3:
      raise InputError(f'{what}: {src} has {array.shape[0]} rows, not 3 equal q/k/v parts')
    tensors[dst] = _transform(array, how)
  abstract = nnx.eval_shape(lambda: CLIPModel(model_config, rngs=nnx.Rngs(0)))
  try:
    check_checkpoint(_ArrayReader(tensors), nnx.state(abstract), what='CLIP of the converted '
                     'config')
  except WeightMismatchError as e:
    raise InputError(f'{what}: {one_line(str(e))}') from None
  return tensors, config


# --------------------------------------------------------------------------- aesthetic head


def aesthetic_head_layer_dims(state_dict: Mapping[str, np.ndarray],
                              what: str = 'state dict') -> tuple[int, ...]:
  """The widths of a LAION aesthetic head state dict (keys `layers.{0,2,4,6,7}.*`).

  Raises:
    InputError: other keys, or Linear shapes that do not chain.
  """
  expected = head_lib.sequential_keys()
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  if missing or unexpected:
    raise InputError(f'{what}: not a LAION aesthetic head (nn.Sequential of Linear/Dropout '
                     f'layers {list(head_lib.SEQUENTIAL_INDEX)}): missing {missing}, '
                     f'unexpected {unexpected[:10]}')
  dims = [None]
  for i in head_lib.SEQUENTIAL_INDEX:
    weight, bias = state_dict[f'layers.{i}.weight'], state_dict[f'layers.{i}.bias']
    if weight.ndim != 2 or bias.shape != weight.shape[:1] or dims[-1] not in (None,
                                                                              weight.shape[1]):
      raise InputError(f'{what}: layers.{i} has weight {list(weight.shape)} and bias '
                       f'{list(bias.shape)}, which do not follow width {dims[-1]}')
    dims[-1] = weight.shape[1] if dims[-1] is None else dims[-1]
    dims.append(weight.shape[0])
  return tuple(int(d) for d in dims)


# --------------------------------------------------------------------------- writing


def write_folder(out: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                 config: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None,
                 overwrite: bool = False) -> str:
  """Writes config.json + model.safetensors to `out` via a temporary sibling and a rename.

  Raises:
    InputError: `out` exists (without `overwrite`) or cannot be written.
  """
  out = os.path.abspath(os.fspath(out))
  if os.path.exists(out) and not overwrite:
    raise InputError(f'{out}: already exists (pass --overwrite to replace it)')
  parent = os.path.dirname(out)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  except OSError as e:
    raise InputError(f'{out}: cannot write there ({e})') from None
  try:
    save_file({k: np.asarray(v, order='C') for k, v in tensors.items()},
              os.path.join(staging, WEIGHTS_NAME),
              metadata={'format': 'pt', **(metadata or {})})
    with open(os.path.join(staging, CONFIG_NAME), 'w') as f:
      json.dump(config, f, indent=2)
    if os.path.exists(out):
      shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out


def convert_open_clip(src: str | os.PathLike, out: str | os.PathLike, *,
                      arch: str | None = None, vision_heads: int | None = None,
                      text_heads: int | None = None, hidden_act: str | None = None,
                      overwrite: bool = False) -> dict[str, Any]:
  """open_clip state dict file → transformers `CLIPModel` folder; returns its config."""
  heads, spec = resolve_arch(arch, vision_heads, text_heads, hidden_act)
  src = os.fspath(src)
  tensors, config = open_clip_to_hf(read_state_dict(src), heads,
                                    arch=(arch, spec) if spec else None, what=src)
  write_folder(out, tensors, config, overwrite=overwrite,
               metadata={'converted_from': os.path.basename(src),
                         'open_clip_arch': arch or 'explicit'})
  return config


def convert_aesthetic_head(src: str | os.PathLike, out: str | os.PathLike, *,
                           overwrite: bool = False) -> dict[str, Any]:
  """LAION aesthetic head .pth → head folder; returns its config."""
  src = os.fspath(src)
  state_dict = read_state_dict(src)
  config = head_lib.config_dict(aesthetic_head_layer_dims(state_dict, src))
  write_folder(out, state_dict, config, overwrite=overwrite,
               metadata={'converted_from': os.path.basename(src)})
  return config


# --------------------------------------------------------------------------- command line


def _flag_values() -> flags.FlagValues:
  """The command's flags, in their own FlagValues (importing this module defines no global
  absl flag, so it can share a process with the other commands)."""
  fv = flags.FlagValues()
  flags.DEFINE_string('open_clip', None, 'open_clip CLIP state dict (.pt/.pth/.bin/.safetensors).',
                      flag_values=fv)
  flags.DEFINE_string('aesthetic_head', None, 'LAION aesthetic head state dict (.pth).',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'Folder to create.', flag_values=fv)
  flags.DEFINE_string('arch', None, 'open_clip arch name, e.g. ViT-H-14 or ViT-L-14-quickgelu.',
                      flag_values=fv)
  flags.DEFINE_integer('vision_heads', None, 'Vision attention heads (instead of --arch).',
                       flag_values=fv)
  flags.DEFINE_integer('text_heads', None, 'Text attention heads (instead of --arch).',
                       flag_values=fv)
  flags.DEFINE_enum('hidden_act', None, list(ACTIVATIONS), 'Activation (instead of --arch; '
                    'default gelu).', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.', flag_values=fv)
  flags.DEFINE_bool('traceback', False, 'Show tracebacks of user errors too.', flag_values=fv)
  return fv


def main(argv: Sequence[str]) -> None:
  """`python -m opd_jax.tools.convert_clip FLAGS`; argv[0] is the program name."""
  argv = list(argv)
  if any(a in ('--help', '-h', '--helpfull') for a in argv[1:]):
    print(__doc__)
    return
  fv = _flag_values()
  try:
    rest = fv(argv)
  except flags.Error as e:
    if show_tracebacks('--traceback' in argv):
      raise
    print(f'error: {one_line(str(e))}', file=sys.stderr, flush=True)
    sys.exit(2)
  with report_errors(fv.traceback):
    if len(rest) > 1:
      raise ConfigError(f'unexpected arguments {rest[1:]}; every input is a --flag')
    if bool(fv.open_clip) == bool(fv.aesthetic_head):
      raise ConfigError('--open_clip / --aesthetic_head: give exactly one')
    if not fv.out:
      raise ConfigError('--out: missing (the folder to create)')
    if fv.open_clip:
      config = convert_open_clip(fv.open_clip, fv.out, arch=fv.arch,
                                 vision_heads=fv.vision_heads, text_heads=fv.text_heads,
                                 hidden_act=fv.hidden_act, overwrite=fv.overwrite)
      t, v = config['text_config'], config['vision_config']
      summary = (f'CLIP: vision {v["hidden_size"]}×{v["num_hidden_layers"]} patch '
                 f'{v["patch_size"]} image {v["image_size"]}, text {t["hidden_size"]}×'
                 f'{t["num_hidden_layers"]}, projection {config["projection_dim"]}, '
                 f'{t["hidden_act"]}')
    else:
      for name in ('arch', 'vision_heads', 'text_heads', 'hidden_act'):
        if fv[name].present:
          raise ConfigError(f'--{name}: only for --open_clip')
      config = convert_aesthetic_head(fv.aesthetic_head, fv.out, overwrite=fv.overwrite)
      summary = f'aesthetic head: layer widths {config["layer_dims"]}'
  print(f'wrote {os.path.abspath(fv.out)} ({summary})', flush=True)


if __name__ == '__main__':
  main(sys.argv)
