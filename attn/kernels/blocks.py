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
* :func:`map_chunks`, :func:`window_blocks`, :func:`gather_blocks`,
  :func:`pad_axis0`, :func:`intersect_windows`, :func:`align_keys` are the
  small blocking utilities behind them.

Everything static (block tables, key positions) is NumPy at trace time.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from attn import masks
from attn.kernels import canonical
from attn.masks import masked_softmax

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


def check_supported(name: str, inputs: canonical.AttentionInputs, *,
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


def validity(name: str, inputs: canonical.AttentionInputs
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


def finish(out_BTND: Array, inputs: canonical.AttentionInputs,
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


def map_chunks(fn: Callable[[Array], Array], x_T: Array,
               chunk: int) -> Array:
  """``fn`` applied to consecutive ``chunk``-row pieces of ``x_T[T, ...]``.

  ``fn([c, ...]) -> [c, D]`` must treat rows independently; the pieces run
  one after another under ``jax.lax.map`` so the working set stays
  ``O(chunk)`` (cache-resident) however long ``T`` is. Returns ``[T, D]``.
  """
  T = x_T.shape[0]
  c = max(1, min(chunk, T))
  n = -(-T // c)
  pieces = pad_axis0(x_T, n * c).reshape((n, c) + x_T.shape[1:])
  out = jax.lax.map(fn, pieces)
  return out.reshape((n * c,) + out.shape[2:])[:T]


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


def window_blocks(T: int, S: int, block: int, window: Tuple[int, int],
                  is_causal: bool) -> np.ndarray:
  """Key blocks each query block needs for a sliding window.

  Query block ``i`` holds positions ``[i*block, (i+1)*block)``; with window
  ``(left, right)`` its queries see keys in
  ``[i*block - left, (i+1)*block - 1 + right]``. Returns the static key-block
  table ``[ceil(T/block), Cb]`` covering that range (``-1`` outside
  ``[0, ceil(S/block))``); ``Cb ≈ (left + right)/block + 1`` does not grow
  with ``T``.
  """
  left, right = window
  if is_causal:
    right = 0
  n_q, n_k = -(-T // block), -(-S // block)
  n_left = min(-(-left // block), max(n_q - 1, 0))
  n_right = min(-(-right // block), max(n_k - 1, 0))
  table = np.arange(n_q)[:, None] + np.arange(-n_left, n_right + 1)[None, :]
  return np.where((table >= 0) & (table < n_k), table, -1)


def gather_blocks(x: Array, block: int, fill=0) -> Array:
  """``x[S, ...]`` -> ``[ceil(S/block) + 1, block, ...]`` key blocks.

  The tail is padded with ``fill`` and one extra all-``fill`` block is
  appended: index it (``ceil(S/block)``) for "no block".
  """
  n_k = -(-x.shape[0] // block)
  xb = pad_axis0(x, (n_k + 1) * block, fill)
  return xb.reshape((n_k + 1, block) + x.shape[1:])


def sparse_rows_one_head(q_TH: Array, k_SH: Array, v_SD: Array,
                         key_blocks: np.ndarray, *, block: int, scale,
                         is_causal: bool, window: Window,
                         kv_valid: Optional[Array] = None,
                         q_segment: Optional[Array] = None,
                         kv_segment: Optional[Array] = None,
                         global_keys: Optional[np.ndarray] = None) -> Array:
  """Exact softmax attention restricted to a static block pattern, one head.

  Queries are cut into blocks of ``block``. Query block ``i`` attends, in
  one softmax, to

  * the key blocks ``key_blocks[i]`` (``-1`` = none; distinct per row),
    restricted to the ``(left, right)`` ``window`` around each query, and
  * the keys at positions ``global_keys`` (every query block; not subject
    to the window; excluded from the block part so none counts twice),

  both further restricted by causality, ``kv_valid`` and segment ids.

  The query blocks are processed one at a time by ``jax.lax.map``: each step
  gathers its ``C = block·Cb + G`` keys and forms ``[block, C]`` scores, so
  time is ``O(T·C)``, the working set per step is independent of ``T`` (it
  stays in cache) and no ``[T, S]`` array ever exists.

  Args:
    q_TH: ``[T, H]``; k_SH: ``[S, H]``; v_SD: ``[S, Dv]``.
    key_blocks: static int ``[ceil(T/block), Cb]``.
    block: block length of queries and keys.
    scale: multiplier of ``q·k``.
    is_causal: only keys ``s <= t``.
    window: ``None`` or ``(left, right)``: ``t - left <= s <= t + right``.
    kv_valid: bool ``[S]`` or ``None``.
    q_segment / kv_segment: int ``[T]`` / ``[S]`` or ``None``: attend only
      within the same segment.
    global_keys: static int ``[G]`` key positions (``< S``) or ``None``.

  Returns:
    ``[T, Dv]`` float32. A query with no allowed key gets zeros.
  """
  T, H = q_TH.shape
  S = k_SH.shape[0]
  n_q = key_blocks.shape[0]
  n_k = -(-S // block)
  glob = np.zeros(0, np.int64) if global_keys is None else np.asarray(
      global_keys)
  key_ok_S = jnp.asarray(~np.isin(np.arange(S), glob))
  if kv_valid is not None:
    key_ok_S = key_ok_S & kv_valid
  k_blocks, v_blocks = gather_blocks(k_SH, block), gather_blocks(v_SD, block)
  ok_blocks = gather_blocks(key_ok_S, block, False)   # False past S too
  seg_blocks = None if kv_segment is None else gather_blocks(kv_segment, block)
  table_QC = jnp.asarray(np.where(key_blocks < 0, n_k, key_blocks), jnp.int32)
  q_QbH = pad_axis0(q_TH, n_q * block).reshape(n_q, block, H)
  q_seg_Qb = None if q_segment is None else pad_axis0(
      q_segment, n_q * block).reshape(n_q, block)
  kg_GH, vg_GD = k_SH[glob], v_SD[glob]
  kg_ok = None if kv_valid is None else kv_valid[glob]
  kg_seg = None if kv_segment is None else kv_segment[glob]

  def positional(ok_bC, q_pos_b, k_pos_C, q_seg_b, k_seg_C, windowed):
    q_pos_b, k_pos_C = q_pos_b[:, None], k_pos_C[None, :]
    if is_causal:
      ok_bC = ok_bC & (k_pos_C <= q_pos_b)
    if windowed and window is not None:
      ok_bC = ok_bC & (k_pos_C >= q_pos_b - window[0]) & (
          k_pos_C <= q_pos_b + window[1])
    if q_seg_b is not None:
      ok_bC = ok_bC & (q_seg_b[:, None] == k_seg_C[None, :])
    return ok_bC

  def one_block(args):
    q_bH, row_Cb, q_seg_b, i = args
    q_pos_b = i * block + jnp.arange(block)
    k_pos_C = (row_Cb[:, None] * block + jnp.arange(block)).reshape(-1)
    k_CH = k_blocks[row_Cb].reshape(-1, H)
    v_CD = v_blocks[row_Cb].reshape(k_CH.shape[0], -1)
    k_seg_C = None if seg_blocks is None else seg_blocks[row_Cb].reshape(-1)
    mask_bC = positional(ok_blocks[row_Cb].reshape(1, -1), q_pos_b, k_pos_C,
                         q_seg_b, k_seg_C, True)
    scores_bC = jnp.einsum("bh,ch->bc", q_bH, k_CH,
                           preferred_element_type=F32)
    values_CD = v_CD
    if glob.size:
      ok_bG = jnp.ones((1, glob.size), bool) if kg_ok is None else kg_ok[None]
      mask_bG = positional(ok_bG, q_pos_b, jnp.asarray(glob), q_seg_b,
                           kg_seg, False)
      scores_bG = jnp.einsum("bh,gh->bg", q_bH, kg_GH,
                             preferred_element_type=F32)
      scores_bC = jnp.concatenate([scores_bC, scores_bG], axis=-1)
      mask_bC = jnp.concatenate(
          [jnp.broadcast_to(mask_bC, (block, k_CH.shape[0])),
           jnp.broadcast_to(mask_bG, (block, glob.size))], axis=-1)
      values_CD = jnp.concatenate([v_CD, vg_GD], axis=0)
    probs_bC = masked_softmax(scores_bC * scale, mask_bC)
    return jnp.einsum("bc,cd->bd", probs_bC.astype(v_SD.dtype), values_CD,
                      preferred_element_type=F32)

  out_QbD = jax.lax.map(one_block,
                        (q_QbH, table_QC, q_seg_Qb, jnp.arange(n_q)))
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
  mask_GS = masks.structure_mask(
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
