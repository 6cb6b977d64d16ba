"""Scaled dot-product attention by name (`config.model.attention`).

Every implementation takes q, k, v [B, T, N, H] and an optional additive bias broadcastable to
[B, N, T, S], computes the logits and the softmax in float32, and returns [B, T, N, H]:

  ''        `jax.nn.dot_product_attention`, implementation chosen by JAX
  'xla'     `jax.nn.dot_product_attention(implementation='xla')`
  'cudnn'   `jax.nn.dot_product_attention(implementation='cudnn')` (GPU: cuDNN flash attention)
  'einsum'  heads moved in front of the tokens ([B, N, T, H]) before the two batched matmuls
            — on XLA:CPU faster than the token-major form (benchmarks/results/attention_cpu.md)
  'splash'  the Pallas splash-attention kernel for TPU (`splash_attention`): logits never leave
            VMEM; elsewhere it runs in Pallas' interpreter (slow: for tests only)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from opd_jax.parallel.sharding import active_batch_sharding

IMPLEMENTATIONS = ('', 'xla', 'cudnn', 'einsum', 'splash')
SPLASH_BLOCK = 128   # the kernel's tile along both sequences; lengths are padded to a multiple


def heads_major(q: jax.Array, k: jax.Array, v: jax.Array,
                bias: jax.Array | None = None) -> jax.Array:
  """softmax(q·kᵀ/√H + bias)·v with [B, N, T, H] operands; logits and softmax in float32."""
  qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  logits = jnp.einsum('bnth,bnsh->bnts', qh, kh, preferred_element_type=jnp.float32)
  logits = logits * np.float32(1.0 / np.sqrt(q.shape[-1]))
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bnts,bnsh->bnth', probs, vh).transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, q_len: int, kv_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.MultiHeadMask([sm.FullMask((q_len, kv_len))] * num_heads)
  return sk.make_splash_mha(mask, block_sizes=sk.BlockSizes.get_default(), head_shards=1,
                            q_seq_shards=1, interpret=interpret)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     bias: jax.Array | None = None) -> jax.Array:
  """Attention with the Pallas splash kernel (TPU; Pallas' interpreter on other platforms).

  Both sequences are zero-padded to a multiple of SPLASH_BLOCK; padded keys, and keys whose
  `bias` is negative (a key-padding mask [B, 1, 1, S] of 0 / −large, the only bias the models
  pass), get segment id 1 and every query segment id 0, so no query attends to them. Padded
  query rows are dropped. The kernel takes no scale: q is scaled by 1/√H first (float32).
  A Pallas kernel is opaque to XLA's partitioner, so under an active batch sharding
  (`parallel.sharding.batch_sharded_activations`) it runs in a `shard_map` over the batch axes
  (and the 'tensor' axis over heads when it divides them): every device attends its own samples.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  if bias is not None and (bias.ndim != 4 or bias.shape[1] != 1 or bias.shape[2] != 1):
    raise ValueError(f'splash attention takes a key-padding bias [B, 1, 1, S]; got {bias.shape}')
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  sharding = active_batch_sharding()
  devices = sharding.mesh.devices.flat if sharding is not None else jax.devices()
  interpret = next(iter(devices)).platform != 'tpu'
  scale = np.float32(1.0 / np.sqrt(head_dim))
  qh = (q.astype(jnp.float32) * scale).astype(q.dtype)
  qh, kh, vh = (_pad_to(x.transpose(0, 2, 1, 3), 2, SPLASH_BLOCK) for x in (qh, k, v))
  masked = jnp.zeros((batch, kv_len), bool) if bias is None else bias[:, 0, 0, :] < 0
  kv_ids = _pad_to(masked.astype(jnp.int32), 1, SPLASH_BLOCK)
  kv_ids = kv_ids.at[:, kv_len:].set(1)
  q_ids = jnp.zeros((batch, qh.shape[2]), jnp.int32)

  def attend(qh, kh, vh, q_ids, kv_ids):
    kernel = _splash_kernel(qh.shape[1], qh.shape[2], kh.shape[2], interpret)
    one = lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=sk.SegmentIds(qi, ki))
    return jax.vmap(one)(qh, kh, vh, q_ids, kv_ids)

  if sharding is not None:
    mesh = sharding.mesh
    batch_axes = sharding.spec[0]
    tensor = 'tensor' if mesh.shape.get('tensor', 1) > 1 and heads % mesh.shape['tensor'] == 0 \
        else None
    act, ids = P(batch_axes, tensor, None, None), P(batch_axes, None)
    attend = jax.shard_map(attend, mesh=mesh, in_specs=(act, act, act, ids, ids),
                           out_specs=act, check_vma=False)
  out = attend(qh, kh, vh, q_ids, kv_ids)
  return out[:, :, :q_len].transpose(0, 2, 1, 3)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          bias: jax.Array | None = None, implementation: str = '') -> jax.Array:
  if implementation == 'einsum':
    return heads_major(q, k, v, bias)
  if implementation == 'splash':
    return splash_attention(q, k, v, bias)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'config.model.attention: {implementation!r} is not one of '
                     f'{list(IMPLEMENTATIONS)}')
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation or None)
