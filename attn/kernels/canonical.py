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
    batch_shape: the caller's leading batch axes (``()`` for 3-D input);
      ``B = prod(batch_shape)``. :func:`restore_batch` undoes the flattening.
    precision: ``jax.lax.Precision`` (or ``None``) for every ``einsum`` of
      the kernel, as Flax's ``precision``.
    logits_soft_cap: ``None`` or ``c > 0``: the scaled scores ``scale·q·k``
      become ``c·tanh(scale·q·k / c)`` before bias and masks are applied.
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
  batch_shape: Optional[Tuple[int, ...]] = None
  precision: Any = None
  logits_soft_cap: Optional[float] = None

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


def _flatten_batch_4d(name: str, x: Array, batch_shape, full) -> Array:
  """``x`` broadcastable to ``[*batch, N, T, S]`` -> 4-D ``[B|1, N|1, T|1, S|1]``.

  Rank <= 3 has no batch axes (broadcast over all of them). Leading axes
  that are all 1 stay one axis of size 1 (never materialised); otherwise they
  are broadcast to ``batch_shape`` and flattened.
  """
  nb = len(batch_shape)
  if x.ndim > nb + 3:
    raise ValueError(
        f"{name} must have rank <= {nb + 3} (broadcastable to [*B, N, T, S]="
        f"{tuple(batch_shape) + full[1:]}), got shape {x.shape}")
  if x.ndim <= 3 or nb == 1:
    return check_broadcast_4d(name, x, full)
  x = jnp.reshape(x, (1,) * (nb + 3 - x.ndim) + x.shape)
  lead = x.shape[:nb]
  for axis, (have, want) in enumerate(zip(lead, batch_shape)):
    if have not in (1, want):
      raise ValueError(
          f"{name} of shape {x.shape} is not broadcastable to [*B, N, T, S]="
          f"{tuple(batch_shape) + full[1:]} (axis {axis}: {have} vs {want})")
  if all(d == 1 for d in lead):
    x = jnp.reshape(x, (1,) + x.shape[nb:])
  else:
    x = jnp.broadcast_to(x, tuple(batch_shape) + x.shape[nb:])
    x = jnp.reshape(x, (full[0],) + x.shape[nb:])
  return check_broadcast_4d(name, x, full)


def check_soft_cap(logits_soft_cap) -> Optional[float]:
  """``None`` or a positive finite number (returned as float)."""
  if logits_soft_cap is None:
    return None
  if isinstance(logits_soft_cap, bool) or not isinstance(
      logits_soft_cap, (int, float, np.integer, np.floating)):
    raise ValueError(f"logits_soft_cap must be None or a number > 0, got "
                     f"{logits_soft_cap!r}")
  cap = float(logits_soft_cap)
  if not (cap > 0 and np.isfinite(cap)):
    raise ValueError(f"logits_soft_cap must be None or a finite number > 0, "
                     f"got {logits_soft_cap!r}")
  return cap


def canonicalize(query, key, value, bias=None, mask=None, *, scale=None,
                 is_causal=False, query_seq_lengths=None,
                 key_value_seq_lengths=None, local_window_size=None,
                 segment_ids=None, precision=None,
                 logits_soft_cap=None) -> AttentionInputs:
  """Validates and canonicalises attention arguments (trace time).

  Takes the arguments of :func:`attn.dot_product_attention` (see there for
  their meaning). Inputs ``[*B, T, N, H]`` with any number of leading batch
  axes (none: ``[T, N, H]``) are flattened to one batch axis
  ``B = prod(*B)``; :func:`restore_batch` undoes it. ``bias`` and ``mask``
  broadcastable to ``[*B, N, T, S]`` (rank < 4 gets leading axes of size 1:
  ``[S]``, ``[T, S]``, ``[N, T, S]`` ..., as in
  ``jax.nn.dot_product_attention``), lengths ``[*B]``, segment ids
  ``[*B, T]`` are flattened the same way.

  Returns:
    An :class:`AttentionInputs` with 4-D arrays and defaults filled in.

  Raises:
    ValueError: naming the offending shapes/dtypes, for mismatched ranks,
      batch shapes, lengths, head counts (``N % K != 0``) or head dims,
      ``head_dim == 0`` without an explicit ``scale``, differing or
      non-floating (incl. complex) dtypes, non-boolean masks, bias/mask not
      broadcastable to ``[*B, N, T, S]``, bad sequence lengths, segment ids,
      window sizes or ``logits_soft_cap``.
  """
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  ranks = (query.ndim, key.ndim, value.ndim)
  if len(set(ranks)) != 1 or ranks[0] < 3:
    raise ValueError(
        "query, key and value must all have the same rank >= 3 "
        "[*batch, length, heads, head_dim] (rank 3: no batch axis); got "
        f"shapes query={query.shape}, key={key.shape}, value={value.shape}")
  batch_shape = tuple(query.shape[:-3])
  if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
    raise ValueError(f"batch sizes differ (batch dims must match): query={query.shape}, "
                     f"key={key.shape}, value={value.shape}")
  squeeze = ranks[0] == 3
  B = int(np.prod(batch_shape, dtype=np.int64)) if batch_shape else 1
  query = jnp.reshape(query, (B,) + query.shape[-3:])
  key = jnp.reshape(key, (B,) + key.shape[-3:])
  value = jnp.reshape(value, (B,) + value.shape[-3:])
  B, T, N, H = query.shape
  Bk, S, K, Hk = key.shape
  Bv, Sv, Kv, Dv = value.shape
  if Sv != S:
    raise ValueError(f"key and value lengths differ (lengths must match): key={key.shape}, "
                     f"value={value.shape}")
  if Kv != K:
    raise ValueError(f"key and value head counts differ: key={key.shape}, "
                     f"value={value.shape}")
  if Hk != H:
    raise ValueError(f"query and key head_dim differ (depths must match): query={query.shape}, "
                     f"key={key.shape}")
  if (K == 0 and N != 0) or (K != 0 and N % K):
    raise ValueError(
        f"query heads ({N}) must be a multiple of key/value heads ({K}); "
        f"query={query.shape}, key={key.shape}")
  if not (query.dtype == key.dtype == value.dtype):
    raise ValueError(f"query, key and value dtypes differ: {query.dtype}, "
                     f"{key.dtype}, {value.dtype}")
  if jnp.issubdtype(query.dtype, jnp.complexfloating):
    raise ValueError(f"complex attention inputs ({query.dtype}) are not "
                     "supported: softmax needs real scores")
  if not jnp.issubdtype(query.dtype, jnp.floating):
    raise ValueError(f"attention inputs must be floating point, got "
                     f"{query.dtype}")
  full = (B, N, T, S)
  if bias is not None:
    bias = _flatten_batch_4d("bias", jnp.asarray(bias), batch_shape, full)
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = may attend), got "
                       f"dtype {mask.dtype}")
    mask = _flatten_batch_4d("mask", mask, batch_shape, full)

  def lengths(name, x, length):
    if x is None:
      return None
    want = batch_shape or (1,)
    dtype = getattr(x, "dtype", None)
    if dtype is None:
      x = np.asarray(x)
      dtype = x.dtype
    if tuple(np.shape(x)) != tuple(want) or not jnp.issubdtype(dtype,
                                                               jnp.integer):
      raise ValueError(f"{name} must be an integer array of shape "
                       f"[*B]={tuple(want)}, got {dtype}{list(np.shape(x))}")
    # Lengths past the sequence mean "all of it" and negative ones "none";
    # clipping in the input's own dtype keeps that exact for int64 values
    # >= 2**31 before the int32 cast.
    if isinstance(x, np.ndarray) or np.isscalar(x):
      x = np.clip(np.asarray(x), -1, length)
    else:
      x = jnp.clip(x, -1, length)
    return jnp.reshape(jnp.asarray(x).astype(jnp.int32), (B,))

  q_lengths = lengths("query_seq_lengths", query_seq_lengths, T)
  kv_lengths = lengths("key_value_seq_lengths", key_value_seq_lengths, S)

  q_seg = kv_seg = None
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      q_seg, kv_seg = (jnp.asarray(s) for s in segment_ids)
    else:
      q_seg = kv_seg = jnp.asarray(segment_ids)
    if (q_seg.shape != batch_shape + (T,) and not (
        squeeze and q_seg.shape == (1, T))) or (
            kv_seg.shape != batch_shape + (S,) and not (
                squeeze and kv_seg.shape == (1, S))):
      raise ValueError(
          f"segment_ids must be [*B, T]={batch_shape + (T,)} "
          f"(self-attention) or a pair ([*B, T], [*B, S]="
          f"{batch_shape + (S,)}); got {q_seg.shape} and {kv_seg.shape}")
    if not (jnp.issubdtype(q_seg.dtype, jnp.integer)
            and jnp.issubdtype(kv_seg.dtype, jnp.integer)):
      raise ValueError(f"segment_ids must be integers, got {q_seg.dtype} and "
                       f"{kv_seg.dtype}")
    q_seg, kv_seg = jnp.reshape(q_seg, (B, T)), jnp.reshape(kv_seg, (B, S))
  if scale is None:
    if H == 0:
      raise ValueError(
          f"head_dim is 0 (query={query.shape}): the default scale "
          "1/sqrt(head_dim) is undefined; pass scale= explicitly")
    scale = 1.0 / float(np.sqrt(H))
  window = normalize_window(local_window_size)
  if window is not None:
    # A window wider than the sequences is no window; clipping keeps the
    # position arithmetic inside int32.
    reach = max(T, S)
    window = (min(window[0], reach), min(window[1], reach))
  return AttentionInputs(
      query=query, key=key, value=value, bias=bias, mask=mask,
      scale=float(scale) if not isinstance(scale, jax.Array) else scale,
      is_causal=bool(is_causal), q_lengths=q_lengths, kv_lengths=kv_lengths,
      window=window, q_segment_ids=q_seg,
      kv_segment_ids=kv_seg, squeeze_batch=squeeze, batch_shape=batch_shape,
      precision=precision, logits_soft_cap=check_soft_cap(logits_soft_cap))


def restore_batch(x: Optional[Array], inputs: AttentionInputs,
                  ) -> Optional[Array]:
  """``x[B, ...]`` -> ``x[*batch_shape, ...]`` (the caller's batch axes)."""
  if x is None:
    return None
  batch_shape = inputs.batch_shape
  if batch_shape is None:
    batch_shape = () if inputs.squeeze_batch else (x.shape[0],)
  return jnp.reshape(x, tuple(batch_shape) + x.shape[1:])


def check_dropout(dropout_rate: float, dropout_rng: Any) -> None:
  """Raises ``ValueError`` unless ``0 <= rate < 1`` and a key is given."""
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError("dropout_rate > 0 needs a dropout_rng (a PRNG key)")


def library_features_missing(*, dropout_rate: float = 0.0,
                             return_weights: bool = False) -> list:
  """The requested features no library kernel (pallas, tokamax) computes."""
  return (["dropout"] if dropout_rate > 0 else []) + (
      ["return_weights"] if return_weights else [])


def check_library_call(implementation: str, why: Optional[str], *,
                       return_residual=False, einsums=None,
                       einsum_dot_general=None) -> None:
  """Raises ``ValueError`` when a library kernel cannot serve the call.

  ``why`` is the implementation's own reason (``None`` when it can serve the
  inputs); residuals and Flax's custom einsums are refused for every library
  kernel, since only the XLA path exposes them.
  """
  if return_residual or einsums or einsum_dot_general is not None:
    raise ValueError(f"implementation={implementation!r} cannot return "
                     "residuals or use custom einsums; use "
                     "implementation='xla'")
  if why:
    raise ValueError(f"implementation={implementation!r}: {why}")
