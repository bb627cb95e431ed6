"""Helpers shared by the efficient (sub-quadratic) attention kernels.

Stable API, used by several variant modules:

* :func:`map_heads` lifts a one-head function ``fn(q_TH, k_SH, v_SD, ...)``
  to ``[B, T, N, H]`` inputs with ``jax.vmap`` (grouped-query attention: the
  ``N // K`` query heads sharing a key/value head see the same ``k``, ``v``).
* :func:`validity` turns lengths and a *factorable* boolean mask into
  per-token validity vectors ``q_valid[B, T]`` / ``kv_valid[B, S]`` and
  rejects dense ``[T, S]`` masks that a sub-quadratic kernel cannot honour.
* :func:`check_supported` raises one ``ValueError`` naming everything a
  kernel cannot honour (bias, causal, segment ids).
* :func:`sparse_rows_one_head` is exact softmax attention of query blocks
  over a static, per-block list of key positions (sliding windows, BigBird
  block patterns, Longformer global keys) without any ``[T, S]`` array;
  :func:`dense_rows_one_head` is exact attention of a few query rows over all
  keys (global tokens).
* :func:`pad_axis0`, :func:`window_context`, :func:`intersect_windows`,
  :func:`align_keys` are the small blocking utilities behind them.

Everything static (block tables, key positions) is NumPy at trace time.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from attn.kernels import common
from attn.kernels.exact import masked_softmax

Array = jax.Array
F32 = jnp.float32
Window = Optional[Tuple[int, int]]


def map_heads(fn: Callable[..., Array], query: Array, key: Array,
              value: Array, *per_example) -> Array:
  """Applies a one-head kernel to every (batch, query head) pair.

  Args:
    fn: ``fn(q_TH, k_SH, v_SD, *args) -> out_TD`` for one head, where each
      of ``args`` is one example's slice of ``per_example``.
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]`` with ``N % K == 0``.
    value: ``[B, S, K, Dv]``.
    *per_example: arrays with a leading batch axis ``B`` (or ``None``),
      shared by all heads of an example (validity vectors, segment ids).

  Returns:
    ``[B, T, N, D]``; query head ``n`` used key/value head ``n // (N // K)``.
    Work that depends only on ``k``/``v`` is not repeated per query head:
    ``vmap`` leaves it unbatched over the group axis.
  """
  B, T, N, H = query.shape
  K = key.shape[2]
  q_BTKGH = query.reshape(B, T, K, N // K, H)
  extra = (None,) * len(per_example)
  over_group = jax.vmap(fn, in_axes=(1, None, None) + extra, out_axes=1)
  over_kv = jax.vmap(over_group, in_axes=(1, 1, 1) + extra, out_axes=1)
  over_batch = jax.vmap(over_kv, in_axes=(0, 0, 0) + (0,) * len(per_example))
  out = over_batch(q_BTKGH, key, value, *per_example)
  return out.reshape(B, T, N, out.shape[-1])


def check_supported(name: str, inputs: common.AttentionInputs, *,
                    causal: bool, segments: bool) -> None:
  """Raises ``ValueError`` listing the requested features ``name`` lacks.

  No efficient kernel takes an additive ``bias`` (it is a dense ``[T, S]``
  array); ``causal`` / ``segments`` say whether ``is_causal=True`` and
  ``segment_ids`` are supported.
  """
  problems = []
  if inputs.bias is not None:
    problems.append(f"an additive bias (got shape {inputs.bias.shape}); use "
                    "'softmax' or fold the bias into the inputs")
  if inputs.is_causal and not causal:
    problems.append("is_causal=True (it is bidirectional only)")
  if inputs.q_segment_ids is not None and not segments:
    problems.append("segment_ids")
  if problems:
    raise ValueError(f"attention {name!r} does not support: "
                     + "; ".join(problems))


def validity(name: str, inputs: common.AttentionInputs
             ) -> Tuple[Optional[Array], Optional[Array]]:
  """Per-token validity ``(q_valid[B, T], kv_valid[B, S])`` (bool or None).

  Combines ``query_seq_lengths`` / ``key_value_seq_lengths`` with a mask
  that factorises into a query part and a key part: shape
  ``[B|1, 1, 1, S]`` (key padding), ``[B|1, 1, T, 1]`` (query padding) or
  ``[B|1, 1, 1, 1]``. A query that is not valid outputs zeros; a key that
  is not valid is never attended.

  Raises:
    ValueError: for a dense ``[.., T, S]`` or per-head mask, which a kernel
      that never forms ``[T, S]`` scores cannot honour.
  """
  B, T, S, N, *_ = inputs.shape
  q_valid = kv_valid = None
  if inputs.q_lengths is not None:
    q_valid = jnp.arange(T)[None, :] < inputs.q_lengths[:, None]
  if inputs.kv_lengths is not None:
    kv_valid = jnp.arange(S)[None, :] < inputs.kv_lengths[:, None]
  mask = inputs.mask
  if mask is None:
    return q_valid, kv_valid
  _, mn, mt, ms = mask.shape
  if mn != 1 or (mt != 1 and ms != 1):
    raise ValueError(
        f"attention {name!r} only takes padding masks of shape [B, 1, 1, S] "
        f"(keys) or [B, 1, T, 1] (queries), got a mask of shape {mask.shape}:"
        " a dense or per-head mask would need the [T, S] score matrix. Pass "
        "key_value_seq_lengths / query_seq_lengths or a [B, 1, 1, S] mask.")
  if ms != 1:
    part = jnp.broadcast_to(mask[:, 0, 0, :], (B, S))
    kv_valid = part if kv_valid is None else kv_valid & part
  else:
    part = jnp.broadcast_to(mask[:, 0, :, 0], (B, T))
    q_valid = part if q_valid is None else q_valid & part
  return q_valid, kv_valid


def zero_invalid_queries(out_BTND: Array, q_valid: Optional[Array]) -> Array:
  """Zeros the output rows of queries with ``q_valid[B, T] == False``."""
  if q_valid is None:
    return out_BTND
  return jnp.where(q_valid[:, :, None, None], out_BTND, 0).astype(
      out_BTND.dtype)


def finish(out_BTND: Array, inputs: common.AttentionInputs,
           q_valid: Optional[Array]) -> Array:
  """Zeros invalid query rows, casts to the input dtype, undoes batching."""
  out = zero_invalid_queries(out_BTND, q_valid).astype(inputs.query.dtype)
  return out[0] if inputs.squeeze_batch else out


def pad_axis0(x: Optional[Array], length: int, value=0) -> Optional[Array]:
  """Pads (with ``value``) or truncates axis 0 of ``x`` to ``length``."""
  if x is None:
    return None
  n = x.shape[0]
  if n >= length:
    return x[:length]
  pad = [(0, length - n)] + [(0, 0)] * (x.ndim - 1)
  return jnp.pad(x, pad, constant_values=value)


def align_keys(key: Array, value: Array, kv_valid: Optional[Array], T: int):
  """Pads/truncates keys and values ``[B, S, ...]`` to length ``T``.

  For causal attention with ``S != T``: keys past ``T - 1`` are never
  attended, and added positions are marked invalid. Returns
  ``(key, value, kv_valid)`` with ``kv_valid`` ``[B, T]`` (or ``None`` when
  ``S == T`` and it was ``None``).
  """
  B, S = key.shape[:2]
  if S == T:
    return key, value, kv_valid
  if kv_valid is None:
    kv_valid = jnp.ones((B, S), bool)
  swap = lambda x: jnp.moveaxis(pad_axis0(jnp.moveaxis(x, 1, 0), T), 0, 1)
  return swap(key), swap(value), swap(kv_valid)


def intersect_windows(a: Window, b: Window) -> Window:
  """The window allowed by both ``(left, right)`` windows (``None`` = all)."""
  if a is None:
    return b
  if b is None:
    return a
  return (min(a[0], b[0]), min(a[1], b[1]))


def window_context(T: int, S: int, block: int, window: Tuple[int, int],
                   is_causal: bool) -> np.ndarray:
  """Key positions each query block needs for a sliding window.

  Query block ``i`` holds positions ``[i*block, (i+1)*block)``; with window
  ``(left, right)`` its queries see keys in
  ``[i*block - left, (i+1)*block - 1 + right]``. Returns the static
  ``ctx_pos[ceil(T/block), C]`` of whole key blocks covering that range,
  ``-1`` where the position is outside ``[0, S)``; ``C`` is
  ``O(left + right + block)``, independent of ``T``.
  """
  left, right = window
  if is_causal:
    right = 0
  n_q = -(-T // block)
  n_k = -(-S // block)
  n_left = min(-(-left // block), max(n_q - 1, 0))
  n_right = min(-(-right // block), max(n_k - 1, 0))
  offsets = np.arange(-n_left, n_right + 1)
  blocks = np.arange(n_q)[:, None] + offsets[None, :]           # [Q, C/block]
  pos = (blocks[:, :, None] * block + np.arange(block)).reshape(n_q, -1)
  return np.where((pos >= 0) & (pos < S), pos, -1)


def _gather_rows(x: Optional[Array], pos: np.ndarray, fill=0):
  """``x[pos]`` along axis 0 with ``pos == -1`` giving ``fill``."""
  if x is None:
    return None
  got = x[np.maximum(pos, 0)]
  where = (pos >= 0).reshape(pos.shape + (1,) * (x.ndim - 1))
  return jnp.where(where, got, jnp.asarray(fill, x.dtype))


def sparse_rows_one_head(q_TH: Array, k_SH: Array, v_SD: Array,
                         ctx_pos: np.ndarray, *, block: int, scale,
                         is_causal: bool, window: Window,
                         kv_valid: Optional[Array] = None,
                         q_segment: Optional[Array] = None,
                         kv_segment: Optional[Array] = None,
                         window_columns: Optional[int] = None) -> Array:
  """Exact softmax attention restricted to a static block pattern, one head.

  Queries are cut into blocks of ``block``; query block ``i`` attends to the
  keys at positions ``ctx_pos[i]`` (``-1`` = none; positions in a row must be
  distinct), further restricted by causality, the ``(left, right)`` window,
  key validity ``kv_valid[S]`` and segment ids. Only ``[T, C]`` scores exist,
  ``C = ctx_pos.shape[1]``: time and memory ``O(T·C)``.

  Args:
    q_TH: ``[T, H]``; k_SH: ``[S, H]``; v_SD: ``[S, Dv]``.
    ctx_pos: static int ``[ceil(T/block), C]``.
    block: query block length.
    scale: multiplier of ``q·k``.
    is_causal, window: position-based restrictions, as in
      :func:`attn.kernels.common.structure_mask`.
    window_columns: the window restricts only the first ``window_columns``
      context columns (default: all); later columns (e.g. global keys) obey
      every other restriction.
    kv_valid: bool ``[S]`` or ``None``.
    q_segment / kv_segment: int ``[T]`` / ``[S]`` or ``None``.

  Returns:
    ``[T, Dv]`` float32. A query with no allowed key gets zeros.
  """
  T, H = q_TH.shape
  n_q, C = ctx_pos.shape
  q_QbH = pad_axis0(q_TH, n_q * block).reshape(n_q, block, H)
  k_QCH = _gather_rows(k_SH, ctx_pos)
  v_QCD = _gather_rows(v_SD, ctx_pos)
  q_pos = jnp.arange(n_q * block).reshape(n_q, block)
  q_seg = pad_axis0(q_segment, n_q * block)
  q_seg = None if q_seg is None else q_seg.reshape(n_q, block)
  kv_seg = _gather_rows(kv_segment, ctx_pos)

  k_pos = jnp.asarray(ctx_pos)

  def block_mask(qp_b, kp_C, qs_b, ks_C):
    return common.structure_mask(qp_b, kp_C, is_causal=is_causal,
                                 window=None, q_segment=qs_b,
                                 kv_segment=ks_C)

  mask_QbC = jax.vmap(block_mask)(q_pos, k_pos, q_seg, kv_seg)
  present_QC = k_pos >= 0
  if kv_valid is not None:
    present_QC = present_QC & _gather_rows(kv_valid, ctx_pos, False)
  present_QbC = present_QC[:, None, :]
  if window is not None:
    offset_QbC = k_pos[:, None, :] - q_pos[:, :, None]
    in_window = (offset_QbC >= -window[0]) & (offset_QbC <= window[1])
    if window_columns is not None:
      in_window = in_window | (jnp.arange(C) >= window_columns)
    present_QbC = present_QbC & in_window
  mask_QbC = present_QbC if mask_QbC is None else mask_QbC & present_QbC
  scores_QbC = jnp.einsum("qbh,qch->qbc", q_QbH, k_QCH,
                          preferred_element_type=F32) * scale
  probs_QbC = masked_softmax(scores_QbC, mask_QbC)
  out_QbD = jnp.einsum("qbc,qcd->qbd", probs_QbC.astype(v_SD.dtype), v_QCD,
                       preferred_element_type=F32)
  return out_QbD.reshape(n_q * block, -1)[:T]


def dense_rows_one_head(q_GH: Array, q_pos: Sequence[int], k_SH: Array,
                        v_SD: Array, *, scale, is_causal: bool,
                        kv_valid: Optional[Array] = None,
                        q_segment: Optional[Array] = None,
                        kv_segment: Optional[Array] = None) -> Array:
  """Exact attention of ``G`` query rows (at positions ``q_pos``) over all keys.

  Used for global tokens: ``O(G·S)`` time and memory. ``q_segment`` is the
  full ``[T]`` query segment array (indexed at ``q_pos`` here). Returns
  ``[G, Dv]`` float32.
  """
  q_pos = np.asarray(q_pos)
  S = k_SH.shape[0]
  mask_GS = common.structure_mask(
      jnp.asarray(q_pos), jnp.arange(S), is_causal=is_causal, window=None,
      q_segment=None if q_segment is None else q_segment[q_pos],
      kv_segment=kv_segment)
  if kv_valid is not None:
    mask_GS = kv_valid[None, :] if mask_GS is None else mask_GS & kv_valid
  scores_GS = jnp.einsum("gh,sh->gs", q_GH, k_SH,
                         preferred_element_type=F32) * scale
  probs_GS = masked_softmax(scores_GS, mask_GS)
  return jnp.einsum("gs,sd->gd", probs_GS.astype(v_SD.dtype), v_SD,
                    preferred_element_type=F32)
