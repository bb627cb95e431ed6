"""Top-k sparse softmax attention and hard (one-position) attention.

``topk``: each query keeps only its ``k`` highest-scoring keys and takes the
softmax over those (Zhao et al. 2019, "Explicit Sparse Transformer";
Gupta et al. 2021). ``k >= S`` is exact softmax attention.

``hard``: each query attends exactly one key, sampled from (or, without
randomness, the argmax of) the softmax of its scores, the output being that
key's value row (Xu et al. 2015 "hard" attention). The forward pass is an
exact one-hot selection; gradients reach the scores through a
straight-through estimator (Bengio et al. 2013) or the straight-through
Gumbel-softmax (Jang et al. 2017).

Both compute the full ``[T, S]`` scores (time and memory ``O(T·S)``), so they
honour any bias, mask, causal/window/length/segment structure, like exact
attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn.masks import MASK_VALUE
from attn.masks import masked_softmax
from attn.kernels import blocks, canonical
from attn import registry
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32


def _scores_TS(q_TH, k_SH, bias_TS, scale) -> Array:
  """``scale · q kᵀ + bias`` in float32."""
  scores = jnp.einsum("th,sh->ts", q_TH, k_SH,
                      preferred_element_type=F32) * scale
  return scores if bias_TS is None else scores + bias_TS


def _dense_inputs(query, key, value, bias, mask, **options):
  """``(inputs, q_valid, bias[B, N, T, S], mask[B, N, T, S])``: every option
  of exact attention is honoured through the dense mask."""
  inputs = canonical.canonicalize(query, key, value, bias, mask, **options)
  q_valid, _ = blocks.lengths_valid(inputs)
  return (inputs, q_valid) + blocks.dense_masks(inputs)


@register_attention(
    "topk", aliases=("top_k",), exact=False, causal=True, padding=True,
    cross=True, complexity="time O(T·S·H + T·S·log k), memory O(T·S)",
    description="softmax over each query's k highest-scoring keys (explicit "
    "sparse attention); k >= S is exact",
    option_rules={"k": registry.int_option(1)})
def topk_attention(query, key, value, bias=None, mask=None, *, k: int = 32,
                   scale=None, is_causal=False, query_seq_lengths=None,
                   key_value_seq_lengths=None, segment_ids=None,
                   local_window_size=None):
  """Top-k sparse softmax attention.

  ``out_t = Σ_{s ∈ top_k(scores_t)} softmax(scores_t[top_k])_s v_s`` with
  ``scores = scale · q kᵀ + bias`` restricted to the keys the masks allow;
  exactly ``min(k, S)`` keys are kept per query (ties broken by position),
  and masked keys are never kept.

  Args:
    query: ``[B, T, N, H]``; key ``[B, S, K, H]``; value ``[B, S, K, Dv]``
      with ``N % K == 0`` (grouped-query attention).
    bias, mask: any bias / boolean mask broadcastable to ``[B, N, T, S]``.
    k: keys kept per query; ``k >= S`` equals exact softmax attention.
    scale: multiplier of ``q·k``, default ``1/sqrt(H)``.
    is_causal, query_seq_lengths, key_value_seq_lengths, segment_ids,
      local_window_size: as in :func:`attn.dot_product_attention`.

  Returns:
    ``[B, T, N, Dv]``. Rows with nothing to attend are zero.
    Time ``O(T·S·H)``, memory ``O(T·S + T·k·Dv)`` per head.
  """
  registry.check_options(
      "topk", k=k, scale=scale)
  if int(k) < 1:
    raise ValueError(f"topk: k must be >= 1, got {k}")
  inputs, q_valid, bias_BNTS, mask_BNTS = _dense_inputs(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths, segment_ids=segment_ids,
      local_window_size=local_window_size)
  S = inputs.shape[2]
  kk = min(int(k), S)

  def one_head(q_TH, k_SH, v_SD, bias_TS, mask_TS):
    scores = _scores_TS(q_TH, k_SH, bias_TS, inputs.scale)
    if mask_TS is not None:
      scores = jnp.where(mask_TS, scores, MASK_VALUE)
    top_TK, idx_TK = jax.lax.top_k(scores, kk)
    keep_TK = (None if mask_TS is None
               else jnp.take_along_axis(mask_TS, idx_TK, axis=-1))
    w_TK = masked_softmax(top_TK, keep_TK)
    return jnp.einsum("tk,tkd->td", w_TK.astype(v_SD.dtype), v_SD[idx_TK],
                      preferred_element_type=F32)

  out = blocks.map_heads(one_head, inputs.query, inputs.key, inputs.value,
                         per_head=(bias_BNTS, mask_BNTS))
  return blocks.finish(out, inputs, q_valid)


ESTIMATORS = ("straight_through", "gumbel")


def _hard_head(q_TH, k_SH, v_SD, bias_TS, mask_TS, key, *, scale, estimator,
               temperature, sample: bool) -> Array:
  """One head of hard attention: a one-hot choice per query in the forward
  pass, a softmax surrogate gradient in the backward pass."""
  logits = _scores_TS(q_TH, k_SH, bias_TS, scale)
  valid = (jnp.ones(logits.shape, bool) if mask_TS is None else mask_TS)
  if sample and estimator == "gumbel":
    logits = logits + jax.random.gumbel(key, logits.shape, F32)
  soft_TS = masked_softmax(logits / temperature, valid)
  choice_logits = jnp.where(valid, jax.lax.stop_gradient(logits), -jnp.inf)
  if sample and estimator == "straight_through":
    choice_T = jax.random.categorical(key, choice_logits, axis=-1)
  else:
    choice_T = jnp.argmax(choice_logits, axis=-1)
  any_T = jnp.any(valid, axis=-1, keepdims=True)
  hard_TS = jax.nn.one_hot(choice_T, logits.shape[-1], dtype=F32) * any_T
  # forward: exactly hard_TS (soft - stop_gradient(soft) is exactly 0);
  # backward: the gradient of the softmax surrogate.
  weights_TS = hard_TS + (soft_TS - jax.lax.stop_gradient(soft_TS))
  return jnp.einsum("ts,sd->td", weights_TS, v_SD.astype(F32),
                    preferred_element_type=F32)


@register_attention(
    "hard", aliases=("hard_attention",), exact=False, causal=True,
    padding=True, cross=True, complexity="time O(T·S·H), memory O(T·S)",
    description="one sampled (or argmax) key per query; straight-through or "
    "Gumbel-softmax gradients",
    option_rules={
        "estimator": registry.choice_option(*ESTIMATORS),
        "temperature": registry.float_option(positive=True)})
def hard_attention(query, key, value, bias=None, mask=None, *,
                   estimator: str = "straight_through",
                   temperature: float = 1.0, scale=None, is_causal=False,
                   query_seq_lengths=None, key_value_seq_lengths=None,
                   segment_ids=None, local_window_size=None, rng=None,
                   deterministic: bool = False):
  """Hard attention: the output of query ``t`` is the value row of ONE key.

  The key is drawn from ``softmax(scores_t)`` over the allowed keys
  (``scores = scale · q kᵀ + bias``) when ``rng`` is given and
  ``deterministic`` is False, else it is the argmax of the scores.

  Gradients (the forward pass is an exact selection):

  * ``estimator="straight_through"``: sample ``s ~ softmax(scores)``;
    backward as if the weights were ``softmax(scores / τ)``.
  * ``estimator="gumbel"``: straight-through Gumbel-softmax: the choice is
    ``argmax(scores + g)`` with Gumbel noise ``g`` (a sample of the same
    distribution); backward through ``softmax((scores + g) / τ)``.

  Args:
    query: ``[B, T, N, H]``; key ``[B, S, K, H]``; value ``[B, S, K, Dv]``
      with ``N % K == 0``.
    bias, mask, is_causal, query_seq_lengths, key_value_seq_lengths,
      segment_ids, local_window_size: as in :func:`attn.dot_product_attention`.
    estimator: ``"straight_through"`` or ``"gumbel"``.
    temperature: temperature ``τ > 0`` of the softmax surrogate that
      carries the gradient (lower = closer to the hard choice, noisier).
    scale: multiplier of ``q·k``, default ``1/sqrt(H)``.
    rng: PRNG key for sampling (split per batch element and head).
    deterministic: use the argmax even when ``rng`` is given.

  Returns:
    ``[B, T, N, Dv]``: each row is exactly one value row (zero for queries
    with nothing to attend). Time and memory ``O(T·S)`` per head.
  """
  registry.check_options(
      "hard", estimator=estimator, temperature=temperature, scale=scale)
  if estimator not in ESTIMATORS:
    raise ValueError(f"hard: unknown estimator {estimator!r}; choose from "
                     f"{ESTIMATORS}")
  if not float(temperature) > 0:
    raise ValueError(f"hard: temperature must be > 0, got {temperature}")
  inputs, q_valid, bias_BNTS, mask_BNTS = _dense_inputs(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths, segment_ids=segment_ids,
      local_window_size=local_window_size)
  empty = blocks.no_keys_output(inputs)
  if empty is not None:
    return empty
  B, _, _, N, *_ = inputs.shape
  sample = rng is not None and not deterministic
  keys = jax.random.split(rng, (B, N)) if sample else None

  def one_head(q_TH, k_SH, v_SD, bias_TS, mask_TS, key_):
    return _hard_head(q_TH, k_SH, v_SD, bias_TS, mask_TS, key_,
                      scale=inputs.scale, estimator=estimator,
                      temperature=float(temperature), sample=sample)

  out = blocks.map_heads(one_head, inputs.query, inputs.key, inputs.value,
                         per_head=(bias_BNTS, mask_BNTS, keys))
  return blocks.finish(out, inputs, q_valid)
