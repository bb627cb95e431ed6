"""Shared input handling for attention kernels.

Everything here runs at trace time on static shapes: it canonicalises the
arguments of :func:`attn.dot_product_attention` into one
:class:`AttentionInputs` record and raises ``ValueError`` naming the offending
shapes before any XLA computation is built.

Layout is ``[batch, length, heads, head_dim]`` (BTNH) throughout:
``query[B, T, N, H]``, ``key[B, S, K, H]``, ``value[B, S, K, Dv]`` with ``N`` a
multiple of ``K`` (grouped-query attention).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

@dataclasses.dataclass(frozen=True)
class AttentionInputs:
  """Canonical, validated arguments shared by every exact implementation.

  Attributes:
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]``.
    value: ``[B, S, K, Dv]``.
    bias: ``None`` or 4-D, broadcastable to ``[B, N, T, S]``.
    mask: ``None`` or boolean 4-D, broadcastable to ``[B, N, T, S]``
      (True = may attend).
    scale: multiplier applied to ``q·k``.
    is_causal: query ``t`` may attend key ``s`` only when ``s <= t``.
    q_lengths / kv_lengths: ``None`` or int32 ``[B]`` valid lengths.
    window: ``None`` or ``(left, right)``: query ``t`` attends keys
      ``t - left <= s <= t + right``.
    q_segment_ids / kv_segment_ids: ``None`` or int ``[B, T]`` / ``[B, S]``.
    squeeze_batch: the caller passed 3-D ``[T, N, H]`` arrays.
  """
  query: Array
  key: Array
  value: Array
  bias: Optional[Array]
  mask: Optional[Array]
  scale: float
  is_causal: bool
  q_lengths: Optional[Array]
  kv_lengths: Optional[Array]
  window: Optional[Tuple[int, int]]
  q_segment_ids: Optional[Array]
  kv_segment_ids: Optional[Array]
  squeeze_batch: bool = False

  @property
  def shape(self):
    """``(B, T, S, N, K, H, Dv)``."""
    B, T, N, H = self.query.shape
    S, K = self.key.shape[1], self.key.shape[2]
    return B, T, S, N, K, H, self.value.shape[-1]

  @property
  def has_structure_mask(self) -> bool:
    """True when causal/window/length/segment masking is requested."""
    return (self.is_causal or self.window is not None
            or self.q_lengths is not None or self.kv_lengths is not None
            or self.q_segment_ids is not None)


def check_broadcast_4d(name: str, x: Array, full: Tuple[int, ...]) -> Array:
  """Left-pads ``x`` to rank 4 and checks it broadcasts to ``full``."""
  if x.ndim > 4:
    raise ValueError(
        f"{name} must have rank <= 4 (broadcastable to [B, N, T, S]={full}),"
        f" got shape {x.shape}")
  x = jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape)
  for axis, (have, want) in enumerate(zip(x.shape, full)):
    if have not in (1, want):
      raise ValueError(
          f"{name} of shape {x.shape} is not broadcastable to [B, N, T, S]="
          f"{full} (axis {axis}: {have} vs {want})")
  return x


def normalize_window(local_window_size) -> Optional[Tuple[int, int]]:
  """``int w`` -> ``(w, w)``; ``(left, right)`` stays; validates signs."""
  if local_window_size is None:
    return None
  sizes = (local_window_size,) * 2 if np.ndim(local_window_size) == 0 else (
      tuple(local_window_size))
  if len(sizes) != 2 or not all(
      isinstance(w, (int, np.integer)) and not isinstance(w, bool)
      for w in sizes):
    raise ValueError(
        "local_window_size must be an int or a (left, right) pair of ints, "
        f"got {local_window_size!r}")
  window = (int(sizes[0]), int(sizes[1]))
  if window[0] < 0 or window[1] < 0:
    raise ValueError(f"local_window_size must be non-negative, got {window}")
  return window


def canonicalize(query, key, value, bias=None, mask=None, *, scale=None,
                 is_causal=False, query_seq_lengths=None,
                 key_value_seq_lengths=None, local_window_size=None,
                 segment_ids=None) -> AttentionInputs:
  """Validates and canonicalises attention arguments (trace time).

  Takes the arguments of :func:`attn.dot_product_attention` (see there for
  their meaning). Rank-3 ``[T, N, H]`` inputs get a batch axis of 1; ``bias``
  and ``mask`` of rank < 4 get leading axes of size 1 (``[S]``, ``[T, S]``,
  ``[N, T, S]`` ...), as in ``jax.nn.dot_product_attention``.

  Returns:
    An :class:`AttentionInputs` with 4-D arrays and defaults filled in.

  Raises:
    ValueError: naming the offending shapes/dtypes, for mismatched ranks,
      batch sizes, lengths, head counts (``N % K != 0``) or head dims,
      differing or non-floating dtypes, non-boolean masks, bias/mask not
      broadcastable to ``[B, N, T, S]``, bad sequence lengths, segment ids or
      window sizes.
  """
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  ranks = (query.ndim, key.ndim, value.ndim)
  if len(set(ranks)) != 1 or ranks[0] not in (3, 4):
    raise ValueError(
        "query, key and value must all be rank 4 [batch, length, heads, "
        "head_dim] (or all rank 3 without batch); got shapes "
        f"query={query.shape}, key={key.shape}, value={value.shape}")
  squeeze = ranks[0] == 3
  if squeeze:
    query, key, value = query[None], key[None], value[None]
  B, T, N, H = query.shape
  Bk, S, K, Hk = key.shape
  Bv, Sv, Kv, Dv = value.shape
  if Bk != B or Bv != B:
    raise ValueError(f"batch sizes differ: query={query.shape}, "
                     f"key={key.shape}, value={value.shape}")
  if Sv != S:
    raise ValueError(f"key and value lengths differ: key={key.shape}, "
                     f"value={value.shape}")
  if Kv != K:
    raise ValueError(f"key and value head counts differ: key={key.shape}, "
                     f"value={value.shape}")
  if Hk != H:
    raise ValueError(f"query and key head_dim differ: query={query.shape}, "
                     f"key={key.shape}")
  if K == 0 or N % K:
    raise ValueError(
        f"query heads ({N}) must be a multiple of key/value heads ({K}); "
        f"query={query.shape}, key={key.shape}")
  if not (query.dtype == key.dtype == value.dtype):
    raise ValueError(f"query, key and value dtypes differ: {query.dtype}, "
                     f"{key.dtype}, {value.dtype}")
  if not jnp.issubdtype(query.dtype, jnp.floating):
    raise ValueError(f"attention inputs must be floating point, got "
                     f"{query.dtype}")
  full = (B, N, T, S)
  if bias is not None:
    bias = check_broadcast_4d("bias", jnp.asarray(bias), full)
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = may attend), got "
                       f"dtype {mask.dtype}")
    mask = check_broadcast_4d("mask", mask, full)

  def lengths(name, x):
    if x is None:
      return None
    x = jnp.asarray(x)
    if x.shape != (B,) or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array of shape [B]=({B},),"
                       f" got {x.dtype}{list(x.shape)}")
    return x.astype(jnp.int32)

  q_lengths = lengths("query_seq_lengths", query_seq_lengths)
  kv_lengths = lengths("key_value_seq_lengths", key_value_seq_lengths)

  q_seg = kv_seg = None
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      q_seg, kv_seg = (jnp.asarray(s) for s in segment_ids)
    else:
      q_seg = kv_seg = jnp.asarray(segment_ids)
    if squeeze:
      q_seg = q_seg[None] if q_seg.ndim == 1 else q_seg
      kv_seg = kv_seg[None] if kv_seg.ndim == 1 else kv_seg
    if q_seg.shape != (B, T) or kv_seg.shape != (B, S):
      raise ValueError(
          f"segment_ids must be [B, T]=({B}, {T}) (self-attention) or a pair "
          f"([B, T], [B, S]=({B}, {S})); got {q_seg.shape} and {kv_seg.shape}")
    if not (jnp.issubdtype(q_seg.dtype, jnp.integer)
            and jnp.issubdtype(kv_seg.dtype, jnp.integer)):
      raise ValueError(f"segment_ids must be integers, got {q_seg.dtype} and "
                       f"{kv_seg.dtype}")
  if scale is None:
    scale = 1.0 / float(np.sqrt(H))
  return AttentionInputs(
      query=query, key=key, value=value, bias=bias, mask=mask,
      scale=float(scale) if not isinstance(scale, jax.Array) else scale,
      is_causal=bool(is_causal), q_lengths=q_lengths, kv_lengths=kv_lengths,
      window=normalize_window(local_window_size), q_segment_ids=q_seg,
      kv_segment_ids=kv_seg, squeeze_batch=squeeze)


def check_dropout(dropout_rate: float, dropout_rng: Any) -> None:
  """Raises ``ValueError`` unless ``0 <= rate < 1`` and a key is given."""
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError("dropout_rate > 0 needs a dropout_rng (a PRNG key)")
