"""Performer attention: FAVOR+ (Choromanski et al. 2021).

Unbiased estimate of the softmax kernel with positive orthogonal random
features. With ``x̂ = x · scale^{1/2}`` and ``M`` random directions
``w_1..w_M`` (orthogonal in blocks of ``H``, row norms chi-distributed)::

    exp(q̂·k̂) = E_w[ exp(w·q̂ - |q̂|²/2) · exp(w·k̂ - |k̂|²/2) ]
    φ(x)     = exp(W x̂ - |x̂|²/2) / √M          (all entries > 0)

and attention becomes linear attention with this ``φ`` (see
:mod:`attn.kernels.linear`); its error vs softmax falls as ``M`` grows.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attn.kernels import blocks, common, linear
from attn.kernels.common import MASK_VALUE
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32


def orthogonal_features(rng: Array, num_features: int, dim: int) -> Array:
  """Random feature matrix ``W[M, dim]`` for FAVOR+.

  Rows come in blocks of ``dim`` mutually orthogonal directions (QR of a
  Gaussian matrix; the last block is truncated), each row rescaled to the
  norm of an independent ``dim``-dimensional Gaussian vector so that every
  row is marginally ``N(0, I)``.
  """
  n_blocks = -(-num_features // dim)
  block_key, norm_key = jax.random.split(rng)
  gauss = jax.random.normal(block_key, (n_blocks, dim, dim), F32)
  q_blocks, _ = jnp.linalg.qr(gauss)                       # columns orthonormal
  directions = jnp.swapaxes(q_blocks, 1, 2).reshape(n_blocks * dim, dim)
  norms = jnp.linalg.norm(
      jax.random.normal(norm_key, (num_features, dim), F32), axis=1)
  return directions[:num_features] * norms[:, None]


def favor_features(x_TH: Array, w_MH: Array, scale, *, is_query: bool,
                   valid_T: Optional[Array] = None) -> Array:
  """Positive random features ``exp(W x̂ - |x̂|²/2 - c)``, one head ``[T, M]``.

  ``c`` is a stabiliser that cancels in the attention ratio: the per-row max
  for queries, the max over all valid keys for keys (a constant shared by
  every key). The ``1/√M`` factor cancels too and is dropped. Invalid keys
  (``valid_T == False``) get zero rows.
  """
  x_TH = x_TH.astype(F32) * jnp.sqrt(jnp.asarray(scale, F32))
  logits_TM = (jnp.einsum("th,mh->tm", x_TH, w_MH)
               - 0.5 * jnp.sum(x_TH * x_TH, axis=-1, keepdims=True))
  if is_query:
    stab = jnp.max(logits_TM, axis=-1, keepdims=True)
    return jnp.exp(logits_TM - jax.lax.stop_gradient(stab))
  if valid_T is None:
    return jnp.exp(logits_TM - jax.lax.stop_gradient(jnp.max(logits_TM)))
  valid_T1 = valid_T[:, None]
  stab = jax.lax.stop_gradient(jnp.max(jnp.where(valid_T1, logits_TM,
                                                 MASK_VALUE)))
  return jnp.where(valid_T1, jnp.exp(jnp.where(valid_T1, logits_TM - stab,
                                               0.0)), 0.0)


@register_attention(
    "performer", exact=False, causal=True, padding=True,
    cross=True,
    complexity="time O((T+S)·M·H), memory O((T+S)·M) for M random features",
    description="FAVOR+ positive orthogonal random features approximating "
    "the softmax kernel (Choromanski et al. 2021); causal via prefix sums")
def performer_attention(query, key, value, bias=None, mask=None, *,
                        num_features: int = 256, seed: int = 0,
                        chunk_size: int = 128, scale=None,
                        is_causal: bool = False, query_seq_lengths=None,
                        key_value_seq_lengths=None, segment_ids=None,
                        rng: Optional[Array] = None):
  """FAVOR+ approximation of softmax attention.

  Approximates ``softmax(scale · q kᵀ) v`` by linear attention with positive
  random features (unbiased for the kernel ``exp(scale · q·k)``; error
  ``O(1/√M)``). One feature matrix ``W[M, H]`` is shared by all heads and
  examples of a call.

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]``, ``N % K == 0`` (GQA).
    value: ``[B, S, K, Dv]``.
    bias: not supported (``ValueError``).
    mask: padding mask ``[B, 1, 1, S]`` / ``[B, 1, T, 1]`` only.
    num_features: option ``M``, number of random features.
    seed: option, seeds ``W`` when no ``rng`` is passed (deterministic).
    chunk_size: option, chunk length of the causal prefix sums.
    scale: option, softmax temperature (default ``1/sqrt(H)``).
    is_causal: sum over ``s <= t`` (chunked prefix sums).
    query_seq_lengths / key_value_seq_lengths: int ``[B]``.
    segment_ids: not supported (``ValueError``).
    rng: PRNG key for ``W``; a module redraws features by passing a new one.

  Returns:
    ``[B, T, N, Dv]`` in the input dtype; computed in float32. Time
    ``O(B·N·(T+S)·M·(H+Dv))``, memory ``O(B·N·(T+S)·M)`` (causal: plus
    ``O(T/c·M·Dv + T·c)``).
  """
  inputs = common.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths, segment_ids=segment_ids)
  blocks.check_supported("performer", inputs, causal=True, segments=False)
  if num_features < 1:
    raise ValueError(f"performer: num_features must be >= 1, got "
                     f"{num_features}")
  if rng is None:
    rng = jax.random.PRNGKey(seed)
  w_MH = orthogonal_features(rng, num_features, inputs.query.shape[-1])

  def features(q_TH, k_SH, kv_valid_S):
    return (favor_features(q_TH, w_MH, inputs.scale, is_query=True),
            favor_features(k_SH, w_MH, inputs.scale, is_query=False,
                           valid_T=kv_valid_S))

  return linear.kernelized_attention("performer", inputs, features,
                                     chunk_size=chunk_size)
