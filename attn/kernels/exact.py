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

import inspect
from typing import Optional, Sequence, Union

import einops
import jax
import jax.numpy as jnp

from attn import masks
from attn.kernels import canonical
from attn.kernels.canonical import AttentionInputs
from attn.kernels import pallas as pallas_kernels
from attn.kernels import tokamax_adapter
from attn.kernels.chunked import chunked_attention
from attn.masks import combine_masks, masked_softmax
from attn.registry import register_attention

Array = jax.Array

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "pallas", "tokamax")
# `implementation=None` switches to the blockwise kernel from this many keys
# on (see the README's benchmark table for where it starts to win).
CHUNKED_MIN_LENGTH = 1024


# ----------------------------------------------------------------------------
# The XLA path: materialised scores.

def _einsum(spec, a, b, *, precision=None, dot_general=None):
  """``jnp.einsum`` accumulating in at least float32, with Flax's
  ``precision`` and ``einsum_dot_general`` honoured."""
  acc = jnp.promote_types(a.dtype, jnp.float32)
  return jnp.einsum(spec, a, b, precision=precision,
                    preferred_element_type=acc,
                    _dot_general=dot_general or jax.lax.dot_general)


def soft_cap(scores: Array, cap: Optional[float]) -> Array:
  """``cap · tanh(scores / cap)`` (Gemma 2 logit soft-capping); identity
  for ``cap=None``."""
  if cap is None:
    return scores
  cap = jnp.asarray(cap, scores.dtype)
  return cap * jnp.tanh(scores / cap)


def finish_scores(scores, bias, mask, *, logits_soft_cap):
  """Soft cap, bias, and the ``-inf`` rule shared by both XLA paths.

  Order: ``c·tanh(scale·q·k / c) + bias``: the cap bounds the content
  scores only, so an additive padding mask in ``bias`` (``-1e9``, ``-inf``)
  keeps masking. Scores that are ``-inf`` after the bias count as masked
  (a row of ``bias=-inf`` is a fully masked row: zeros, finite gradients).
  Returns ``(scores, mask)``.
  """
  scores = soft_cap(scores, logits_soft_cap)
  if bias is not None:
    scores = scores + bias.astype(scores.dtype)
    mask = combine_masks(mask, scores != -jnp.inf)
  return scores, mask


def log_sum_exp(scores, mask):
  """jax.nn's residual: ``logsumexp`` over the keys of the scores with masked
  entries replaced by :data:`attn.masks.MASK_VALUE` (so a fully masked row
  gives about ``MASK_VALUE``); no gradient flows through it."""
  scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
  if mask is not None:
    scores = jnp.where(mask, scores, masks.MASK_VALUE)
  return jax.lax.stop_gradient(jax.nn.logsumexp(scores, axis=-1))


def attend_one_head(q_TH: Array, k_SH: Array, v_SD: Array,
                    bias_TS: Optional[Array], mask_TS: Optional[Array],
                    keep_TS: Optional[Array], *, scale, dropout_rate: float,
                    precision=None, dot_general=None,
                    logits_soft_cap: Optional[float] = None):
  """Scaled dot-product attention for one head.

  Returns ``(out[T, Dv], weights[T, S], lse[T])``; weights are pre-dropout
  float32 (float64 for float64 inputs), ``lse`` the log-sum-exp of the
  masked scores.
  """
  scores_TS = _einsum("th,sh->ts", q_TH, k_SH, precision=precision,
                      dot_general=dot_general)
  scores_TS = scores_TS * jnp.asarray(scale, scores_TS.dtype)
  scores_TS, mask_TS = finish_scores(scores_TS, bias_TS, mask_TS,
                                     logits_soft_cap=logits_soft_cap)
  weights_TS = masked_softmax(scores_TS, mask_TS)
  probs_TS = weights_TS
  if keep_TS is not None:
    probs_TS = jnp.where(keep_TS, probs_TS / (1.0 - dropout_rate), 0.0)
  out_TD = _einsum("ts,sd->td", probs_TS.astype(v_SD.dtype), v_SD,
                   precision=precision, dot_general=dot_general)
  return (out_TD.astype(v_SD.dtype), weights_TS,
          log_sum_exp(scores_TS, mask_TS))


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


def _dropout_keep(inputs, dropout_rate, dropout_rng, broadcast_dropout):
  B, T, S, N, *_ = inputs.shape
  if dropout_rate <= 0.0:
    return None
  return masks.dropout_keep(dropout_rng, dropout_rate, (B, N, T, S),
                            (0, 1) if broadcast_dropout else ())


def _structure_masks(inputs) -> Optional[Array]:
  """``[B, 1, T, S]`` structure mask (causal/window/lengths/segments)."""
  B, T, S, *_ = inputs.shape
  if not inputs.has_structure_mask:
    return None

  def one(qlen, kvlen, qseg, kvseg):
    return masks.structure_mask(
        jnp.arange(T), jnp.arange(S), is_causal=inputs.is_causal,
        window=inputs.window, q_length=qlen, kv_length=kvlen,
        q_segment=qseg, kv_segment=kvseg)

  return jax.vmap(one)(inputs.q_lengths, inputs.kv_lengths,
                       inputs.q_segment_ids, inputs.kv_segment_ids)[:, None]


def xla_attention_custom_einsums(inputs: AttentionInputs, qk_einsum,
                                 pv_einsum, *, dropout_rate: float = 0.0,
                                 dropout_rng=None,
                                 broadcast_dropout: bool = False):
  """The XLA path with caller-supplied einsums (Flax's
  ``qk_attn_weights_einsum`` / ``attn_weights_value_einsum``, e.g. quantised
  ones), called exactly as Flax calls them: once each on the whole batch,
  ``qk_einsum('...qhd,...khd->...hqk', query * scale, key)`` and
  ``pv_einsum('...hqk,...khd->...qhd', probs, value)`` (key/value heads
  repeated for grouped-query attention).

  Returns ``(out[B, T, N, Dv], weights[B, N, T, S], lse[B, N, T])``.
  """
  B, T, S, N, K, H, Dv = inputs.shape
  G = N // K
  k = jnp.repeat(inputs.key, G, axis=2) if G > 1 else inputs.key
  v = jnp.repeat(inputs.value, G, axis=2) if G > 1 else inputs.value
  q = inputs.query * jnp.asarray(inputs.scale, inputs.query.dtype)
  scores = qk_einsum("...qhd,...khd->...hqk", q, k)
  scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
  scores, mask = finish_scores(scores, inputs.bias,
                               combine_masks(inputs.mask,
                                             _structure_masks(inputs)),
                               logits_soft_cap=inputs.logits_soft_cap)
  weights = masked_softmax(scores, mask)
  probs = weights
  keep = _dropout_keep(inputs, dropout_rate, dropout_rng, broadcast_dropout)
  if keep is not None:
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  out = pv_einsum("...hqk,...khd->...qhd", probs.astype(v.dtype), v)
  return out.astype(v.dtype), weights, log_sum_exp(scores, mask)


def xla_attention(inputs: AttentionInputs, *, dropout_rate: float = 0.0,
                  dropout_rng=None, broadcast_dropout: bool = False,
                  return_weights: bool = False, return_residual: bool = False,
                  einsum_dot_general=None):
  """Exact attention with the full ``[T, S]`` score matrix per head.

  Returns ``out[B, T, N, Dv]``, with ``return_weights`` also
  ``weights[B, N, T, S]`` and with ``return_residual`` also
  ``lse[B, T, N]`` (float32), in that order.
  ``inputs.precision`` and ``einsum_dot_general`` go to both einsums.
  """
  canonical.check_dropout(dropout_rate, dropout_rng)
  B, T, S, N, K, H, Dv = inputs.shape
  G = N // K
  q = einops.rearrange(inputs.query, "b t (k g) h -> b t k g h", k=K)
  bias, b_bax, b_hk, b_hg = _group_heads(inputs.bias, K, G)
  mask, m_bax, m_hk, m_hg = _group_heads(inputs.mask, K, G)
  keep = _dropout_keep(inputs, dropout_rate, dropout_rng, broadcast_dropout)
  k_bax = k_hk = k_hg = None
  if keep is not None:
    keep, k_bax, k_hk, k_hg = _group_heads(keep, K, G)

  def one(q_TH, k_SH, v_SD, bias_TS, mask_TS, keep_TS, smask_TS):
    return attend_one_head(q_TH, k_SH, v_SD, bias_TS,
                           combine_masks(mask_TS, smask_TS), keep_TS,
                           scale=inputs.scale, dropout_rate=dropout_rate,
                           precision=inputs.precision,
                           dot_general=einsum_dot_general,
                           logits_soft_cap=inputs.logits_soft_cap)

  # group axis: query heads sharing one key/value head.
  over_group = jax.vmap(one, in_axes=(1, None, None, b_hg, m_hg, k_hg, None),
                        out_axes=(1, 0, 0))
  # key/value head axis.
  over_kv = jax.vmap(over_group, in_axes=(1, 1, 1, b_hk, m_hk, k_hk, None),
                     out_axes=(1, 0, 0))

  def per_example(q_TKGH, k_SKH, v_SKD, bias_x, mask_x, keep_x, qlen, kvlen,
                  qseg, kvseg):
    smask = masks.structure_mask(
        jnp.arange(T), jnp.arange(S), is_causal=inputs.is_causal,
        window=inputs.window, q_length=qlen, kv_length=kvlen,
        q_segment=qseg, kv_segment=kvseg)
    return over_kv(q_TKGH, k_SKH, v_SKD, bias_x, mask_x, keep_x, smask)

  over_batch = jax.vmap(
      per_example, in_axes=(0, 0, 0, b_bax, m_bax, k_bax, 0, 0, 0, 0))
  out, weights, lse = over_batch(q, inputs.key, inputs.value, bias, mask,
                                 keep, inputs.q_lengths, inputs.kv_lengths,
                                 inputs.q_segment_ids, inputs.kv_segment_ids)
  result = (einops.rearrange(out, "b t k g d -> b t (k g) d"),)
  if return_weights:
    result += (einops.rearrange(weights, "b k g t s -> b (k g) t s"),)
  if return_residual:
    result += (einops.rearrange(lse, "b k g t -> b t (k g)"),)
  return result[0] if len(result) == 1 else result


# ----------------------------------------------------------------------------
# Implementation dispatch and the public entry point.


def _cudnn(inputs: canonical.AttentionInputs, *, dropout_rate, return_weights,
           return_residual=False, einsums=None, einsum_dot_general=None, **_):
  """Delegates to jax.nn's cuDNN flash attention, or raises ValueError."""
  platform = jax.devices()[0].platform
  if platform != "gpu":
    raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU; the "
                     f"default device here is {platform!r}")
  unsupported = _cudnn_missing(
      inputs, dropout_rate=dropout_rate, return_weights=return_weights,
      custom_einsums=bool(einsums) or einsum_dot_general is not None)
  if unsupported:
    raise ValueError("implementation='cudnn' does not support: "
                     + ", ".join(unsupported))
  try:
    return jax.nn.dot_product_attention(
        inputs.query, inputs.key, inputs.value, bias=inputs.bias,
        mask=inputs.mask, scale=inputs.scale, is_causal=inputs.is_causal,
        query_seq_lengths=inputs.q_lengths,
        key_value_seq_lengths=inputs.kv_lengths,
        local_window_size=inputs.window, implementation="cudnn",
        return_residual=return_residual)
  except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
    raise ValueError(f"implementation='cudnn' is unavailable: {e}") from e


def _chunked(inputs: canonical.AttentionInputs, *, dropout_rate, dropout_rng,
             broadcast_dropout, return_weights, return_residual=False,
             block_q=None, block_k=None, einsums=None,
             einsum_dot_general=None):
  """Blockwise online-softmax kernel.

  Weights need the ``[T, S]`` matrix, so ``return_weights=True`` (Flax's
  ``sow_weights=True``) runs the materialised XLA path for that call.
  """
  if einsums or einsum_dot_general is not None:
    raise ValueError(
        "implementation='chunked' cannot honour einsum_dot_general / "
        "qk_attn_weights_einsum / attn_weights_value_einsum; only "
        "implementation='xla' (attention 'xla' or 'softmax') does")
  if return_weights:
    return _xla(inputs, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                broadcast_dropout=broadcast_dropout, return_weights=True,
                return_residual=return_residual)
  result = chunked_attention(inputs, block_q=block_q, block_k=block_k,
                             dropout_rate=dropout_rate,
                             dropout_rng=dropout_rng,
                             broadcast_dropout=broadcast_dropout,
                             return_residual=return_residual)
  if return_residual:
    out, lse = result
    return out, masks.residual_lse(lse, inputs.key.dtype)  # as jax.nn
  return result


def _xla(inputs, *, dropout_rate, dropout_rng, broadcast_dropout,
         return_weights, return_residual=False, einsums=None,
         einsum_dot_general=None, **_):
  """Materialised-scores kernel; supports every option."""
  if einsums:
    out, weights, lse = xla_attention_custom_einsums(
        inputs, *einsums, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        broadcast_dropout=broadcast_dropout)
    result = (out,)
    if return_weights:
      result += (weights,)
    if return_residual:
      result += (einops.rearrange(lse, "b n t -> b t n"),)
    return result[0] if len(result) == 1 else result
  return xla_attention(inputs, dropout_rate=dropout_rate,
                       dropout_rng=dropout_rng,
                       broadcast_dropout=broadcast_dropout,
                       return_weights=return_weights,
                       return_residual=return_residual,
                       einsum_dot_general=einsum_dot_general)


_DISPATCH = {"xla": _xla, "chunked": _chunked, "cudnn": _cudnn,
             "pallas": pallas_kernels.pallas_attention,
             "tokamax": tokamax_adapter.tokamax_attention}


def _platform() -> str:
  """The default device's platform (tests mock this)."""
  return jax.devices()[0].platform


def _cudnn_missing(inputs, *, dropout_rate, return_weights,
                   custom_einsums=False) -> list[str]:
  """What jax.nn's cuDNN kernel cannot serve of this call (empty: all of
  it); both :func:`_cudnn` and the automatic order ask this."""
  H, Dv = inputs.shape[5:]
  return [name for name, bad in (
      ("segment_ids", inputs.q_segment_ids is not None),
      ("dropout", dropout_rate > 0), ("return_weights", return_weights),
      ("logits_soft_cap", inputs.logits_soft_cap is not None),
      ("precision / einsum_dot_general / custom einsums (only "
       "implementation='xla' honours them)",
       inputs.precision is not None or custom_einsums),
      (f"value head_dim {Dv} != query head_dim {H}", Dv != H),
      (f"dtype {inputs.query.dtype} (cuDNN needs bf16/fp16)",
       inputs.query.dtype not in (jnp.bfloat16, jnp.float16))) if bad]


def _cudnn_reason(inputs, platform, *, dropout_rate, return_weights):
  """Why the automatic choice skips cuDNN (None: it is tried)."""
  if platform != "gpu":
    return f"needs an NVIDIA GPU (platform is {platform!r})"
  what = _cudnn_missing(inputs, dropout_rate=dropout_rate,
                        return_weights=return_weights)
  return "cannot serve: " + ", ".join(what) if what else None


def implementation_order(query, key, value, bias=None, mask=None, *,
                         dropout_rate: float = 0.0,
                         return_weights: bool = False,
                         platform: Optional[str] = None,
                         **kwargs) -> list[tuple[str, Optional[str]]]:
  """What ``implementation=None`` does for these arguments, and why.

  Takes the arguments of :func:`dot_product_attention`. Returns
  ``[(name, reason), ...]`` for every candidate in preference order (GPU:
  cudnn, pallas, chunked, xla; TPU: pallas, chunked, xla; else chunked, xla):
  ``reason`` is ``None`` for the ones tried, in that order, and otherwise
  says why that one is skipped. ``platform`` defaults to the default device's.
  """
  inputs = canonical.canonicalize(query, key, value, bias, mask, **kwargs)
  return _order_with_reasons(inputs, dropout_rate=dropout_rate,
                             return_weights=return_weights,
                             platform=platform or _platform())


def _order_with_reasons(inputs, *, dropout_rate, return_weights, platform):
  B, T, S, *_ = inputs.shape
  order = []
  if platform == "gpu":
    order.append(("cudnn", _cudnn_reason(inputs, platform,
                                         dropout_rate=dropout_rate,
                                         return_weights=return_weights)))
  if platform in ("gpu", "tpu"):
    order.append(("pallas", pallas_kernels.unsupported(
        inputs, dropout_rate=dropout_rate, return_weights=return_weights,
        platform=platform)))
  if dropout_rate > 0 or return_weights:
    chunked_why = "dropout / return_weights need the materialised scores"
  elif S < CHUNKED_MIN_LENGTH or T < 128:
    chunked_why = (f"short sequence (T={T}, S={S}; chunked from "
                   f"S >= {CHUNKED_MIN_LENGTH}, T >= 128)")
  else:
    chunked_why = None
  order.append(("chunked", chunked_why))
  order.append(("xla", None))
  return order


def auto_implementations(inputs: canonical.AttentionInputs, *, dropout_rate,
                         return_weights, custom_einsums=False) -> list[str]:
  """The order ``implementation=None`` tries: cuDNN on GPU, then ours."""
  if custom_einsums:
    return ["xla"]
  return [name for name, why in _order_with_reasons(
      inputs, dropout_rate=dropout_rate, return_weights=return_weights,
      platform=_platform()) if why is None]


def _check_einsums(precision, einsum_dot_general, qk_einsum, pv_einsum):
  """Flax's rules for its einsum arguments (ValueError as Flax raises)."""
  if bool(qk_einsum) != bool(pv_einsum):
    raise ValueError("qk_attn_weights_einsum and attn_weights_value_einsum "
                     "must be specified together")
  if (precision or einsum_dot_general) and (qk_einsum or pv_einsum):
    raise ValueError("precision/einsum_dot_general and qk_attn_weights_einsum"
                     "/attn_weights_value_einsum are mutually exclusive; "
                     "give only one of them")
  return (qk_einsum, pv_einsum) if qk_einsum else None


def _empty_result(inputs, *, return_weights, return_residual):
  """Output for zero-sized shapes (no batch, queries or heads; no keys)."""
  B, T, S, N, K, H, Dv = inputs.shape
  dtype = inputs.query.dtype
  result = (jnp.zeros((B, T, N, Dv), dtype),)
  if return_weights:
    result += (jnp.zeros((B, N, T, S), jnp.float32),)
  if return_residual:
    result += (jnp.full((B, T, N), -jnp.inf, jnp.float32),)
  return result


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
    return_residual: bool = False,
    logits_soft_cap: Optional[float] = None,
    precision=None,
    einsum_dot_general=None,
    qk_attn_weights_einsum=None,
    attn_weights_value_einsum=None,
    implementation: Union[str, Sequence[str], None] = None,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
):
  """Exact scaled dot-product attention, a superset of ``jax.nn``'s.

  ``out = softmax(cap(scale · q kᵀ) + bias, masked) v`` for each head.

  Args:
    query: ``[*B, T, N, H]``, any number of leading batch axes (none:
      ``[T, N, H]``).
    key: ``[*B, S, K, H]`` with ``N % K == 0`` (GQA/MQA when ``K < N``).
    value: ``[*B, S, K, Dv]``; ``Dv`` may differ from ``H``.
    bias: added to the scores; broadcastable to ``[*B, N, T, S]``. Entries
      of ``-inf`` are masked (a row of them outputs zeros).
    mask: boolean, True = may attend; broadcastable to ``[*B, N, T, S]``.
    scale: defaults to ``1/sqrt(H)``.
    is_causal: query ``t`` attends keys ``s <= t``.
    query_seq_lengths: int ``[*B]``; queries past it output zeros.
    key_value_seq_lengths: int ``[*B]``; keys past it are ignored.
    local_window_size: ``w`` or ``(left, right)``: ``t-left <= s <= t+right``.
    segment_ids: int ``[*B, T]`` (self-attention) or a pair
      ``([*B, T], [*B, S])``; tokens attend only within their own segment.
    dropout_rate: dropout on the attention weights.
    dropout_rng: PRNG key, required when ``dropout_rate > 0``.
    broadcast_dropout: share the dropout mask across batch and heads.
    return_weights: also return the (pre-dropout) float32 weights
      ``[*B, N, T, S]``.
    return_residual: also return ``lse[*B, T, N]`` in the input dtype, as
      jax.nn: the log-sum-exp over keys of the masked scores (masked entries
      count as :data:`attn.masks.MASK_VALUE`); no gradient flows through it.
    logits_soft_cap: ``c > 0``: scores ``scale·q·k`` become
      ``c·tanh(scale·q·k / c)`` (Gemma 2), before bias and masks.
    precision: ``jax.lax.Precision`` for every einsum (xla, chunked).
    einsum_dot_general: the ``dot_general`` of both einsums (xla only).
    qk_attn_weights_einsum / attn_weights_value_einsum: Flax's custom
      einsums, given together, called as Flax calls them (xla only; mutually
      exclusive with ``precision``/``einsum_dot_general``).
    implementation: ``"xla"`` (materialised scores), ``"chunked"``
      (blockwise online softmax, O(T) memory; with ``return_weights`` it
      runs ``"xla"`` for that call), ``"cudnn"`` (jax.nn's cuDNN kernel, GPU
      only), ``None`` (automatic) or a sequence tried in order.
    block_q / block_k: block sizes for ``"chunked"``.

  Returns:
    ``[*B, T, N, Dv]`` in the input dtype, or a tuple
    ``(out, weights)``, ``(out, lse)`` or ``(out, weights, lse)``.

  A query row with no key to attend to returns zeros (jax.nn returns the
  mean of the values there) and has zero, finite gradients. Softmax is always
  computed in (at least) float32.

  Raises:
    ValueError: bad shapes/dtypes, unknown implementation names, or an
      implementation that cannot serve the requested options.
  """
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids,
      precision=precision, logits_soft_cap=logits_soft_cap)
  canonical.check_dropout(dropout_rate, dropout_rng)
  einsums = _check_einsums(precision, einsum_dot_general,
                           qk_attn_weights_einsum, attn_weights_value_einsum)
  if implementation is None:
    order = auto_implementations(inputs, dropout_rate=dropout_rate,
                                 return_weights=return_weights,
                                 custom_einsums=bool(einsums
                                                     or einsum_dot_general))
  elif isinstance(implementation, str):
    order = [implementation]
  else:
    order = list(implementation)
  unknown = [name for name in order if name not in _DISPATCH]
  if not order or unknown:
    raise ValueError(f"unknown implementation(s) {unknown or order!r}; choose "
                     f"from {IMPLEMENTATIONS}, None, or a non-empty list of "
                     "them")
  B, T, S, N, K, H, Dv = inputs.shape
  if B * T * N == 0 or S == 0:
    result = _empty_result(inputs, return_weights=return_weights,
                           return_residual=return_residual)
  else:
    result, errors = None, []
    for name in order:
      try:
        result = _DISPATCH[name](
            inputs, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
            broadcast_dropout=broadcast_dropout,
            return_weights=return_weights, return_residual=return_residual,
            block_q=block_q, block_k=block_k, einsums=einsums,
            einsum_dot_general=einsum_dot_general)
      except ValueError as e:
        if len(order) == 1:
          raise
        errors.append(f"{name}: {e}")
        continue
      break
    if result is None:
      raise ValueError("no attention implementation could run: "
                       + "; ".join(errors))
    if not isinstance(result, tuple):
      result = (result,)
  result = list(result)
  if return_residual:
    result[-1] = result[-1].astype(inputs.query.dtype)
  result = tuple(canonical.restore_batch(x, inputs) for x in result)
  return result[0] if len(result) == 1 else result


# ----------------------------------------------------------------------------
# Registry entries. (Each signature says what the entry supports: ``softmax``
# and ``xla`` take every option of :func:`dot_product_attention`; ``cudnn``
# lists only the arguments it can honour, so the Flax wrapper refuses dropout
# for it and sows no weights.)


def _check_kwargs(name, kwargs):
  """ValueError for keywords :func:`dot_product_attention` does not take."""
  takes = [p for p in inspect.signature(dot_product_attention).parameters
           if p not in ("query", "key", "value", "bias", "mask")]
  unknown = sorted(set(kwargs) - set(takes))
  if unknown:
    raise ValueError(f"attention {name!r} does not accept {unknown}; it "
                     f"takes: {', '.join(takes)}")


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
  _check_kwargs("softmax", kwargs)
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
  _check_kwargs("xla", kwargs)
  return dot_product_attention(query, key, value, bias, mask, scale=scale,
                               implementation="xla", **kwargs)


@register_attention(
    "chunked", aliases=("flash", "memory_efficient"), exact=True,
    complexity="time O(T·S) (half when causal), memory O(T)",
    description="exact attention by online softmax over key/query blocks "
    "with a recomputing custom VJP (Rabe & Staats 2021; FlashAttention)")
def chunked_attention_kernel(query, key, value, bias=None, mask=None, *,
                             block_q=None, block_k=None, scale=None,
                             **kwargs):
  """Exact memory-efficient attention, ``implementation="chunked"``
  (:mod:`attn.kernels.chunked`), dropout included (drawn block by block).

  ``return_weights=True`` (what the Flax wrapper asks for when weights are
  sown) cannot be served blockwise: that one call runs the materialised
  ``xla`` path and returns ``(out, weights[B, N, T, S])`` in O(T·S) memory.

  ``query [B, T, N, H]``, ``key [B, S, K, H]``, ``value [B, S, K, Dv]``
  (``N`` a multiple of ``K``) -> ``[B, T, N, Dv]``.
  """
  if kwargs.get("implementation", "chunked") != "chunked":
    raise ValueError("attention 'chunked' is implementation='chunked'; use "
                     "attention 'softmax' to choose another implementation")
  kwargs.pop("implementation", None)
  _check_kwargs("chunked", kwargs)
  return dot_product_attention(query, key, value, bias, mask, scale=scale,
                               implementation="chunked", block_q=block_q,
                               block_k=block_k, **kwargs)


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
