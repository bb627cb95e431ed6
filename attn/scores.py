"""Classic attention score functions (Bahdanau, Luong, Graves, Vaswani).

Each score is a pure function for ONE head:
``score(q_TH, k_SH, **params) -> scores_TS`` (float32). Parameters are
arguments; the Flax modules in :mod:`attn.modules` own them.
:func:`score_attention` lifts any score to ``[B, T, N, H]`` inputs with
``jax.vmap`` over batch and heads and applies the masked float32 softmax.

========== ====================================== ===========================
name       formula                                 paper
========== ====================================== ===========================
dot        q·k                                     Luong et al. 2015
scaled_dot q·k / sqrt(d)                           Vaswani et al. 2017
general    q W kᵀ                                  Luong et al. 2015
additive   vᵀ tanh(W_q q + W_k k)                  Bahdanau et al. 2015
cosine     β · cos(q, k)                           Graves et al. 2014 (NTM)
location   (W_a q)_s — ignores the keys            Luong et al. 2015
uniform    0 — equal weight on every key           (no-attention baseline)
========== ====================================== ===========================
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attn.kernels.canonical import check_broadcast_4d
from attn.masks import masked_softmax

Array = jax.Array
F32 = jnp.float32


def dot(q_TH: Array, k_SH: Array) -> Array:
  """Dot-product score ``q·k``: ``q_TH [T, H]``, ``k_SH [S, H]`` -> float32
  ``[T, S]``."""
  return jnp.einsum("th,sh->ts", q_TH, k_SH, preferred_element_type=F32)


def scaled_dot(q_TH: Array, k_SH: Array, scale: Optional[float] = None):
  """``q·k / sqrt(d)`` (or times ``scale``): keeps logits O(1) as d grows.

  ``q_TH [T, H]``, ``k_SH [S, H]`` -> float32 ``[T, S]``.
  """
  if scale is None:
    scale = 1.0 / float(np.sqrt(q_TH.shape[-1]))
  return dot(q_TH, k_SH) * scale


def general(q_TH: Array, k_SH: Array, w_HK: Array) -> Array:
  """Bilinear (Luong "general") score ``q W kᵀ``; ``w_HK: [Hq, Hk]``."""
  if w_HK.shape != (q_TH.shape[-1], k_SH.shape[-1]):
    raise ValueError(f"general: weight must be [Hq, Hk]=({q_TH.shape[-1]}, "
                     f"{k_SH.shape[-1]}), got {w_HK.shape}")
  return jnp.einsum("th,hk,sk->ts", q_TH, w_HK, k_SH,
                    preferred_element_type=F32)


def additive(q_TH: Array, k_SH: Array, w_q_HA: Array, w_k_KA: Array,
             v_A: Array) -> Array:
  """Additive (Bahdanau "concat") score ``vᵀ tanh(W_q q + W_k k)``.

  Shapes: ``w_q_HA [Hq, A]``, ``w_k_KA [Hk, A]``, ``v_A [A]``. Costs a
  ``[T, S, A]`` intermediate.
  """
  if w_q_HA.shape[-1] != w_k_KA.shape[-1] or v_A.shape != w_q_HA.shape[-1:]:
    raise ValueError(f"additive: inconsistent attention width: w_q "
                     f"{w_q_HA.shape}, w_k {w_k_KA.shape}, v {v_A.shape}")
  pq_TA = jnp.einsum("th,ha->ta", q_TH, w_q_HA, preferred_element_type=F32)
  pk_SA = jnp.einsum("sk,ka->sa", k_SH, w_k_KA, preferred_element_type=F32)
  hidden_TSA = jnp.tanh(pq_TA[:, None, :] + pk_SA[None, :, :])
  return jnp.einsum("tsa,a->ts", hidden_TSA, v_A.astype(F32))


def cosine(q_TH: Array, k_SH: Array, beta: float | Array = 1.0,
           eps: float = 1e-8) -> Array:
  """Content-based score ``β · cos(q, k)`` (Neural Turing Machine).

  ``β`` (sharpness) turns a similarity in [-1, 1] into a logit range.
  """
  q = q_TH.astype(F32)
  k = k_SH.astype(F32)
  qn = q * jax.lax.rsqrt(jnp.sum(q * q, -1, keepdims=True) + eps)
  kn = k * jax.lax.rsqrt(jnp.sum(k * k, -1, keepdims=True) + eps)
  return jnp.asarray(beta, F32) * jnp.einsum("th,sh->ts", qn, kn)


def location(q_TH: Array, k_SH: Array, w_HL: Array) -> Array:
  """Location-based score (Luong): ``(q W_a)[:S]``, independent of the keys.

  ``w_HL: [Hq, L]`` with ``L >= S`` (the maximum source length); only the
  number of keys is read from ``k_SH``.
  """
  S = k_SH.shape[0]
  if w_HL.shape[0] != q_TH.shape[-1] or w_HL.shape[1] < S:
    raise ValueError(f"location: weight must be [Hq={q_TH.shape[-1]}, L>={S}]"
                     f", got {w_HL.shape}")
  return jnp.einsum("th,hl->tl", q_TH, w_HL[:, :S], preferred_element_type=F32)


def uniform(q_TH: Array, k_SH: Array) -> Array:
  """Constant score: the softmax spreads the weight equally over the
  attendable keys (the mean of the values), whatever the query asks.

  The no-attention baseline of an encoder-decoder: the decoder sees only a
  fixed summary of the source. ``q_TH [T, H]``, ``k_SH [S, H]`` -> zeros
  ``[T, S]`` (float32).
  """
  return jnp.zeros((q_TH.shape[0], k_SH.shape[0]), F32)


SCORES: dict[str, Callable[..., Array]] = {
    "dot": dot, "scaled_dot": scaled_dot, "general": general,
    "additive": additive, "cosine": cosine, "location": location,
    "uniform": uniform,
}


def get_score(name: str) -> Callable[..., Array]:
  """Score function by name; ``ValueError`` lists the known names."""
  if callable(name):
    return name
  try:
    return SCORES[name]
  except KeyError:
    raise ValueError(f"unknown score function {name!r}; known: "
                     f"{sorted(SCORES)}") from None


def score_attention(score, query: Array, key: Array, value: Array,
                    mask: Optional[Array] = None, **params):
  """Attention with any score: ``softmax(score(q, k)) v`` per head.

  Args:
    score: a score name or function ``(q_TH, k_SH, **params) -> [T, S]``.
    query/key/value: ``[B, T, N, H]``, ``[B, S, N, H]``, ``[B, S, N, Dv]``.
    mask: boolean, broadcastable to ``[B, N, T, S]``.
    **params: passed unchanged to the score (shared by all heads).

  Returns:
    ``(out[B, T, N, Dv], weights[B, N, T, S])``. Fully masked rows give zero.
  """
  fn = get_score(score)
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(f"score_attention expects [B, T, N, H] inputs, got "
                     f"{query.shape}, {key.shape}, {value.shape}")
  if key.shape[:3] != value.shape[:3] or query.shape[0] != key.shape[0] or (
      query.shape[2] != key.shape[2]):
    raise ValueError(f"score_attention: incompatible shapes query="
                     f"{query.shape}, key={key.shape}, value={value.shape}")
  B, T, N, _ = query.shape
  S = key.shape[1]

  def one_head(q_TH, k_SH, v_SD, mask_TS):
    w_TS = masked_softmax(fn(q_TH, k_SH, **params), mask_TS)
    out = jnp.einsum("ts,sd->td", w_TS, v_SD.astype(F32))
    return out.astype(value.dtype), w_TS

  m_axis = None
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = may attend), got dtype "
                       f"{mask.dtype}")
    full = (B, N, T, S)
    mask = jnp.broadcast_to(check_broadcast_4d("mask", mask, full), full)
    m_axis = 0
  heads = jax.vmap(one_head, in_axes=(1, 1, 1, m_axis), out_axes=(1, 0))
  batch = jax.vmap(heads, in_axes=(0, 0, 0, m_axis))
  return batch(query, key, value, mask)
