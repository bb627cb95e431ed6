"""Fixed sparse attention patterns (Child et al. 2019, "Sparse Transformers").

Query ``i`` attends the union of two index sets, with block/stride ``l``:

* ``pattern="strided"``: a local window ``|i - j| <= l`` and every ``l``-th
  position ``(i - j) mod l == 0``.
* ``pattern="fixed"``: its own block ``floor(j/l) == floor(i/l)`` and the
  last ``num_summary`` positions of every block (``j mod l >= l - c``).

With ``is_causal=True`` both sets are cut to ``j <= i`` (the paper's
setting). The kernel works block by block and never builds a dense
``[T, S]`` mask: a query sees a local part of ``3l`` keys (``l`` for fixed)
and a strided/summary part of ``T/l`` keys (``c·T/l``), so time is
``O(T·(l + T/l)·H)`` per head — ``O(T√T·H)`` with ``l ≈ √T``, and dominated
by the linear local term while ``T < l²``. Scores are computed in steps of
``QUERIES_PER_STEP`` queries (:func:`map_blocks`): the forward pass needs
``O(T·H)`` memory, the backward pass keeps every step's scores,
``O(T·(l + T/l))``.

This module also holds the input handling shared by the group-B kernels
(reformer, sinkhorn, synthesizer, topk/hard, local_p): :func:`prepare`
validates inputs, repeats key/value heads for grouped-query attention, and
either builds the dense mask (for kernels that materialise scores anyway) or
reduces masks to a per-key padding mask (for sub-quadratic kernels, which
raise ``ValueError`` for anything they cannot honour exactly);
:func:`map_heads` lifts one-head math with ``jax.vmap``; :func:`map_blocks`
runs a head's blocks in steps of bounded size; :func:`finish` restores the
``[B, T, N, Dv]`` layout.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attn import masks
from attn.kernels import canonical
from attn.kernels.blocks import pad_axis0  # re-exported for the variants
from attn.masks import combine_masks, masked_softmax
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class HeadInputs:
  """Validated inputs laid out head-major for :func:`map_heads`.

  Attributes:
    q: ``[B, N, T, H]``.
    k: ``[B, N, S, H]`` (key/value heads repeated to ``N`` for GQA).
    v: ``[B, N, S, Dv]``.
    bias: ``None`` or float32 ``[B, N, T, S]`` (``dense=True`` only).
    mask: ``None`` or bool ``[B, N, T, S]``: user mask AND causal, lengths,
      window and segment masks (``dense=True`` only).
    key_valid: ``None`` or bool ``[B, N, S]``: keys that may be attended
      (``dense=False`` only; from ``key_value_seq_lengths`` and key-padding
      masks).
    query_valid: ``None`` or bool ``[B, T]`` from ``query_seq_lengths``.
    scale: multiplier of ``q·k``.
    is_causal: query ``t`` may attend key ``s`` only when ``s <= t``.
    dtype: output dtype (the input dtype).
    squeeze_batch: inputs were 3-D ``[T, N, H]``.
  """
  q: Array
  k: Array
  v: Array
  bias: Optional[Array]
  mask: Optional[Array]
  key_valid: Optional[Array]
  query_valid: Optional[Array]
  scale: float
  is_causal: bool
  dtype: jnp.dtype
  squeeze_batch: bool

  @property
  def shape(self):
    """``(B, T, S, N, H, Dv)``."""
    B, N, T, H = self.q.shape
    return B, T, self.k.shape[2], N, H, self.v.shape[-1]


def _structure_mask_BTS(inputs: canonical.AttentionInputs) -> Optional[Array]:
  """Causal/window/length/segment mask ``[B, T, S]`` (``None`` if none)."""
  if not inputs.has_structure_mask:
    return None
  B, T, S, *_ = inputs.shape

  def one(_, q_len, kv_len, q_seg, kv_seg):
    return masks.structure_mask(
        jnp.arange(T), jnp.arange(S), is_causal=inputs.is_causal,
        window=inputs.window, q_length=q_len, kv_length=kv_len,
        q_segment=q_seg, kv_segment=kv_seg)

  return jax.vmap(one)(jnp.arange(B), inputs.q_lengths, inputs.kv_lengths,
                       inputs.q_segment_ids, inputs.kv_segment_ids)


def _key_valid_BNS(name: str, inputs: canonical.AttentionInputs
                   ) -> Optional[Array]:
  """Per-key padding mask from ``key_value_seq_lengths`` and a mask whose
  query axis has size 1; ``ValueError`` for any other mask."""
  B, T, S, N, *_ = inputs.shape
  parts = []
  if inputs.mask is not None:
    if inputs.mask.shape[2] != 1:
      raise ValueError(
          f"{name} cannot honour a dense mask of shape {inputs.mask.shape} "
          "(it never builds the [T, S] score matrix); pass a key-padding "
          "mask of shape [B, 1, 1, S], key_value_seq_lengths, and "
          "is_causal=True for causal masking")
    parts.append(inputs.mask[:, :, 0, :])
  if inputs.kv_lengths is not None:
    parts.append((jnp.arange(S)[None, :]
                  < inputs.kv_lengths[:, None])[:, None, :])
  valid = combine_masks(*parts)
  return None if valid is None else jnp.broadcast_to(valid, (B, N, S))


def prepare(name: str, query, key, value, bias=None, mask=None, *,
            dense: bool, scale=None, is_causal: bool = False,
            query_seq_lengths=None, key_value_seq_lengths=None,
            segment_ids=None, local_window_size=None) -> HeadInputs:
  """Validates attention arguments for the kernel called ``name``.

  Args:
    name: kernel name, used in error messages.
    query, key, value, bias, mask, scale, is_causal, query_seq_lengths,
      key_value_seq_lengths, segment_ids, local_window_size: as in
      :func:`attn.dot_product_attention`.
    dense: the kernel materialises ``[T, S]`` scores, so any bias, mask,
      window and segment ids are honoured. Otherwise only key padding
      (``key_value_seq_lengths`` or a mask broadcastable to ``[B, N, 1, S]``),
      query lengths and ``is_causal`` are, and the rest raise ``ValueError``.

  Returns:
    :class:`HeadInputs`.
  """
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids)
  B, T, S, N, K, H, Dv = inputs.shape
  bias_BNTS = mask_BNTS = key_valid = None
  if dense:
    smask = _structure_mask_BTS(inputs)
    mask_BNTS = combine_masks(inputs.mask,
                              None if smask is None else smask[:, None])
    if mask_BNTS is not None:
      mask_BNTS = jnp.broadcast_to(mask_BNTS, (B, N, T, S))
    if inputs.bias is not None:
      bias_BNTS = jnp.broadcast_to(inputs.bias.astype(F32), (B, N, T, S))
  else:
    unsupported = [what for what, given in (
        ("an additive bias (it needs the dense [T, S] scores)",
         inputs.bias is not None),
        ("local_window_size", inputs.window is not None),
        ("segment_ids", inputs.q_segment_ids is not None)) if given]
    if unsupported:
      raise ValueError(f"attention {name!r} does not support "
                       + ", ".join(unsupported))
    key_valid = _key_valid_BNS(name, inputs)
  query_valid = None
  if inputs.q_lengths is not None:
    query_valid = jnp.arange(T)[None, :] < inputs.q_lengths[:, None]
  group = N // K

  def heads_first(x, repeats=1):
    return jnp.transpose(jnp.repeat(x, repeats, axis=2) if repeats > 1 else x,
                         (0, 2, 1, 3))

  return HeadInputs(
      q=heads_first(inputs.query), k=heads_first(inputs.key, group),
      v=heads_first(inputs.value, group), bias=bias_BNTS, mask=mask_BNTS,
      key_valid=key_valid, query_valid=query_valid, scale=inputs.scale,
      is_causal=inputs.is_causal, dtype=inputs.query.dtype,
      squeeze_batch=inputs.squeeze_batch)


def map_heads(fn: Callable[..., Array], *args) -> Array:
  """``jax.vmap`` of a one-head function over ``[B, N]`` leading axes.

  Every argument is an array with leading ``[B, N]`` axes or ``None``.
  """
  return jax.vmap(jax.vmap(fn))(*args)


def finish(inp: HeadInputs, out_BNTD: Array) -> Array:
  """``[B, N, T, Dv]`` -> ``[B, T, N, Dv]`` in the input dtype; queries past
  ``query_seq_lengths`` output zeros."""
  out = jnp.transpose(out_BNTD, (0, 2, 1, 3))
  if inp.query_valid is not None:
    out = jnp.where(inp.query_valid[:, :, None, None], out, 0)
  out = out.astype(inp.dtype)
  return out[0] if inp.squeeze_batch else out


def key_valid_or_all(inp: HeadInputs) -> Array:
  """``inp.key_valid``, or all-True ``[B, N, S]``."""
  B, _, S, N, *_ = inp.shape
  if inp.key_valid is None:
    return jnp.ones((B, N, S), bool)
  return inp.key_valid


# Blockwise kernels run their blocks in sequential steps of about this many
# queries (per head), so one step's scores stay cache-sized whatever T is.
QUERIES_PER_STEP = 512


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


def _shift_blocks(x_C: Array, d: int, fill=0) -> Array:
  """``y[c] = x[c + d]`` along axis 0, ``fill`` where ``c + d`` is outside."""
  C = x_C.shape[0]
  if d == 0:
    return x_C
  pad = [(max(-d, 0), max(d, 0))] + [(0, 0)] * (x_C.ndim - 1)
  padded = jnp.pad(x_C, pad, constant_values=fill)
  start = max(d, 0)
  return padded[start:start + C]


def _softmax_two_parts(scores_a, mask_a, scores_b, mask_b, scale):
  """One masked float32 softmax over the concatenation of two score blocks;
  returns the weights of each part."""
  w = masked_softmax(jnp.concatenate([scores_a, scores_b], -1) * scale,
                     jnp.concatenate([mask_a, mask_b], -1))
  return w[..., :scores_a.shape[-1]], w[..., scores_a.shape[-1]:]


def _strided_head(q_LH, k_LH, v_LD, valid_L, *, stride: int, scale,
                  is_causal: bool) -> Array:
  """One head of the strided pattern on length-``L`` (multiple of l) inputs.

  Query block ``c`` sees a local part, key blocks ``c-1, c, c+1`` cut to
  ``|i - j| <= l``, and a strided part, the same residue ``i mod l`` in
  blocks ``d`` with ``|c - d| >= 2`` (closer ones are already local); one
  softmax over both.
  """
  L, H = q_LH.shape
  l = stride
  C = L // l
  k_CLH = k_LH.reshape(C, l, H)
  v_CLD = v_LD.reshape(C, l, -1)
  valid_CL = valid_L.reshape(C, l)
  offsets = (-1, 0) if is_causal else (-1, 0, 1)

  def window(x_C, fill=0):  # [C, l, ...] -> [C, len(offsets)·l, ...]
    return jnp.concatenate([_shift_blocks(x_C, d, fill) for d in offsets], 1)

  def block(c, q_lH, k_WH, v_WD, ok_W):
    pos_l = c * l + jnp.arange(l)
    pos_W = (c + offsets[0]) * l + jnp.arange(k_WH.shape[0])
    diff_lW = pos_l[:, None] - pos_W[None, :]
    local_mask = ok_W[None, :] & (jnp.abs(diff_lW) <= l)
    if is_causal:
      local_mask &= diff_lW >= 0
    local = jnp.einsum("qh,wh->qw", q_lH, k_WH, preferred_element_type=F32)
    # strided part, by residue: query (c, r) sees keys (d, r).
    strided = jnp.einsum("rh,drh->rd", q_lH, k_CLH,
                         preferred_element_type=F32)
    c_minus_d = c - jnp.arange(C)
    far_D = (c_minus_d >= 2) if is_causal else (jnp.abs(c_minus_d) >= 2)
    strided_mask = far_D[None, :] & valid_CL.T
    w_local, w_strided = _softmax_two_parts(local, local_mask, strided,
                                            strided_mask, scale)
    dt = v_LD.dtype
    return (jnp.einsum("qw,wd->qd", w_local.astype(dt), v_WD,
                       preferred_element_type=F32)
            + jnp.einsum("rd,drv->rv", w_strided.astype(dt), v_CLD,
                         preferred_element_type=F32))

  out_CLD = map_blocks(block, (jnp.arange(C), q_LH.reshape(C, l, H),
                               window(k_CLH), window(v_CLD),
                               window(valid_CL, False)), l)
  return out_CLD.reshape(L, -1)


def _fixed_head(q_LH, k_LH, v_LD, valid_L, *, stride: int, num_summary: int,
                scale, is_causal: bool) -> Array:
  """One head of the fixed pattern: own block + summary keys of the others."""
  L, H = q_LH.shape
  l, c = stride, num_summary
  C = L // l
  k_CLH = k_LH.reshape(C, l, H)
  v_CLD = v_LD.reshape(C, l, -1)
  valid_CL = valid_L.reshape(C, l)
  # summary keys: the last c positions of every block, M = C·c of them.
  k_MH = k_CLH[:, l - c:].reshape(C * c, H)
  v_MD = v_CLD[:, l - c:].reshape(C * c, -1)
  ok_M = valid_CL[:, l - c:].reshape(C * c)
  block_M = jnp.repeat(jnp.arange(C), c)

  def block(b, q_lH, k_lH, v_lD, ok_l):
    own = jnp.einsum("qh,kh->qk", q_lH, k_lH, preferred_element_type=F32)
    own_mask = jnp.broadcast_to(ok_l[None, :], (l, l))
    if is_causal:
      own_mask &= jnp.tril(jnp.ones((l, l), bool))
    summ = jnp.einsum("qh,mh->qm", q_lH, k_MH, preferred_element_type=F32)
    other_M = (block_M < b) if is_causal else (block_M != b)
    summ_mask = jnp.broadcast_to((other_M & ok_M)[None, :], summ.shape)
    w_own, w_summ = _softmax_two_parts(own, own_mask, summ, summ_mask, scale)
    dt = v_LD.dtype
    return (jnp.einsum("qk,kd->qd", w_own.astype(dt), v_lD,
                       preferred_element_type=F32)
            + jnp.einsum("qm,md->qd", w_summ.astype(dt), v_MD,
                         preferred_element_type=F32))

  out_CLD = map_blocks(block, (jnp.arange(C), q_LH.reshape(C, l, H), k_CLH,
                               v_CLD, valid_CL), l)
  return out_CLD.reshape(L, -1)


PATTERNS = ("strided", "fixed")


@register_attention(
    "sparse", exact=False, causal=True, padding=True, cross=True,
    complexity="time O(T·(l + T/l)·H) per head (O(T·(l + c·T/l)·H) fixed), "
    "O(T√T·H) with l ≈ √T; memory O(T·H) forward, O(T·(l + T/l)) backward",
    description="Sparse Transformer strided/fixed attention patterns (Child "
    "et al. 2019), blockwise")
def sparse_attention(query, key, value, bias=None, mask=None, *,
                     pattern: str = "strided", stride: int = 256,
                     num_summary: int = 1, scale=None, is_causal=False,
                     query_seq_lengths=None, key_value_seq_lengths=None,
                     segment_ids=None, local_window_size=None):
  """Softmax attention restricted to a fixed sparse pattern.

  Args:
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]``, ``N % K == 0`` (key/value heads are repeated).
    value: ``[B, S, K, Dv]``.
    bias: not supported (``ValueError``).
    mask: ``None`` or a key-padding mask broadcastable to ``[B, N, 1, S]``;
      a dense ``[.., T, S]`` mask raises ``ValueError``.
    pattern: ``"strided"`` (window ``|i-j| <= l`` ∪ ``(i-j) mod l == 0``) or
      ``"fixed"`` (own block ∪ last ``num_summary`` positions of each block).
    stride: ``l``, the block size / stride.
    num_summary: ``c``, summary positions per block (fixed pattern only).
    scale: multiplier of ``q·k``, default ``1/sqrt(H)``.
    is_causal: also require ``j <= i``.
    query_seq_lengths / key_value_seq_lengths: int ``[B]`` valid lengths.
    segment_ids / local_window_size: not supported (``ValueError``).

  Returns:
    ``[B, T, N, Dv]``, equal to exact attention under the pattern's mask.
    Cross-attention (``T != S``) uses the same pattern on aligned positions.
    Time ``O(T·(l + T/l)·H)`` per head (``O(T·(l + c·T/l)·H)`` for fixed),
    memory ``O(T·H)`` forward and ``O(T·(l + T/l))`` backward; never a dense
    ``[T, S]`` matrix.
  """
  if pattern not in PATTERNS:
    raise ValueError(f"sparse: unknown pattern {pattern!r}; choose from "
                     f"{PATTERNS}")
  if int(stride) < 1:
    raise ValueError(f"sparse: stride must be >= 1, got {stride}")
  if pattern == "fixed" and not 1 <= int(num_summary) <= int(stride):
    raise ValueError(f"sparse: num_summary must be in [1, stride={stride}], "
                     f"got {num_summary}")
  inp = prepare("sparse", query, key, value, bias, mask, dense=False,
                scale=scale, is_causal=is_causal,
                query_seq_lengths=query_seq_lengths,
                key_value_seq_lengths=key_value_seq_lengths,
                segment_ids=segment_ids, local_window_size=local_window_size)
  B, T, S, N, H, Dv = inp.shape
  L = int(np.ceil(max(T, S) / stride)) * int(stride)

  def one_head(q_TH, k_SH, v_SD, valid_S):
    args = (pad_axis0(q_TH, L), pad_axis0(k_SH, L), pad_axis0(v_SD, L),
            pad_axis0(valid_S, L, False))
    if pattern == "strided":
      out = _strided_head(*args, stride=int(stride), scale=inp.scale,
                          is_causal=inp.is_causal)
    else:
      out = _fixed_head(*args, stride=int(stride),
                        num_summary=int(num_summary), scale=inp.scale,
                        is_causal=inp.is_causal)
    return out[:T]

  return finish(inp, map_heads(one_head, inp.q, inp.k, inp.v,
                               key_valid_or_all(inp)))
