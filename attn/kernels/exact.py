"""Exact softmax attention: THE exact kernel.

* :func:`dot_product_attention` (exported as ``attn.dot_product_attention``)
  is the public entry point, a superset of ``jax.nn.dot_product_attention``;
  it canonicalises its arguments (:mod:`attn.kernels.canonical`) and
  dispatches to one implementation:

  - ``"xla"``: the materialised ``[T, S]`` scores, below. The math is
    written for ONE head with ``einsum`` (:func:`attend_one_head`) and lifted
    to ``[batch, kv_heads, group]`` with three nested ``jax.vmap`` calls.
    Broadcast axes of ``bias``/``mask`` (size 1) are mapped with
    ``in_axes=None`` so they are never materialised at full size and their
    gradients are summed by vmap.
  - ``"chunked"``: the blockwise online-softmax kernel,
    :mod:`attn.kernels.chunked` (O(T) memory).
  - ``"cudnn"``: ``jax.nn``'s cuDNN flash attention (NVIDIA GPU, bf16/fp16).
  - ``None``: chosen automatically (:func:`auto_implementations`).

* The registry entries ``softmax`` (automatic), ``xla`` and ``cudnn``; the
  ``chunked`` entry lives beside its kernel.

Masking (structure masks, combining, the masked float32 softmax) is
:mod:`attn.masks`. Shape letters as in :mod:`attn.kernels`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import einops
import jax
import jax.numpy as jnp

from attn import masks
from attn.kernels import canonical
from attn.kernels.canonical import AttentionInputs
from attn.kernels.chunked import chunked_attention
from attn.masks import combine_masks, masked_softmax
from attn.registry import register_attention

Array = jax.Array

IMPLEMENTATIONS = ("xla", "chunked", "cudnn")
# `implementation=None` switches to the blockwise kernel from this many keys
# on (see the README's benchmark table for where it starts to win).
CHUNKED_MIN_LENGTH = 1024


# ----------------------------------------------------------------------------
# The XLA path: materialised scores.

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
    x = einops.rearrange(x, "b (k g) t s -> b k g t s", k=K)
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
  q = einops.rearrange(inputs.query, "b t (k g) h -> b t k g h", k=K)
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
  out = einops.rearrange(out, "b t k g d -> b t (k g) d")
  if return_weights:
    return out, einops.rearrange(weights, "b k g t s -> b (k g) t s")
  return out


# ----------------------------------------------------------------------------
# Implementation dispatch and the public entry point.


def _cudnn(inputs: canonical.AttentionInputs, *, dropout_rate, return_weights,
           **_):
  """Delegates to jax.nn's cuDNN flash attention, or raises ValueError."""
  platform = jax.devices()[0].platform
  if platform != "gpu":
    raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU; the "
                     f"default device here is {platform!r}")
  B, T, S, N, K, H, Dv = inputs.shape
  unsupported = []
  if inputs.q_segment_ids is not None:
    unsupported.append("segment_ids")
  if dropout_rate > 0:
    unsupported.append("dropout")
  if return_weights:
    unsupported.append("return_weights")
  if Dv != H:
    unsupported.append(f"value head_dim {Dv} != query head_dim {H}")
  if inputs.query.dtype not in (jnp.bfloat16, jnp.float16):
    unsupported.append(f"dtype {inputs.query.dtype} (cuDNN needs bf16/fp16)")
  if unsupported:
    raise ValueError("implementation='cudnn' does not support: "
                     + ", ".join(unsupported))
  try:
    return jax.nn.dot_product_attention(
        inputs.query, inputs.key, inputs.value, bias=inputs.bias,
        mask=inputs.mask, scale=inputs.scale, is_causal=inputs.is_causal,
        query_seq_lengths=inputs.q_lengths,
        key_value_seq_lengths=inputs.kv_lengths,
        local_window_size=inputs.window, implementation="cudnn")
  except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
    raise ValueError(f"implementation='cudnn' is unavailable: {e}") from e


def _chunked(inputs: canonical.AttentionInputs, *, dropout_rate, return_weights,
             block_q=None, block_k=None, **_):
  """Blockwise online-softmax kernel; no dropout, no weights."""
  if dropout_rate > 0:
    raise ValueError("implementation='chunked' does not support dropout on "
                     "attention weights; use implementation='xla'")
  if return_weights:
    raise ValueError("implementation='chunked' never materialises the "
                     "weights; use implementation='xla' with "
                     "return_weights=True")
  return chunked_attention(inputs, block_q=block_q, block_k=block_k)


def _xla(inputs, *, dropout_rate, dropout_rng, broadcast_dropout,
         return_weights, **_):
  """Materialised-scores kernel; supports every option."""
  return xla_attention(inputs, dropout_rate=dropout_rate,
                       dropout_rng=dropout_rng,
                       broadcast_dropout=broadcast_dropout,
                       return_weights=return_weights)


_DISPATCH = {"xla": _xla, "chunked": _chunked, "cudnn": _cudnn}


def auto_implementations(inputs: canonical.AttentionInputs, *, dropout_rate,
                         return_weights) -> list[str]:
  """The order ``implementation=None`` tries: cuDNN on GPU, then ours."""
  order = []
  if jax.devices()[0].platform == "gpu":
    order.append("cudnn")
  B, T, S, *_ = inputs.shape
  if (S >= CHUNKED_MIN_LENGTH and T >= 128 and dropout_rate == 0
      and not return_weights):
    order.append("chunked")
  order.append("xla")
  return order


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Optional[Array] = None,
    mask: Optional[Array] = None,
    *,
    scale: Optional[float] = None,
    is_causal: bool = False,
    query_seq_lengths: Optional[Array] = None,
    key_value_seq_lengths: Optional[Array] = None,
    local_window_size: Union[int, tuple[int, int], None] = None,
    segment_ids=None,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[Array] = None,
    broadcast_dropout: bool = False,
    return_weights: bool = False,
    implementation: Union[str, Sequence[str], None] = None,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
):
  """Exact scaled dot-product attention, a superset of ``jax.nn``'s.

  ``out = softmax(scale · q kᵀ + bias, masked) v`` for each head.

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]`` with ``N % K == 0`` (GQA/MQA when ``K < N``).
    value: ``[B, S, K, Dv]``; ``Dv`` may differ from ``H``.
    bias: added to the scores; any rank <= 4 broadcastable to ``[B,N,T,S]``.
    mask: boolean, True = may attend; broadcastable to ``[B, N, T, S]``.
    scale: defaults to ``1/sqrt(H)``.
    is_causal: query ``t`` attends keys ``s <= t``.
    query_seq_lengths: int32 ``[B]``; queries past it output zeros.
    key_value_seq_lengths: int32 ``[B]``; keys past it are ignored.
    local_window_size: ``w`` or ``(left, right)``: ``t-left <= s <= t+right``.
    segment_ids: int ``[B, T]`` (self-attention) or a pair ``([B,T], [B,S])``;
      tokens attend only within their own segment (packed sequences).
    dropout_rate: dropout on the attention weights (``xla`` only).
    dropout_rng: PRNG key, required when ``dropout_rate > 0``.
    broadcast_dropout: share the dropout mask across batch and heads.
    return_weights: also return the (pre-dropout) weights ``[B, N, T, S]``.
    implementation: ``"xla"`` (materialised scores), ``"chunked"``
      (blockwise online softmax, O(T) memory), ``"cudnn"`` (jax.nn's cuDNN
      kernel, GPU only), ``None`` (automatic) or a sequence tried in order.
    block_q / block_k: block sizes for ``"chunked"``.

  Returns:
    ``[B, T, N, Dv]`` in the input dtype, or ``(out, weights)``.

  A query row with no key to attend to returns zeros (jax.nn returns the
  mean of the values there) and has zero, finite gradients. Softmax is always
  computed in float32.

  Raises:
    ValueError: bad shapes/dtypes, unknown implementation names, or an
      implementation that cannot serve the requested options.
  """
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids)
  canonical.check_dropout(dropout_rate, dropout_rng)
  if implementation is None:
    order = auto_implementations(inputs, dropout_rate=dropout_rate,
                                 return_weights=return_weights)
  elif isinstance(implementation, str):
    order = [implementation]
  else:
    order = list(implementation)
  unknown = [name for name in order if name not in _DISPATCH]
  if not order or unknown:
    raise ValueError(f"unknown implementation(s) {unknown or order!r}; choose "
                     f"from {IMPLEMENTATIONS}, None, or a non-empty list of "
                     "them")
  errors = []
  for name in order:
    try:
      result = _DISPATCH[name](
          inputs, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
          broadcast_dropout=broadcast_dropout, return_weights=return_weights,
          block_q=block_q, block_k=block_k)
    except ValueError as e:
      if len(order) == 1:
        raise
      errors.append(f"{name}: {e}")
      continue
    if inputs.squeeze_batch:
      return (result[0][0], result[1][0]) if return_weights else result[0]
    return result
  raise ValueError("no attention implementation could run: "
                   + "; ".join(errors))


# ----------------------------------------------------------------------------
# Registry entries. (Each signature says what the entry supports: ``softmax``
# and ``xla`` take every option of :func:`dot_product_attention`; ``cudnn``
# lists only the arguments it can honour, so the Flax wrapper refuses dropout
# for it and sows no weights.)


@register_attention(
    "softmax", aliases=("exact", "dot_product", "scaled_dot_product"),
    exact=True, complexity="time O(T·S), memory O(T·S) (xla) / O(T) (chunked)",
    description="exact scaled dot-product attention, implementation chosen "
    "automatically (cuDNN on GPU, chunked for long sequences, else xla)")
def softmax_attention(query, key, value, bias=None, mask=None, *,
                      implementation=None, block_q=None, block_k=None,
                      scale=None, **kwargs):
  """Exact softmax attention; see :func:`attn.dot_product_attention`.

  ``query [B, T, N, H]``, ``key [B, S, K, H]``, ``value [B, S, K, Dv]``
  (``N`` a multiple of ``K``) -> ``[B, T, N, Dv]``.
  """
  return dot_product_attention(query, key, value, bias, mask, scale=scale,
                               implementation=implementation, block_q=block_q,
                               block_k=block_k, **kwargs)


@register_attention(
    "xla", exact=True, complexity="time O(T·S), memory O(T·S)",
    description="exact attention with the materialised [T, S] score matrix")
def xla_attention_kernel(query, key, value, bias=None, mask=None, *,
                         scale=None, **kwargs):
  """Exact attention, ``implementation="xla"``; takes every option.

  ``query [B, T, N, H]``, ``key [B, S, K, H]``, ``value [B, S, K, Dv]``
  (``N`` a multiple of ``K``) -> ``[B, T, N, Dv]``.
  """
  return dot_product_attention(query, key, value, bias, mask, scale=scale,
                               implementation="xla", **kwargs)


@register_attention(
    "cudnn", exact=True, complexity="time O(T·S), memory O(T)",
    description="jax.nn's cuDNN flash attention (NVIDIA GPU, bf16/fp16)")
def cudnn_attention_kernel(query, key, value, bias=None, mask=None, *,
                           scale=None, is_causal=False, query_seq_lengths=None,
                           key_value_seq_lengths=None,
                           local_window_size=None):
  """Exact attention through cuDNN, ``implementation="cudnn"``.

  Raises ``ValueError`` off NVIDIA GPUs and for fp32 inputs.

  ``query [B, T, N, H]``, ``key [B, S, K, H]``, ``value [B, S, K, Dv]``
  (``N`` a multiple of ``K``) -> ``[B, T, N, Dv]``.
  """
  return dot_product_attention(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, implementation="cudnn")
