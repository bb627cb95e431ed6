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

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from attn.kernels import blocks, canonical, linear
from attn.masks import MASK_VALUE
from attn import registry
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32


def gaussian_draws(rng: Optional[Array], seed: int, num_features: int,
                   dim: int) -> Tuple[Array, Array]:
  """Standard normal ``([ceil(M/dim), dim, dim], [M, dim])`` float32 draws.

  From ``jax.random`` with ``rng`` when given; otherwise from NumPy's
  ``default_rng(seed)`` at trace time (a deterministic constant, and no
  random-number kernel to compile).
  """
  shapes = ((-(-num_features // dim), dim, dim), (num_features, dim))
  if rng is None:
    gen = np.random.default_rng(seed)
    return tuple(jnp.asarray(gen.standard_normal(s), F32) for s in shapes)
  return tuple(jax.random.normal(key, s, F32)
               for key, s in zip(jax.random.split(rng), shapes))


def orthogonal_features(blocks_gauss: Array, rows_gauss: Array) -> Array:
  """Random feature matrix ``W[M, dim]`` for FAVOR+ from Gaussian draws.

  ``blocks_gauss [n, dim, dim]`` gives ``n`` blocks of ``dim`` mutually
  orthogonal unit directions (Haar-random: QR with sign-corrected ``R``;
  the last block is truncated to ``M`` rows); each row is rescaled to the norm of a row of ``rows_gauss
  [M, dim]``, so every row is marginally ``N(0, I)`` (Choromanski et al.,
  "regularized" orthogonal features).
  """
  num_features, dim = rows_gauss.shape
  q_blocks, r_blocks = jnp.linalg.qr(blocks_gauss)      # columns orthonormal
  # LAPACK fixes the sign of diag(R), which biases the sign of Q's entries;
  # flipping columns to make diag(R) > 0 gives Haar-distributed Q.
  signs = jnp.sign(jnp.diagonal(r_blocks, axis1=1, axis2=2))
  q_blocks = q_blocks * jnp.where(signs == 0, 1.0, signs)[:, None, :]
  directions = jnp.swapaxes(q_blocks, 1, 2).reshape(-1, dim)
  norms = jnp.linalg.norm(rows_gauss, axis=1)
  return directions[:num_features] * norms[:, None]


def favor_feature_map(w_MH: Array, scale) -> linear.FeatureMap:
  """FAVOR+ positive features ``exp(W x̂ - |x̂|²/2 - c)``, ``x̂ = x·√scale``.

  ``c`` is a stabiliser that cancels in the attention ratio: the per-row max
  for queries, the running max over keys for keys (see
  :func:`attn.kernels.linear.feature_attention_one_head`). The ``1/√M``
  factor cancels too and is dropped. Invalid keys get zero rows.

  ``w_MH [M, H]``: ``M`` random features for head dim ``H``. The returned
  :class:`attn.kernels.linear.FeatureMap` maps queries ``[c, H]`` and keys
  ``[c, H]`` (chunks of ``c`` rows) to float32 features ``[c, M]``.
  """
  root = jnp.sqrt(jnp.asarray(scale, F32))

  def logits(x_cH):
    x_cH = x_cH.astype(F32) * root
    return (jnp.einsum("ch,mh->cm", x_cH, w_MH)
            - 0.5 * jnp.sum(x_cH * x_cH, axis=-1, keepdims=True))

  def query(q_cH):
    l_cM = logits(q_cH)
    return jnp.exp(l_cM - jax.lax.stop_gradient(
        jnp.max(l_cM, axis=-1, keepdims=True)))

  def key(k_cH, valid_c, stab):
    ok = valid_c[:, None]
    return jnp.where(ok, jnp.exp(jnp.where(ok, logits(k_cH) - stab, 0.0)),
                     0.0)

  def key_max(k_cH, valid_c):
    return jnp.max(jnp.where(valid_c[:, None], logits(k_cH), MASK_VALUE))

  return linear.FeatureMap(query=query, key=key, key_max=key_max)


@register_attention(
    "performer", exact=False, causal=True, padding=True,
    cross=True,
    complexity="time O((T+S)·M·H), memory O((T+S)·M) for M random features",
    description="FAVOR+ positive orthogonal random features approximating "
    "the softmax kernel (Choromanski et al. 2021); causal via prefix sums",
    option_rules={"num_features": registry.int_option(1)})
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
    chunk_size: option, tokens per scan step.
    scale: option, softmax temperature (default ``1/sqrt(H)``).
    is_causal: sum over ``s <= t`` (chunked prefix sums).
    query_seq_lengths / key_value_seq_lengths: int ``[B]``.
    segment_ids: not supported (``ValueError``).
    rng: PRNG key for ``W``; a module redraws features by passing a new one.

  Returns:
    ``[B, T, N, Dv]`` in the input dtype; computed in float32. Time
    ``O(B·N·(T+S)·M·(H+Dv))`` (causal adds ``O(B·N·T·c·(M+Dv))``), memory
    ``O(B·N·(T+S)·(H+Dv))`` plus ``O(c·M)`` per scan step.
  """
  registry.check_options(
      "performer", num_features=num_features, seed=seed, chunk_size=chunk_size,
      scale=scale)
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths, segment_ids=segment_ids)
  blocks.check_supported("performer", inputs, causal=True, segments=False)
  if num_features < 1:
    raise ValueError(f"performer: num_features must be >= 1, got "
                     f"{num_features}")
  w_MH = orthogonal_features(*gaussian_draws(rng, seed, num_features,
                                             inputs.query.shape[-1]))

  return linear.kernelized_attention(
      "performer", inputs, favor_feature_map(w_MH, inputs.scale),
      chunk_size=chunk_size)
