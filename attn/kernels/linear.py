"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Replaces ``exp(q·k)`` by a kernel ``φ(q)·φ(k)`` with the positive feature
map ``φ(x) = elu(x) + 1``, so attention factorises::

    out_t = φ(q_t)ᵀ Σ_s φ(k_s) v_sᵀ  /  φ(q_t)ᵀ Σ_s φ(k_s)

Bidirectional: two ``O(T·H·Dv)`` contractions. Causal: the sums run over
``s <= t``; they are computed in chunks (an exclusive prefix sum of per-chunk
states plus a masked ``[c, c]`` product inside each chunk), so memory stays
``O(T)`` in the sequence length. :func:`feature_attention_one_head` is shared
with the Performer kernel.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attn.kernels import blocks, common
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32


def elu_feature_map(x: Array) -> Array:
  """``φ(x) = elu(x) + 1`` in float32 (strictly positive)."""
  return jax.nn.elu(x.astype(F32)) + 1.0


def _safe_divide(num: Array, den: Array) -> Array:
  """``num / den[..., None]``, zero (with finite gradients) where den == 0."""
  ok = den > 0
  return jnp.where(ok[..., None], num / jnp.where(ok, den, 1.0)[..., None], 0)


def feature_attention_one_head(phi_q_TM: Array, phi_k_SM: Array, v_SD: Array,
                               *, is_causal: bool, chunk_size: int) -> Array:
  """Normalised kernel attention ``φ(Q) φ(K)ᵀ V / φ(Q) φ(K)ᵀ 1``, one head.

  Args:
    phi_q_TM: non-negative query features ``[T, M]``.
    phi_k_SM: non-negative key features ``[S, M]``; rows of keys that must
      not be attended are zero.
    v_SD: values ``[S, Dv]``.
    is_causal: sums only over ``s <= t`` (needs ``S == T``).
    chunk_size: chunk length of the causal prefix sums. Memory is
      ``O(T·c + (T/c)·M·Dv)``, time ``O(T·(c + M)·Dv)``.

  Returns:
    ``[T, Dv]`` float32; zeros for a query whose normaliser is 0.
  """
  v_SD = v_SD.astype(F32)
  if not is_causal:
    kv_MD = jnp.einsum("sm,sd->md", phi_k_SM, v_SD)
    z_M = jnp.sum(phi_k_SM, axis=0)
    num_TD = jnp.einsum("tm,md->td", phi_q_TM, kv_MD)
    return _safe_divide(num_TD, phi_q_TM @ z_M)
  T, M = phi_q_TM.shape
  if phi_k_SM.shape[0] != T:
    raise ValueError(f"causal feature attention needs S == T, got "
                     f"S={phi_k_SM.shape[0]}, T={T}")
  c = max(1, min(chunk_size, T))
  n = -(-T // c)
  chunks = lambda x: blocks.pad_axis0(x, n * c).reshape((n, c) + x.shape[1:])
  q_ncM, k_ncM, v_ncD = chunks(phi_q_TM), chunks(phi_k_SM), chunks(v_SD)
  # State of all previous chunks: exclusive prefix sum of per-chunk states.
  kv_nMD = jnp.einsum("ncm,ncd->nmd", k_ncM, v_ncD)
  z_nM = jnp.sum(k_ncM, axis=1)
  kv_before = jnp.cumsum(kv_nMD, axis=0) - kv_nMD
  z_before = jnp.cumsum(z_nM, axis=0) - z_nM
  # Inside a chunk: the masked [c, c] quadratic form.
  tril_cc = jnp.tril(jnp.ones((c, c), bool))
  w_ncc = jnp.where(tril_cc, jnp.einsum("nim,njm->nij", q_ncM, k_ncM), 0.0)
  num = (jnp.einsum("ncm,nmd->ncd", q_ncM, kv_before)
         + jnp.einsum("nij,njd->nid", w_ncc, v_ncD))
  den = jnp.einsum("ncm,nm->nc", q_ncM, z_before) + jnp.sum(w_ncc, axis=-1)
  return _safe_divide(num, den).reshape(n * c, -1)[:T]


def kernelized_attention(name: str, inputs: common.AttentionInputs,
                         features, *, chunk_size: int) -> Array:
  """Runs feature attention for validated inputs, handling masks and GQA.

  Args:
    name: variant name for error messages.
    inputs: canonical inputs (bias / segment ids already rejected).
    features: ``features(q_TH, k_SH, kv_valid_S) -> (phi_q_TM, phi_k_SM)``
      for one head; must return zero rows for invalid keys.
    chunk_size: causal chunk length.

  Returns:
    ``[B, T, N, Dv]`` (or ``[T, N, Dv]``) in the input dtype.
  """
  if chunk_size < 1:
    raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
  q_valid, kv_valid = blocks.validity(name, inputs)
  key, value = inputs.key, inputs.value
  T = inputs.query.shape[1]
  if inputs.is_causal:
    key, value, kv_valid = blocks.align_keys(key, value, kv_valid, T)

  def one_head(q_TH, k_SH, v_SD, kv_valid_S):
    phi_q, phi_k = features(q_TH, k_SH, kv_valid_S)
    return feature_attention_one_head(phi_q, phi_k, v_SD,
                                      is_causal=inputs.is_causal,
                                      chunk_size=chunk_size)

  out = blocks.map_heads(one_head, inputs.query, key, value, kv_valid)
  return blocks.finish(out, inputs, q_valid)


def _elu_features(q_TH: Array, k_SH: Array, kv_valid_S: Optional[Array]):
  phi_k = elu_feature_map(k_SH)
  if kv_valid_S is not None:
    phi_k = jnp.where(kv_valid_S[:, None], phi_k, 0.0)
  return elu_feature_map(q_TH), phi_k


@register_attention(
    "linear", exact=False, causal=True, padding=True, cross=True,
    complexity="time O((T+S)·H·Dv) (causal: O(T·(c+H)·Dv)), memory O(T+S)",
    description="linear attention with feature map elu(x)+1 "
    "(Katharopoulos et al. 2020); causal via chunked prefix sums")
def linear_attention(query, key, value, bias=None, mask=None, *,
                     chunk_size: int = 128, is_causal: bool = False,
                     query_seq_lengths=None, key_value_seq_lengths=None,
                     segment_ids=None):
  """Katharopoulos linear attention, ``φ(x) = elu(x) + 1``.

  Approximates softmax attention by replacing ``exp(q·k/√H)`` with
  ``φ(q)·φ(k)`` (a different, positive similarity; there is no budget that
  makes it exact). ``out_t = φ(q_t)ᵀ Σ_s φ(k_s) v_sᵀ / φ(q_t)ᵀ Σ_s φ(k_s)``.

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]``, ``N % K == 0`` (GQA).
    value: ``[B, S, K, Dv]``.
    bias: not supported (``ValueError``).
    mask: padding mask ``[B, 1, 1, S]`` / ``[B, 1, T, 1]`` only.
    chunk_size: option, chunk length of the causal prefix sums.
    is_causal: sum over ``s <= t`` (absolute positions; for ``S != T`` the
      keys are padded/truncated to ``T``).
    query_seq_lengths / key_value_seq_lengths: int ``[B]``.
    segment_ids: not supported (``ValueError``).

  Returns:
    ``[B, T, N, Dv]`` in the input dtype; computed in float32. Time
    ``O(B·N·(T+S)·H·Dv)``, memory ``O(B·N·(T+S)·(H+Dv))``; causal adds
    ``O(T·c)`` for the in-chunk products. Queries with no valid key output
    zeros.
  """
  inputs = common.canonicalize(
      query, key, value, bias, mask, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths, segment_ids=segment_ids)
  blocks.check_supported("linear", inputs, causal=True, segments=False)
  return kernelized_attention("linear", inputs, _elu_features,
                              chunk_size=chunk_size)
