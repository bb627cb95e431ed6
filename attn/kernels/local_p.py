"""Luong et al. (2015) local-predictive ("local-p") attention.

Each query predicts where to look: ``p_t = S_eff · sigmoid(v_pᵀ tanh(W_pᵀ
q_t))`` (``S_eff`` the number of valid keys, ``W_p [H, A]``, ``v_p [A]``
shared by the heads). It attends only the keys ``s`` with
``p_t - D <= s <= p_t + D`` and the softmax weights over that window are
multiplied by a Gaussian centred on ``p_t``:

``a_t(s) = softmax_{window}(scale · q_t·k_s) · exp(-(s - p_t)² / (2σ²))``,
``σ = D / 2``, ``out_t = Σ_s a_t(s) v_s``.

As in the paper the weights are not renormalised after the Gaussian (they
sum to at most 1), and ``p_t`` is learned through the Gaussian term. Only
the ``2D + 1`` window keys are gathered per query, in blocks of
``QUERY_BLOCK`` queries run in steps (:func:`attn.kernels.blocks.map_blocks`):
time ``O(T·D·H)``, independent of ``S``; memory ``O(T·H)`` forward and
``O(T·D·H)`` backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn.masks import masked_softmax
from attn.kernels import blocks, canonical
from attn.kernels.blocks import from_blocks, map_blocks, to_blocks
from attn import registry
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32
# Queries are processed in blocks of this many (see blocks.map_blocks).
QUERY_BLOCK = 64


def local_p_param_shapes(query_shape, key_shape, *, hidden: int = 64,
                         **unused_options):
  """``w_p [H, hidden]`` and ``v_p [hidden]`` for ``query [B, T, N, H]``."""
  registry.check_options(
      "local_p", hidden=hidden)
  del key_shape, unused_options
  H = query_shape[-1]
  init = jax.nn.initializers
  return {"w_p": ((H, hidden), init.lecun_normal()),
          "v_p": ((hidden,), init.normal(float(hidden) ** -0.5))}


def predicted_centres(q_TH: Array, w_p: Array, v_p: Array,
                      length: Array) -> Array:
  """``p_t = length · sigmoid(v_pᵀ tanh(W_pᵀ q_t))``, float32 ``[T]``."""
  hidden_TA = jnp.tanh(jnp.einsum("th,ha->ta", q_TH, w_p.astype(q_TH.dtype),
                                  preferred_element_type=F32))
  return length * jax.nn.sigmoid(hidden_TA @ v_p.astype(F32))


def _local_p_head(q_TH, k_SH, v_SD, valid_S, *, w_p, v_p, window: int, scale,
                  is_causal: bool) -> Array:
  """One head of local-p attention over ``2·window + 1`` gathered keys,
  in blocks of ``QUERY_BLOCK`` queries."""
  T, H = q_TH.shape
  S = k_SH.shape[0]
  n_blocks = -(-T // QUERY_BLOCK)
  length = jnp.sum(valid_S).astype(F32)
  sigma = window / 2.0

  def block(q_QH, t_Q):
    p_Q = predicted_centres(q_QH, w_p, v_p, length)
    p_fixed = jax.lax.stop_gradient(p_Q)
    start_Q = jnp.ceil(p_fixed - window).astype(jnp.int32)
    pos_QW = start_Q[:, None] + jnp.arange(2 * window + 1)[None, :]
    idx_QW = jnp.clip(pos_QW, 0, S - 1)
    ok_QW = ((pos_QW >= 0) & (pos_QW < S) & valid_S[idx_QW]
             & (pos_QW <= p_fixed[:, None] + window))
    if is_causal:
      ok_QW &= pos_QW <= t_Q[:, None]
    scores_QW = jnp.einsum("qh,qwh->qw", q_QH, k_SH[idx_QW],
                           preferred_element_type=F32) * scale
    gauss_QW = jnp.exp(-jnp.square(pos_QW.astype(F32) - p_Q[:, None])
                       / (2.0 * sigma * sigma))
    weights_QW = masked_softmax(scores_QW, ok_QW) * gauss_QW
    return jnp.einsum("qw,qwd->qd", weights_QW.astype(v_SD.dtype),
                      v_SD[idx_QW], preferred_element_type=F32)

  q_blocks = to_blocks(q_TH, QUERY_BLOCK, num_blocks=n_blocks)
  t_blocks = to_blocks(jnp.arange(n_blocks * QUERY_BLOCK), QUERY_BLOCK)
  out = map_blocks(block, (q_blocks, t_blocks), QUERY_BLOCK)
  return from_blocks(out, T)


@register_attention(
    "local_p", aliases=("luong_local_p",), exact=False, causal=True,
    padding=True, cross=True,
    complexity="time O(T·D·H) (window D, independent of S), memory O(T·H) "
    "forward, O(T·D·H) backward",
    description="Luong local-predictive attention: a window of ±D keys "
    "around a predicted position, times a Gaussian",
    metadata={"param_shapes": local_p_param_shapes},
    option_rules={
        "window": registry.int_option(1),
        "hidden": registry.int_option(1)})
def local_p_attention(query, key, value, bias=None, mask=None, *,
                      window: int = 10, hidden: int = 64, scale=None,
                      is_causal=False, query_seq_lengths=None,
                      key_value_seq_lengths=None, segment_ids=None,
                      local_window_size=None, params=None):
  """Local-p attention (Luong et al. 2015) with a predicted window centre.

  Args:
    query: ``[B, T, N, H]``; key ``[B, S, K, H]``; value ``[B, S, K, Dv]``
      with ``N % K == 0`` (kv heads are shared).
    bias: not supported (``ValueError``).
    mask: ``None`` or a key-padding mask broadcastable to ``[B, N, 1, S]``;
      dense masks raise ``ValueError``.
    window: ``D >= 1``; keys ``p_t - D <= s <= p_t + D``; ``σ = D/2``.
    hidden: width ``A`` of the position predictor (sets parameter shapes).
    scale: multiplier of ``q·k``, default ``1/sqrt(H)``.
    is_causal: additionally require ``s <= t``.
    query_seq_lengths / key_value_seq_lengths: int ``[B]``; ``S_eff`` in
      ``p_t = S_eff · sigmoid(...)`` is the number of valid keys.
    segment_ids / local_window_size: not supported (``ValueError``).
    params: ``{"w_p": [H, A], "v_p": [A]}`` (:func:`local_p_param_shapes`).

  Returns:
    ``[B, T, N, Dv]``. Time ``O(T·D·H)`` per head, memory ``O(T·H)``
    forward and ``O(T·D·H)`` backward.
  """
  registry.check_options(
      "local_p", window=window, hidden=hidden, scale=scale)
  if int(window) < 1:
    raise ValueError(f"local_p: window must be >= 1, got {window}")
  del hidden  # sets the parameter shapes only
  if params is None or "w_p" not in params or "v_p" not in params:
    raise ValueError(
        "local_p needs params {'w_p': [H, A], 'v_p': [A]}, got "
        f"{None if params is None else sorted(params)}; create them from "
        "attn.registry.attention_param_shapes")
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids)
  blocks.check_supported("local_p", inputs, causal=True, segments=False)
  empty = blocks.no_keys_output(inputs)
  if empty is not None:
    return empty
  q_valid, kv_valid = blocks.validity("local_p", inputs, per_head=True)
  H = inputs.shape[5]
  w_p, v_p = params["w_p"], params["v_p"]
  if w_p.ndim != 2 or w_p.shape[0] != H or v_p.shape != w_p.shape[1:]:
    raise ValueError(f"local_p: params must be w_p [H={H}, A] and v_p [A], "
                     f"got {w_p.shape} and {v_p.shape}")

  def one_head(q_TH, k_SH, v_SD, valid_S):
    return _local_p_head(q_TH, k_SH, v_SD, valid_S, w_p=w_p, v_p=v_p,
                         window=int(window), scale=inputs.scale,
                         is_causal=inputs.is_causal)

  out = blocks.map_heads(one_head, inputs.query, inputs.key, inputs.value,
                         per_head=(kv_valid,))
  return blocks.finish(out, inputs, q_valid)
