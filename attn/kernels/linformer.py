"""Linformer attention (Wang et al. 2020): low-rank projection along length.

Keys and values are projected from length ``S`` to ``k`` with learned
matrices ``E, F [k, S_max]`` (owned by the module, shared by all heads)::

    out = softmax(scale · Q (E K)ᵀ) (F V)        Q: [T, H], E K: [k, H]

Time and memory ``O(T·k + S·k)``. Padded keys are zeroed before the
projection (so their contents never matter). Bidirectional only: a causal
mask cannot be applied after mixing all positions.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attn.kernels import blocks, canonical
from attn.masks import masked_softmax
from attn import registry
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32
# Queries per lax.map step: keeps the [chunk, k] scores in cache.
QUERY_CHUNK = 256


def linformer_param_shapes(query_shape, key_shape, *, k: int = 256,
                           max_length: Optional[int] = None, scale=None):
  """``{"E": ([k, L], init), "F": ([k, L], init)}`` with ``L = max_length or S``.

  ``scale`` is accepted (it is a spec option) but does not change shapes.
  The initializer draws ``N(0, 1/L)`` (truncated), so ``E @ K`` starts as
  a random Johnson–Lindenstrauss-style projection of the keys.
  """
  registry.check_options(
      "linformer", k=k, max_length=max_length)
  del query_shape, scale
  length = max(1, max_length or key_shape[1])   # S == 0: one unused column
  init = jax.nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=-1, out_axis=-2)
  return {"E": ((k, length), init), "F": ((k, length), init)}


def linformer_one_head(q_TH: Array, k_SH: Array, v_SD: Array, e_kS: Array,
                       f_kS: Array, kv_valid_S: Optional[Array], *,
                       scale) -> Array:
  """Linformer for one head: ``softmax(scale · q (E k)ᵀ) (F v)``, ``[T, Dv]``.

  ``e_kS`` / ``f_kS`` are already cut to the key length ``S``; invalid keys
  and values are zeroed before projecting; queries are processed in chunks
  of ``QUERY_CHUNK``. Returns float32.
  """
  if kv_valid_S is not None:
    k_SH = jnp.where(kv_valid_S[:, None], k_SH, 0)
    v_SD = jnp.where(kv_valid_S[:, None], v_SD, 0)
  kp_kH = jnp.einsum("ks,sh->kh", e_kS, k_SH, preferred_element_type=F32)
  vp_kD = jnp.einsum("ks,sd->kd", f_kS, v_SD, preferred_element_type=F32)

  def read(q_cH):
    scores_ck = jnp.einsum("ch,kh->ck", q_cH.astype(F32), kp_kH) * scale
    return masked_softmax(scores_ck, None) @ vp_kD

  return blocks.map_chunks(read, q_TH, QUERY_CHUNK)


@register_attention(
    "linformer", exact=False, causal=False, padding=True, cross=True,
    complexity="time O((T+S)·k), memory O((T+S)·k) for projection length k",
    description="keys/values projected along length to k with learned E, F "
    "(Wang et al. 2020); bidirectional only",
    metadata={"param_shapes": linformer_param_shapes},
    option_rules={
        "k": registry.int_option(1),
        "max_length": registry.int_option(1, none=True)})
def linformer_attention(query, key, value, bias=None, mask=None, *,
                        k: int = 256, max_length: Optional[int] = None,
                        scale=None, is_causal: bool = False,
                        query_seq_lengths=None, key_value_seq_lengths=None,
                        segment_ids=None, params=None):
  """Linformer: softmax attention over ``k`` projected keys/values.

  Approximates ``softmax(scale · q kᵀ) v`` by a rank-``k`` factorisation in
  the length axis; it is exact when ``E = F = I`` (``k = S``) and no key is
  padded.

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]``, ``N % K == 0`` (GQA), ``S <= max_length``.
    value: ``[B, S, K, Dv]``.
    bias: not supported (``ValueError``).
    mask: padding mask ``[B, 1, 1, S]`` / ``[B, 1, T, 1]`` only.
    k: option, projected length (shape of ``E``/``F``).
    max_length: option, longest key length the parameters cover (default:
      the key length the module was built with).
    scale: option, multiplier of the scores (default ``1/sqrt(H)``).
    is_causal: must be False (``ValueError``).
    query_seq_lengths / key_value_seq_lengths: int ``[B]``.
    segment_ids: not supported (``ValueError``).
    params: ``{"E": [k, L], "F": [k, L]}`` with ``L >= S``; the first ``S``
      columns are used. Create them from :func:`linformer_param_shapes`
      (``attn.registry.attention_param_shapes``).

  Returns:
    ``[B, T, N, Dv]`` in the input dtype. Time ``O(B·N·(T+S)·k·H)``,
    memory ``O(B·N·(T+S)·k)``.
  """
  registry.check_options(
      "linformer", k=k, max_length=max_length, scale=scale)
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths, segment_ids=segment_ids)
  blocks.check_supported("linformer", inputs, causal=False, segments=False)
  empty = blocks.no_keys_output(inputs)
  if empty is not None:
    return empty
  S = inputs.key.shape[1]
  if not params or "E" not in params or "F" not in params:
    raise ValueError(
        "linformer needs params={'E': [k, L], 'F': [k, L]} (L >= key length);"
        " create them with attn.registry.attention_param_shapes, got "
        f"{sorted(params) if params else params}")
  e, f = jnp.asarray(params["E"]), jnp.asarray(params["F"])
  for name, p in (("E", e), ("F", f)):
    if p.ndim != 2 or p.shape[0] != k or p.shape[1] < S:
      raise ValueError(
          f"linformer param {name} must be [k={k}, L>={S}] (key length {S}),"
          f" got {p.shape}; raise max_length or k to match")
  if max_length is not None and S > max_length:
    raise ValueError(f"linformer: key length {S} exceeds max_length="
                     f"{max_length}")
  q_valid, kv_valid = blocks.validity("linformer", inputs)
  e_kS, f_kS = e[:, :S], f[:, :S]

  def one_head(q_TH, k_SH, v_SD, kv_valid_S):
    return linformer_one_head(q_TH, k_SH, v_SD, e_kS, f_kS, kv_valid_S,
                              scale=inputs.scale)

  out = blocks.map_heads(one_head, inputs.query, inputs.key, inputs.value,
                         kv_valid)
  return blocks.finish(out, inputs, q_valid)
