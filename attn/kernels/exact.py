"""Exact softmax attention with materialised scores (``implementation="xla"``).

The computation is written for ONE head with ``einsum`` and lifted to
``[batch, kv_heads, group]`` with three nested ``jax.vmap`` calls. Broadcast
axes of ``bias``/``mask`` (size 1) are mapped with ``in_axes=None`` so they
are never materialised at full size and their gradients are summed by vmap.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attn import masks
from attn.kernels import canonical
from attn.kernels.canonical import AttentionInputs
from attn.masks import combine_masks, masked_softmax

Array = jax.Array


def attend_one_head(q_TH: Array, k_SH: Array, v_SD: Array,
                    bias_TS: Optional[Array], mask_TS: Optional[Array],
                    keep_TS: Optional[Array], *, scale, dropout_rate: float):
  """Scaled dot-product attention for one head.

  Returns ``(out[T, Dv], weights[T, S])``; weights are pre-dropout float32.
  """
  scores_TS = jnp.einsum("th,sh->ts", q_TH, k_SH,
                         preferred_element_type=jnp.float32)
  scores_TS = scores_TS * jnp.asarray(scale, jnp.float32)
  if bias_TS is not None:
    scores_TS = scores_TS + bias_TS.astype(jnp.float32)
  weights_TS = masked_softmax(scores_TS, mask_TS)
  probs_TS = weights_TS
  if keep_TS is not None:
    probs_TS = jnp.where(keep_TS, probs_TS / (1.0 - dropout_rate), 0.0)
  out_TD = jnp.einsum("ts,sd->td", probs_TS.astype(v_SD.dtype), v_SD,
                      preferred_element_type=jnp.float32)
  return out_TD.astype(v_SD.dtype), weights_TS


def _group_heads(x: Optional[Array], K: int, G: int):
  """[b, n, t, s] -> ([b, K|1, G|1, t, s], batch_axis, kvhead_axis, group_axis).

  Axes of size 1 are squeezed and mapped with ``None``.
  """
  if x is None:
    return None, None, None, None
  b, n = x.shape[0], x.shape[1]
  if n == 1:
    x = x[:, 0]                       # [b, t, s]
    hk = hg = None
  else:
    x = x.reshape((b, K, G) + x.shape[2:])
    hk, hg = 0, 0                     # after batch axis removed: [K, G, t, s]
  if b == 1:
    x = x[0]
    bax = None
  else:
    bax = 0
  return x, bax, hk, hg


def xla_attention(inputs: AttentionInputs, *, dropout_rate: float = 0.0,
                  dropout_rng=None, broadcast_dropout: bool = False,
                  return_weights: bool = False):
  """Exact attention with the full ``[T, S]`` score matrix per head.

  Returns ``out[B, T, N, Dv]`` or ``(out, weights[B, N, T, S])``.
  """
  canonical.check_dropout(dropout_rate, dropout_rng)
  B, T, S, N, K, H, Dv = inputs.shape
  G = N // K
  q = inputs.query.reshape(B, T, K, G, H)
  bias, b_bax, b_hk, b_hg = _group_heads(inputs.bias, K, G)
  mask, m_bax, m_hk, m_hg = _group_heads(inputs.mask, K, G)
  keep = None
  k_bax = k_hk = k_hg = None
  if dropout_rate > 0.0:
    keep = masks.dropout_keep(dropout_rng, dropout_rate, (B, N, T, S),
                               (0, 1) if broadcast_dropout else ())
    keep, k_bax, k_hk, k_hg = _group_heads(keep, K, G)

  def one(q_TH, k_SH, v_SD, bias_TS, mask_TS, keep_TS, smask_TS):
    return attend_one_head(q_TH, k_SH, v_SD, bias_TS,
                           combine_masks(mask_TS, smask_TS), keep_TS,
                           scale=inputs.scale, dropout_rate=dropout_rate)

  # group axis: query heads sharing one key/value head.
  over_group = jax.vmap(one, in_axes=(1, None, None, b_hg, m_hg, k_hg, None),
                        out_axes=(1, 0))
  # key/value head axis.
  over_kv = jax.vmap(over_group, in_axes=(1, 1, 1, b_hk, m_hk, k_hk, None),
                     out_axes=(1, 0))

  def per_example(q_TKGH, k_SKH, v_SKD, bias_x, mask_x, keep_x, qlen, kvlen,
                  qseg, kvseg):
    smask = masks.structure_mask(
        jnp.arange(T), jnp.arange(S), is_causal=inputs.is_causal,
        window=inputs.window, q_length=qlen, kv_length=kvlen,
        q_segment=qseg, kv_segment=kvseg)
    return over_kv(q_TKGH, k_SKH, v_SKD, bias_x, mask_x, keep_x, smask)

  over_batch = jax.vmap(
      per_example, in_axes=(0, 0, 0, b_bax, m_bax, k_bax, 0, 0, 0, 0))
  out, weights = over_batch(q, inputs.key, inputs.value, bias, mask, keep,
                            inputs.q_lengths, inputs.kv_lengths,
                            inputs.q_segment_ids, inputs.kv_segment_ids)
  out = out.reshape(B, T, N, Dv)
  if return_weights:
    return out, weights.reshape(B, N, T, S)
  return out
