"""The per-head and blocking helpers of the efficient attention kernels.

One set, used by every variant that is not the exact kernel. A kernel
validates its arguments with :func:`attn.kernels.canonical.canonicalize`,
then

* :func:`check_supported` raises one ``ValueError`` naming everything it
  cannot honour (bias, causal, segment ids, ``local_window_size``);
* :func:`validity` turns lengths and a *factorable* boolean mask into
  per-token validity vectors ``q_valid[B, T]`` / ``kv_valid[B, S]`` (or
  ``[B, N, S]`` for kernels that take per-head key padding) and rejects
  dense ``[T, S]`` masks that a sub-quadratic kernel cannot honour;
  :func:`dense_masks` instead builds the full ``[B, N, T, S]`` bias and mask
  for kernels that form the scores anyway (top-k, hard, synthesizer);
* :func:`map_heads` lifts a one-head function ``fn(q_TH, k_SH, v_SD, ...)``
  to ``[B, T, N, H]`` inputs with ``jax.vmap`` (grouped-query attention: the
  ``G = N // K`` query heads sharing a key/value head see the same ``k``,
  ``v``, which are never repeated);
* :func:`finish` zeros invalid query rows, casts to the input dtype and
  undoes the batching of 3-D inputs.

Inside one head:

* :func:`map_blocks` runs a head's blocks in sequential steps of about
  ``QUERIES_PER_STEP`` queries; :func:`map_chunks` does the same for
  row-independent work on consecutive chunks of rows.
* :func:`sparse_rows_one_head` is exact softmax attention of query blocks
  over a static, per-block list of key positions (sliding windows, BigBird
  block patterns, Longformer global keys) without any ``[T, S]`` array;
  :func:`dense_rows_one_head` is exact attention of a few query rows over all
  keys (global tokens).
* :func:`window_blocks`, :func:`gather_blocks`, :func:`pad_axis0`,
  :func:`intersect_windows`, :func:`align_keys` are the small blocking
  utilities behind them.

Shape letters are those of :mod:`attn.kernels`; ``Y`` counts the global
keys or query rows of a pattern. Everything static (block tables, key
positions) is NumPy at trace time.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import einops
import jax
import jax.numpy as jnp
import numpy as np

from attn import masks
from attn.kernels import canonical
from attn.masks import combine_masks, masked_softmax

Array = jax.Array
F32 = jnp.float32
Window = Optional[Tuple[int, int]]
# Blockwise kernels run their blocks in sequential steps of about this many
# queries (per head), so one step's scores stay cache-sized whatever T is.
QUERIES_PER_STEP = 512


def map_heads(fn: Callable[..., Array], query: Array, key: Array,
              value: Array, *per_example, per_head: Sequence = ()) -> Array:
  """Applies a one-head kernel to every (batch, query head) pair.

  Args:
    fn: ``fn(q_TH, k_SH, v_SD, *example_args, *head_args) -> out_TD`` for
      one head, where each argument after ``v_SD`` is that head's slice of
      ``per_example`` then ``per_head``.
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]`` with ``N % K == 0``.
    value: ``[B, S, K, Dv]``.
    *per_example: arrays with a leading batch axis ``B`` (or ``None``),
      shared by all heads of an example (validity vectors, segment ids).
    per_head: arrays with leading ``[B, N]`` axes (or ``None``), one slice
      per query head (dense masks, per-head key padding, PRNG keys).

  Returns:
    ``[B, T, N, Dv]``; query head ``n`` used key/value head ``n // G``.
    Work that depends only on ``k``/``v`` (and per-example arguments) is not
    repeated per query head: ``vmap`` leaves it unbatched over the group.
  """
  K = key.shape[2]
  q_BTKGH = einops.rearrange(query, "b t (k g) h -> b t k g h", k=K)
  heads = tuple(None if x is None else einops.rearrange(
      x, "b (k g) ... -> b k g ...", k=K) for x in per_head)
  ex, hd = (None,) * len(per_example), (0,) * len(heads)
  over_group = jax.vmap(fn, in_axes=(1, None, None) + ex + hd, out_axes=1)
  over_kv = jax.vmap(over_group, in_axes=(1, 1, 1) + ex + hd, out_axes=1)
  over_batch = jax.vmap(over_kv, in_axes=0)
  out_BTKGD = over_batch(q_BTKGH, key, value, *per_example, *heads)
  return einops.rearrange(out_BTKGD, "b t k g d -> b t (k g) d")


def check_supported(name: str, inputs: canonical.AttentionInputs, *,
                    causal: bool, segments: bool,
                    window: bool = False) -> None:
  """Raises ``ValueError`` listing the requested features ``name`` lacks.

  No efficient kernel takes an additive ``bias`` (it is a dense ``[T, S]``
  array); ``causal`` / ``segments`` / ``window`` say whether
  ``is_causal=True``, ``segment_ids`` and ``local_window_size`` are
  supported.
  """
  problems = []
  if inputs.bias is not None:
    problems.append(f"an additive bias (got shape {inputs.bias.shape}); use "
                    "'softmax' or fold the bias into the inputs")
  if inputs.is_causal and not causal:
    problems.append("is_causal=True (it is bidirectional only)")
  if inputs.window is not None and not window:
    problems.append("local_window_size")
  if inputs.q_segment_ids is not None and not segments:
    problems.append("segment_ids")
  if problems:
    raise ValueError(f"attention {name!r} does not support: "
                     + "; ".join(problems))


def lengths_valid(inputs: canonical.AttentionInputs
                  ) -> Tuple[Optional[Array], Optional[Array]]:
  """``(q_valid[B, T], kv_valid[B, S])`` from the sequence lengths alone."""
  B, T, S, *_ = inputs.shape
  q_valid = kv_valid = None
  if inputs.q_lengths is not None:
    q_valid = jnp.arange(T)[None, :] < inputs.q_lengths[:, None]
  if inputs.kv_lengths is not None:
    kv_valid = jnp.arange(S)[None, :] < inputs.kv_lengths[:, None]
  return q_valid, kv_valid


def validity(name: str, inputs: canonical.AttentionInputs, *,
             per_head: bool = False
             ) -> Tuple[Optional[Array], Optional[Array]]:
  """Per-token validity ``(q_valid[B, T], kv_valid)`` (bool or None).

  Combines ``query_seq_lengths`` / ``key_value_seq_lengths`` with a mask
  that factorises into a query part and a key part: shape
  ``[B|1, 1, 1, S]`` (key padding), ``[B|1, 1, T, 1]`` (query padding) or
  ``[B|1, 1, 1, 1]``. A query that is not valid outputs zeros; a key that
  is not valid is never attended.

  With ``per_head=True`` key-padding masks may also be per head
  (``[B|1, N, 1, S]``), and ``kv_valid`` is always ``[B, N, S]`` (all True
  when nothing pads the keys), for :func:`map_heads`'s ``per_head``.
  Otherwise ``kv_valid`` is ``[B, S]`` or ``None``.

  Raises:
    ValueError: for a dense ``[.., T, S]`` mask (or a per-head one without
      ``per_head``), which a kernel that never forms ``[T, S]`` scores
      cannot honour.
  """
  B, T, S, N, *_ = inputs.shape
  q_valid, kv_valid = lengths_valid(inputs)
  if per_head and kv_valid is not None:
    kv_valid = kv_valid[:, None, :]
  mask = inputs.mask
  if mask is not None:
    _, mn, mt, ms = mask.shape
    if (mt != 1 and ms != 1) or (mn != 1 and (mt != 1 or not per_head)):
      allowed = ("[B, 1, 1, S] or [B, N, 1, S] (keys)" if per_head
                 else "[B, 1, 1, S] (keys)")
      raise ValueError(
          f"attention {name!r} cannot honour a dense mask of shape "
          f"{mask.shape}: it only takes padding masks of shape {allowed} or "
          "[B, 1, T, 1] (queries), since a dense"
          + ("" if per_head else " or per-head")
          + " mask would need the [T, S] score matrix. Pass "
          "key_value_seq_lengths / query_seq_lengths, a key-padding mask, "
          "and is_causal=True for causal masking.")
    if ms != 1 or mn != 1:
      part = mask[:, :, 0, :] if per_head else mask[:, 0, 0, :]
      kv_valid = part if kv_valid is None else kv_valid & part
    else:
      part = jnp.broadcast_to(mask[:, 0, :, 0], (B, T))
      q_valid = part if q_valid is None else q_valid & part
  if per_head:
    kv_valid = jnp.ones((B, N, S), bool) if kv_valid is None else (
        jnp.broadcast_to(kv_valid, (B, N, S)))
  elif kv_valid is not None:
    kv_valid = jnp.broadcast_to(kv_valid, (B, S))
  return q_valid, kv_valid


def dense_masks(inputs: canonical.AttentionInputs
                ) -> Tuple[Optional[Array], Optional[Array]]:
  """``(bias, mask)`` as float32 / bool ``[B, N, T, S]`` (or ``None``).

  For kernels that materialise the ``[T, S]`` scores anyway: the mask is the
  user mask AND the causal, window, length and segment masks, so every
  option of exact attention is honoured.
  """
  B, T, S, N, *_ = inputs.shape
  structure_BTS = None
  if inputs.has_structure_mask:
    def one(q_len, kv_len, q_seg, kv_seg):
      return masks.structure_mask(
          jnp.arange(T), jnp.arange(S), is_causal=inputs.is_causal,
          window=inputs.window, q_length=q_len, kv_length=kv_len,
          q_segment=q_seg, kv_segment=kv_seg)
    structure_BTS = jax.vmap(one, axis_size=B)(
        inputs.q_lengths, inputs.kv_lengths, inputs.q_segment_ids,
        inputs.kv_segment_ids)
  mask_BNTS = combine_masks(
      inputs.mask, None if structure_BTS is None else structure_BTS[:, None])
  if mask_BNTS is not None:
    mask_BNTS = jnp.broadcast_to(mask_BNTS, (B, N, T, S))
  bias_BNTS = None if inputs.bias is None else jnp.broadcast_to(
      inputs.bias.astype(F32), (B, N, T, S))
  return bias_BNTS, mask_BNTS


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
  return canonical.restore_batch(out, inputs)


def no_keys_output(inputs: canonical.AttentionInputs) -> Optional[Array]:
  """Zeros ``[B, T, N, Dv]`` when there are no keys (``S == 0``), else None.

  With nothing to attend every query row is fully masked, so the output is
  zeros, as :func:`attn.dot_product_attention` gives for ``S == 0``; kernels
  return this before building any per-key structure.
  """
  B, T, S, N, _, _, Dv = inputs.shape
  if S:
    return None
  zeros = jnp.zeros((B, T, N, Dv), F32)
  return finish(zeros, inputs, None)


def map_blocks(fn: Callable[..., Array], xs, queries_per_block: int):
  """``fn(*x)`` for each slice ``x`` of the arrays ``xs`` along axis 0.

  Blocks are ``jax.vmap``-ed in groups of ``QUERIES_PER_STEP //
  queries_per_block`` and the groups run one after another
  (``jax.lax.map``), which bounds the memory traffic of one step; with fewer
  blocks than a group this is a plain ``vmap``.
  """
  n = xs[0].shape[0]
  group = max(1, QUERIES_PER_STEP // max(1, queries_per_block))
  if group >= n:
    return jax.vmap(fn)(*xs)
  return jax.lax.map(lambda x: fn(*x), xs, batch_size=group)


def pad_axis0(x: Optional[Array], length: int, value=0) -> Optional[Array]:
  """Pads (with ``value``) or truncates axis 0 of ``x`` to ``length``."""
  if x is None:
    return None
  n = x.shape[0]
  if n >= length:
    return x[:length]
  pad = [(0, length - n)] + [(0, 0)] * (x.ndim - 1)
  return jnp.pad(x, pad, constant_values=value)


def to_blocks(x: Array, block: int, fill=0,
              num_blocks: Optional[int] = None) -> Array:
  """``x[L, ...]`` -> ``[n, block, ...]``, padded with ``fill`` (or cut) to
  ``n = num_blocks`` blocks (default ``ceil(L / block)``)."""
  n = -(-x.shape[0] // block) if num_blocks is None else num_blocks
  return einops.rearrange(pad_axis0(x, n * block, fill),
                          "(n b) ... -> n b ...", b=block)


def from_blocks(x_nb: Array, length: int) -> Array:
  """``[n, block, ...]`` -> ``[length, ...]``: the inverse of
  :func:`to_blocks` (drops the padding)."""
  return einops.rearrange(x_nb, "n b ... -> (n b) ...")[:length]


def map_chunks(fn: Callable[[Array], Array], x_T: Array,
               chunk: int) -> Array:
  """``fn`` applied to consecutive ``chunk``-row pieces of ``x_T[T, ...]``.

  ``fn([c, ...]) -> [c, D]`` must treat rows independently; the pieces run
  one after another under ``jax.lax.map`` so the working set stays
  ``O(chunk)`` (cache-resident) however long ``T`` is. Returns ``[T, D]``.
  """
  T = x_T.shape[0]
  return from_blocks(jax.lax.map(fn, to_blocks(x_T, max(1, min(chunk, T)))),
                     T)


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
  return to_blocks(x, block, fill, num_blocks=n_k + 1)


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
  gathers its ``C = block·Cb + Y`` keys and forms ``[block, C]`` scores, so
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
    global_keys: static int ``[Y]`` key positions (``< S``) or ``None``.

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
  q_QbH = to_blocks(q_TH, block, num_blocks=n_q)
  q_seg_Qb = None if q_segment is None else to_blocks(q_segment, block,
                                                      num_blocks=n_q)
  kg_YH, vg_YD = k_SH[glob], v_SD[glob]
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
      ok_bY = jnp.ones((1, glob.size), bool) if kg_ok is None else kg_ok[None]
      mask_bY = positional(ok_bY, q_pos_b, jnp.asarray(glob), q_seg_b,
                           kg_seg, False)
      scores_bY = jnp.einsum("bh,yh->by", q_bH, kg_YH,
                             preferred_element_type=F32)
      scores_bC = jnp.concatenate([scores_bC, scores_bY], axis=-1)
      mask_bC = jnp.concatenate(
          [jnp.broadcast_to(mask_bC, (block, k_CH.shape[0])),
           jnp.broadcast_to(mask_bY, (block, glob.size))], axis=-1)
      values_CD = jnp.concatenate([v_CD, vg_YD], axis=0)
    probs_bC = masked_softmax(scores_bC * scale, mask_bC)
    return jnp.einsum("bc,cd->bd", probs_bC.astype(v_SD.dtype), values_CD,
                      preferred_element_type=F32)

  out_QbD = jax.lax.map(one_block,
                        (q_QbH, table_QC, q_seg_Qb, jnp.arange(n_q)))
  return from_blocks(out_QbD, T)


def dense_rows_one_head(q_YH: Array, q_pos: Sequence[int], k_SH: Array,
                        v_SD: Array, *, scale, is_causal: bool,
                        kv_valid: Optional[Array] = None,
                        q_segment: Optional[Array] = None,
                        kv_segment: Optional[Array] = None) -> Array:
  """Exact attention of ``Y`` query rows (at positions ``q_pos``) over all keys.

  Used for global tokens: ``O(Y·S)`` time and memory. ``q_segment`` is the
  full ``[T]`` query segment array (indexed at ``q_pos`` here). Returns
  ``[Y, Dv]`` float32.
  """
  q_pos = np.asarray(q_pos)
  S = k_SH.shape[0]
  mask_YS = masks.structure_mask(
      jnp.asarray(q_pos), jnp.arange(S), is_causal=is_causal, window=None,
      q_segment=None if q_segment is None else q_segment[q_pos],
      kv_segment=kv_segment)
  if kv_valid is not None:
    mask_YS = kv_valid[None, :] if mask_YS is None else mask_YS & kv_valid
  scores_YS = jnp.einsum("yh,sh->ys", q_YH, k_SH,
                         preferred_element_type=F32) * scale
  probs_YS = masked_softmax(scores_YS, mask_YS)
  return jnp.einsum("ys,sd->yd", probs_YS.astype(v_SD.dtype), v_SD,
                    preferred_element_type=F32)
