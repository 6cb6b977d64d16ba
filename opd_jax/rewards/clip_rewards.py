"""The real model-based rewards: PickScore, CLIPScore, HPSv2.1, the LAION aesthetic, their mix.

Each reward is CLIP towers (+ the aesthetic head) on a 224² crop of the image made as its
upstream scorer makes it (`rewards.preprocess`), and the prompt tokenised on host. Formulas, as
DiffusionNFT's scorers compute them (NVlabs/DiffusionNFT `flow_grpo/*_scorer.py`, what its
`scripts/evaluation.py` reports; spec §2), with u = image embedding, t = text embedding, both
projected, ĉ = cos(u, t) = u·t / (‖u‖‖t‖):

  pickscore         exp(logit_scale)·ĉ          (PickScore_v1, ViT-H/14; the tables' raw value ≈ 22)
  pickscore_scaled  exp(logit_scale)·ĉ / 26     (what upstream's PickScore scorer returns: the
                                                 training reward, "normalised to about 0–1")
  clipscore         exp(logit_scale)·ĉ / 100    (openai CLIP-L/14: the diagonal of
                                                 `logits_per_image` / 100; its logit_scale is
                                                 ln 100, so this is ĉ)
  hpsv2             ĉ                           (open_clip ViT-H-14 + HPS_v2.1 weights: the
                                                 normalised `image_features @ text_features.T`
                                                 diagonal, no logit scale)
  aesthetic         MLP(u / ‖u‖)                (LAION improved-aesthetic-predictor on CLIP-L/14)
  aesthetics_mix    pickscore_scaled + clipscore + hpsv2
                    Upstream's `multi_score` returns Σ weight·score with the aesthetics/"multi
                    reward" weights {pickscore: 1, hpsv2: 1, clipscore: 1} (DiffusionNFT
                    `config/nft.py: sd3_multi_reward`; flow_grpo `rewards.multi_score` sums the
                    same way): a sum, with PickScore already /26. The paper calls it the mean;
                    the factor 3 cancels in the per-group normalised advantage.

Text: transformers' CLIP tokenizer, `padding='max_length'`, truncation to 77 tokens (CLIPScore's
upstream padding; PickScore pads to the longest prompt of the batch and HPSv2's open_clip
tokenizer pads with 0 — with the causal text tower and EOS pooling, tokens after the EOS never
change the pooled state, so all three give the same embeddings, and fixed 77 keeps shapes
static). open_clip's `SimpleTokenizer` is the same BPE as openai CLIP's (lower-case, whitespace
squeezed, sot + ≤ 75 tokens + eot); transformers' tokenizer differs only in the text cleaning of
exotic unicode (ftfy).

Where the tokenizer comes from: `folders['tokenizer']` when given; otherwise the model's own
folder, then `folders['clip']` (openai CLIP-L/14, which ships the BPE) when the model folder has
none — the HPSv2.1 folder written by `opd_jax.tools.convert_clip` has no tokenizer, and
yuvalkirstain/PickScore_v1 is paired upstream with laion/CLIP-ViT-H-14's processor, whose
tokenizer is that same BPE. A folder "has a tokenizer" when it holds `tokenizer.json` or
`vocab.json` + `merges.txt` (transformers would otherwise build an empty one silently).

Execution: images uint8 [B, H, W, 3] or float [B, H, W, 3] in [0, 1] (uint8 is divided by 255,
as upstream's reward wrappers do). The network part — the JAX preprocessing (`preprocess='jax'`,
the default, bit-exact or 1e-6 from upstream's; `'host'`: numpy/PIL on host instead), both
towers and the score — is one jitted function on batches padded to `batch_size` (static
shapes; the tail batch repeats its last row, and the extra scores are dropped). With a `mesh`
(`opd_jax.parallel.mesh.make_mesh`, over this process's devices: the host images are placed with
`jax.device_put`), weights are replicated on every device and each batch is split over the
mesh's batch axes (data × fsdp). Matmuls run in `dtype` (bfloat16 for speed);
parameters, LayerNorms, softmax, the normalisation and the score stay float32, and so does the
aesthetic head (5 small layers).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.errors import ConfigError, InputError
from opd_jax.models.aesthetic_head import AestheticHead
from opd_jax.models.clip import LEGACY_EOS_TOKEN_ID, CLIPModel, l2_normalize
from opd_jax.models.loading.clip_weights import load_aesthetic_head, load_clip
from opd_jax.parallel.mesh import batch_axis_size
from opd_jax.parallel.sharding import batch_sharding, replicated
from opd_jax.rewards.preprocess import PREPROCESS, SIZE

PICKSCORE_DIVISOR = 26.0     # upstream PickScoreScorer: scores / 26
CLIPSCORE_DIVISOR = 100.0    # upstream ClipScorer: logits_per_image.diagonal() / 100
# The aesthetics task's reward: upstream multi_score's weighted sum.
MIX_WEIGHTS = (('pickscore_scaled', 1.0), ('clipscore', 1.0), ('hpsv2', 1.0))

# The network of each reward: its score head, which `rewards.preprocess` entry makes its crop,
# and which folder holds its CLIP.
KINDS = ('pickscore', 'clipscore', 'hpsv2', 'aesthetic')
_NETWORK = {'pickscore': 'pickscore', 'pickscore_scaled': 'pickscore', 'clipscore': 'clipscore',
            'hpsv2': 'hpsv2', 'aesthetic': 'aesthetic'}
_DIVISOR = {'pickscore_scaled': PICKSCORE_DIVISOR}
_CLIP_FOLDER = {'pickscore': 'pickscore', 'clipscore': 'clip', 'hpsv2': 'hpsv2',
                'aesthetic': 'clip'}

# The `folders` keys each reward reads ('tokenizer' is optional for all but aesthetic).
FOLDERS = {'pickscore': ('pickscore',), 'pickscore_scaled': ('pickscore',),
           'clipscore': ('clip',), 'hpsv2': ('hpsv2',), 'aesthetic': ('clip', 'aesthetic_head'),
           'aesthetics_mix': ('pickscore', 'clip', 'hpsv2')}
REWARDS = tuple(FOLDERS)
TOKENIZER_KEY = 'tokenizer'
PREPROCESS_MODES = ('jax', 'host')

RewardFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]


# ------------------------------------------------------------------------------ the networks


def cosine(u: jax.Array, t: jax.Array) -> jax.Array:
  """Row-wise cos(u_i, t_i) [B] in float32 (the diagonal of normalised u @ tᵀ)."""
  return jnp.sum(l2_normalize(u) * l2_normalize(t), axis=-1)


class RewardNet(nnx.Module):
  """One reward model: CLIP towers (and the aesthetic head) → one score per (image, prompt)."""

  def __init__(self, kind: str, clip: CLIPModel, head: AestheticHead | None = None):
    if kind not in KINDS:
      raise ValueError(f'kind {kind!r} is not one of {list(KINDS)}')
    if (kind == 'aesthetic') != (head is not None):
      raise ValueError('the aesthetic head belongs to the aesthetic reward only')
    self.kind, self.clip, self.head = kind, clip, head

  def __call__(self, pixels: jax.Array, input_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """Scores [B] float32 of normalised pixels [B, 224, 224, 3] and token ids/mask [B, T]."""
    image = self.clip.get_image_features(pixels)
    if self.kind == 'aesthetic':
      return self.head.score(image)
    cos = cosine(image, self.clip.get_text_features(input_ids, attention_mask))
    if self.kind == 'hpsv2':
      return cos
    scale = jnp.exp(self.clip.logit_scale[...].astype(jnp.float32))
    return scale * cos / (CLIPSCORE_DIVISOR if self.kind == 'clipscore' else 1.0)


def unit_images(images: jax.Array) -> jax.Array:
  """uint8 → float32 u/255 (upstream's `tensor(uint8) / 255.0`); float → float32 unchanged."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / jnp.float32(255)
  return images.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('preprocess',))
def _scores(graphdef, state, images, input_ids, attention_mask, preprocess):
  """The jitted network: (preprocessing named `preprocess`, or none) → towers → scores."""
  net = nnx.merge(graphdef, state)
  pixels = images if preprocess is None else PREPROCESS[preprocess].jax(unit_images(images))
  return net(pixels, input_ids, attention_mask)


# -------------------------------------------------------------------------------- tokenizers


def has_tokenizer(folder: str) -> bool:
  """Whether `folder` holds transformers CLIP tokenizer files."""
  exists = lambda name: os.path.isfile(os.path.join(folder, name))
  return exists('tokenizer.json') or (exists('vocab.json') and exists('merges.txt'))


_TOKENIZER_FILES = 'no CLIP tokenizer files (tokenizer.json, or vocab.json + merges.txt)'


def tokenizer_folder(folders: Mapping[str, str], own: str) -> str:
  """The folder whose tokenizer a reward uses (module docstring): folders['tokenizer'], else the
  model folder `folders[own]`, else folders['clip']."""
  if folders.get(TOKENIZER_KEY):
    folder = os.fspath(folders[TOKENIZER_KEY])
    if not has_tokenizer(folder):
      raise InputError(f'{folder}: {_TOKENIZER_FILES} (folders[{TOKENIZER_KEY!r}])')
    return folder
  candidates = [os.fspath(folders[own])]
  if own != 'clip' and folders.get('clip'):
    candidates.append(os.fspath(folders['clip']))
  for folder in candidates:
    if has_tokenizer(folder):
      return folder
  raise InputError(f'{candidates[0]}: {_TOKENIZER_FILES}; copy those of openai/clip-vit-large-'
                   f'patch14 (the same BPE) there, or pass folders[{TOKENIZER_KEY!r}]')


def load_tokenizer(folder: str, text_config) -> Any:
  """transformers' CLIP tokenizer of `folder`, checked against the text tower it feeds: every id
  must exist in the tower's vocabulary and its end-of-text token must be the pooled one."""
  import transformers   # only here: the JAX model code never needs transformers
  try:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
  except (OSError, ValueError, KeyError) as e:
    raise InputError(f'{folder}: unreadable CLIP tokenizer ({e})') from None
  size, eos = len(tokenizer), tokenizer.eos_token_id
  if size > text_config.vocab_size:
    raise InputError(f'{folder}: the tokenizer has {size} tokens but the text tower a vocabulary '
                     f'of {text_config.vocab_size}: not this model\'s tokenizer')
  pooled = (size - 1 if text_config.eos_token_id == LEGACY_EOS_TOKEN_ID
            else text_config.eos_token_id)
  if eos is None or eos != pooled:
    raise InputError(f'{folder}: the tokenizer\'s end-of-text id {eos} is not the token the text '
                     f'tower pools ({pooled}): not this model\'s tokenizer')
  return tokenizer


def tokenize(tokenizer, prompts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids, attention_mask), int32 [B, length]: padded to `length`, truncated to it."""
  enc = tokenizer(list(prompts), padding='max_length', truncation=True, max_length=length,
                  return_tensors='np')
  return enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(np.int32)


# ----------------------------------------------------------------------------------- inputs


def check_inputs(images: Any, prompts: Sequence[str | bytes], what: str
                 ) -> tuple[np.ndarray, list[str]]:
  """(images as uint8 or float32 numpy [B, H, W, 3], prompts as B str)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or not (
      images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
    raise InputError(f'{what} images: expected uint8 or float [B, H, W, 3], got '
                     f'{images.dtype} {images.shape}')
  prompts = [p.decode() if isinstance(p, bytes) else p for p in prompts]
  if len(prompts) != images.shape[0]:
    raise InputError(f'{what}: {images.shape[0]} images but {len(prompts)} prompts')
  if images.dtype != np.uint8:
    images = images.astype(np.float32)
  return images, prompts


def _pad_rows(x: np.ndarray | None, size: int) -> np.ndarray | None:
  """x with its last row repeated up to `size` rows."""
  if x is None or len(x) == size:
    return x
  return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


# ---------------------------------------------------------------------------------- rewards


class Reward:
  """A loaded reward: `reward(images, prompts) -> np.float32 [B]` (module docstring)."""

  def __init__(self, name: str, net: RewardNet, tokenizer, *, batch_size: int,
               preprocess: str, mesh=None):
    self.name, self.kind = name, _NETWORK[name]
    self.batch_size, self.preprocess = batch_size, preprocess
    self.divisor = _DIVISOR.get(name, 1.0)
    self._graphdef, self._state = nnx.split(net)
    self._tokenizer = tokenizer
    text = net.clip.config.text
    self._length = text.max_position_embeddings if text else None
    self._mesh = mesh

  def _sharding(self, ndim: int):
    return None if self._mesh is None else batch_sharding(self._mesh, ndim)

  def _put(self, x: np.ndarray | None):
    if x is None:
      return None
    sharding = self._sharding(x.ndim)
    return jax.device_put(x) if sharding is None else jax.device_put(x, sharding)

  def _tokens(self, prompts: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    if self._tokenizer is None:
      return None, None
    return tokenize(self._tokenizer, prompts, self._length)

  def _run(self, images: np.ndarray, prompts: list[str], mode: str | None) -> np.ndarray:
    """Scores of `images` by batches: mode 'jax' / 'host' preprocess them, None means they are
    already normalised 224² pixels."""
    n = len(prompts)
    if n == 0:
      return np.zeros((0,), np.float32)
    ids, mask = self._tokens(prompts)
    pending = []
    for start in range(0, n, self.batch_size):
      stop = min(start + self.batch_size, n)
      chunk = images[start:stop]
      if mode == 'host':
        unit = chunk.astype(np.float32) / np.float32(255) if chunk.dtype == np.uint8 else chunk
        chunk = PREPROCESS[self.kind].host(unit)
      args = [self._put(_pad_rows(a, self.batch_size)) for a in
              (chunk, None if ids is None else ids[start:stop],
               None if mask is None else mask[start:stop])]
      out = _scores(self._graphdef, self._state, *args,
                    preprocess=self.kind if mode == 'jax' else None)
      pending.append((out, stop - start))
    scores = np.concatenate([np.asarray(out, np.float32)[:rows] for out, rows in pending])
    return (scores / np.float32(self.divisor)).astype(np.float32)

  def __call__(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
    images, prompts = check_inputs(images, prompts, self.name)
    return self._run(images, prompts, self.preprocess)

  def score_pixels(self, pixels: Any, prompts: Sequence[str]) -> np.ndarray:
    """Scores [B] of already preprocessed pixels (normalised float [B, 224, 224, 3]): the
    network alone (e.g. for `preprocess.score_gap`)."""
    pixels, prompts = check_inputs(pixels, prompts, self.name)
    return self._run(pixels.astype(np.float32), prompts, None)

  def precompile(self, height: int, width: int, dtype: Any = np.uint8) -> None:
    """Compiles the network for [batch_size, height, width, 3] images of `dtype` without running
    it (a later call of that shape starts at once)."""
    def spec(shape, dt):
      return jax.ShapeDtypeStruct(shape, dt, sharding=self._sharding(len(shape)))
    tokens = (None, None)
    if self._tokenizer is not None:
      tokens = (spec((self.batch_size, self._length), np.int32),) * 2
    host = self.preprocess == 'host'
    images = spec((self.batch_size, SIZE, SIZE, 3) if host else (self.batch_size, height, width, 3),
                  np.float32 if host else dtype)
    _scores.lower(self._graphdef, self._state, images, *tokens,
                  preprocess=None if host else self.kind).compile()


class WeightedSum:
  """Σ weight·reward(images, prompts) over named rewards (upstream `multi_score`)."""

  def __init__(self, name: str, parts: Sequence[tuple[Reward, float]]):
    self.name, self.parts = name, tuple(parts)

  def __call__(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
    images, prompts = check_inputs(images, prompts, self.name)
    total = np.zeros((len(prompts),), np.float32)
    for reward, weight in self.parts:
      total += np.float32(weight) * reward(images, prompts)
    return total

  def precompile(self, height: int, width: int, dtype: Any = np.uint8) -> None:
    for reward, _ in self.parts:
      reward.precompile(height, width, dtype)


def _folder(folders: Mapping[str, str], key: str, name: str) -> str:
  folder = folders.get(key)
  if not folder:
    raise ConfigError(f'folders[{key!r}]: the {name} reward needs it (an HF-format folder)')
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise InputError(f'{folder}: no such directory (folders[{key!r}] of the {name} reward)')
  return folder


def _load_one(name: str, folders: Mapping[str, str], *, batch_size: int, dtype: Any,
              preprocess: str, mesh) -> Reward:
  kind = _NETWORK[name]
  own = _CLIP_FOLDER[kind]
  for key in FOLDERS[name]:
    _folder(folders, key, name)
  shardings = replicated(mesh) if mesh is not None else None
  folder = os.fspath(folders[own])
  if kind == 'aesthetic':
    clip = load_clip(folder, part='vision', dtype=dtype, shardings=shardings)
    head = load_aesthetic_head(folders['aesthetic_head'], shardings=shardings)
    if head.layer_dims[0] != clip.config.projection_dim:
      raise InputError(f'{os.fspath(folders["aesthetic_head"])}: the head takes '
                       f'{head.layer_dims[0]}-wide embeddings but {folder} projects to '
                       f'{clip.config.projection_dim}')
    return Reward(name, RewardNet(kind, clip, head), None, batch_size=batch_size,
                  preprocess=preprocess, mesh=mesh)
  tokenizer_dir = tokenizer_folder(folders, own)
  clip = load_clip(folder, dtype=dtype, shardings=shardings)
  if clip.config.parts != ('text', 'vision'):
    raise InputError(f'{folder}: the {name} reward needs a two-tower CLIPModel, this folder has '
                     f'{list(clip.config.parts)}')
  tokenizer = load_tokenizer(tokenizer_dir, clip.config.text)
  return Reward(name, RewardNet(kind, clip), tokenizer, batch_size=batch_size,
                preprocess=preprocess, mesh=mesh)


def load_reward(name: str, folders: Mapping[str, str], *, batch_size: int = 16,
                dtype: Any = jnp.float32, preprocess: str = 'jax', mesh=None) -> RewardFn:
  """Loads reward `name` (module docstring) from its weight folders.

  Args:
    name: one of REWARDS.
    folders: 'pickscore' (transformers CLIPModel folder of PickScore_v1), 'clip' (openai
      CLIP-L/14), 'hpsv2' (HPSv2.1 converted by `opd_jax.tools.convert_clip`), 'aesthetic_head'
      (converted LAION head), as FOLDERS[name] lists; optionally 'tokenizer'.
    batch_size: images per network call (the compiled shape).
    dtype: compute dtype of the CLIP matmuls (float32, or bfloat16).
    preprocess: 'jax' (on device, default) or 'host' (numpy/PIL reference path).
    mesh: a `make_mesh` Mesh to split batches over its batch axes; None: the default device.

  Returns:
    fn(images uint8/float [B, H, W, 3], prompts: B str) -> np.float32 [B].

  Raises:
    ConfigError: an unknown name or option, a folder key `name` needs and `folders` lacks.
    InputError: a missing folder, missing or mismatched tokenizer, unreadable weights.
  """
  if name not in FOLDERS:
    raise ConfigError(f'reward {name!r}: unknown; known: {sorted(FOLDERS)}')
  if preprocess not in PREPROCESS_MODES:
    raise ConfigError(f'preprocess {preprocess!r}: expected one of {list(PREPROCESS_MODES)}')
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ConfigError(f'batch_size: expected a positive integer, got {batch_size!r}')
  if mesh is not None and batch_size % batch_axis_size(mesh):
    raise ConfigError(f'batch_size {batch_size}: not a multiple of the mesh\'s batch axes '
                      f'(data × fsdp = {batch_axis_size(mesh)})')
  options = dict(batch_size=batch_size, dtype=dtype, preprocess=preprocess, mesh=mesh)
  if name == 'aesthetics_mix':
    for key in FOLDERS[name]:
      _folder(folders, key, name)
    return WeightedSum(name, [(_load_one(part, folders, **options), weight)
                              for part, weight in MIX_WEIGHTS])
  return _load_one(name, folders, **options)
