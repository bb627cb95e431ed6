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

"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np

from attn.kernels import blocks, canonical
from attn.kernels.blocks import map_blocks, pad_axis0
from attn.masks import masked_softmax
from attn import registry
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32


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
  l = stride
  C = q_LH.shape[0] // l
  k_CLH, v_CLD, valid_CL = (einops.rearrange(x, "(c l) ... -> c l ...", l=l)
                             for x in (k_LH, v_LD, valid_L))
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

  q_CLH = einops.rearrange(q_LH, "(c l) h -> c l h", l=l)
  out_CLD = map_blocks(block, (jnp.arange(C), q_CLH, window(k_CLH),
                               window(v_CLD), window(valid_CL, False)), l)
  return einops.rearrange(out_CLD, "c l d -> (c l) d")


def _fixed_head(q_LH, k_LH, v_LD, valid_L, *, stride: int, num_summary: int,
                scale, is_causal: bool) -> Array:
  """One head of the fixed pattern: own block + summary keys of the others."""
  l, c = stride, num_summary
  C = q_LH.shape[0] // l
  k_CLH, v_CLD, valid_CL = (einops.rearrange(x, "(c l) ... -> c l ...", l=l)
                             for x in (k_LH, v_LD, valid_L))
  # summary keys: the last c positions of every block, M = C·c of them.
  k_MH, v_MD, ok_M = (einops.rearrange(x[:, l - c:], "c s ... -> (c s) ...")
                      for x in (k_CLH, v_CLD, valid_CL))
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

  q_CLH = einops.rearrange(q_LH, "(c l) h -> c l h", l=l)
  out_CLD = map_blocks(block, (jnp.arange(C), q_CLH, k_CLH, v_CLD, valid_CL),
                       l)
  return einops.rearrange(out_CLD, "c l d -> (c l) d")


PATTERNS = ("strided", "fixed")


@register_attention(
    "sparse", exact=False, causal=True, padding=True, cross=True,
    complexity="time O(T·(l + T/l)·H) per head (O(T·(l + c·T/l)·H) fixed), "
    "O(T√T·H) with l ≈ √T; memory O(T·H) forward, O(T·(l + T/l)) backward",
    description="Sparse Transformer strided/fixed attention patterns (Child "
    "et al. 2019), blockwise",
    option_rules={
        "pattern": registry.choice_option(*PATTERNS),
        "stride": registry.int_option(1),
        "num_summary": registry.int_option(1)})
def sparse_attention(query, key, value, bias=None, mask=None, *,
                     pattern: str = "strided", stride: int = 256,
                     num_summary: int = 1, scale=None, is_causal=False,
                     query_seq_lengths=None, key_value_seq_lengths=None,
                     segment_ids=None, local_window_size=None):
  """Softmax attention restricted to a fixed sparse pattern.

  Args:
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]``, ``N % K == 0`` (GQA: kv heads are shared).
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
  registry.check_options(
      "sparse", pattern=pattern, stride=stride, num_summary=num_summary,
      scale=scale)
  if pattern not in PATTERNS:
    raise ValueError(f"sparse: unknown pattern {pattern!r}; choose from "
                     f"{PATTERNS}")
  if int(stride) < 1:
    raise ValueError(f"sparse: stride must be >= 1, got {stride}")
  if pattern == "fixed" and not 1 <= int(num_summary) <= int(stride):
    raise ValueError(f"sparse: num_summary must be in [1, stride={stride}], "
                     f"got {num_summary}")
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids)
  blocks.check_supported("sparse", inputs, causal=True, segments=False)
  q_valid, kv_valid = blocks.validity("sparse", inputs, per_head=True)
  B, T, S, *_ = inputs.shape
  L = int(np.ceil(max(T, S) / stride)) * int(stride)

  def one_head(q_TH, k_SH, v_SD, valid_S):
    args = (pad_axis0(q_TH, L), pad_axis0(k_SH, L), pad_axis0(v_SD, L),
            pad_axis0(valid_S, L, False))
    if pattern == "strided":
      out = _strided_head(*args, stride=int(stride), scale=inputs.scale,
                          is_causal=inputs.is_causal)
    else:
      out = _fixed_head(*args, stride=int(stride),
                        num_summary=int(num_summary), scale=inputs.scale,
                        is_causal=inputs.is_causal)
    return out[:T]

  out = blocks.map_heads(one_head, inputs.query, inputs.key, inputs.value,
                         per_head=(kv_valid,))
  return blocks.finish(out, inputs, q_valid)
