"""Nyströmformer attention (Xiong et al. 2021).

Landmarks ``Q̃, K̃ [m, H]`` are segment means of the (valid) queries and keys.
The softmax matrix is approximated by its Nyström extension::

    F = softmax(Q K̃ᵀ) [T, m],  A = softmax(Q̃ K̃ᵀ) [m, m],  B = softmax(Q̃ Kᵀ) [m, S]
    out = F · pinv(A) · (B V)

with ``pinv`` from the iterative Moore–Penrose scheme of Razavi et al.
(2014) used in the paper. Time ``O((T+S)·m·H + m³)``, memory
``O((T+S)·m)``. With ``m = T = S`` every landmark is one token and the result
equals softmax attention up to the pseudo-inverse's convergence.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from attn.kernels import blocks, canonical
from attn.masks import MASK_VALUE
from attn.masks import masked_softmax
from attn import registry
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32
# Tokens per lax.map / lax.scan step: keeps [chunk, m] scores in cache.
QUERY_CHUNK = 256


def segment_means(x_TH: Array, valid_T: Optional[Array],
                  m: int) -> Tuple[Array, Array]:
  """Means of ``m`` contiguous segments of the valid rows of ``x``.

  The ``L`` valid rows (in order) are split into ``m`` segments of sizes
  ``floor``/``ceil`` of ``L/m``: row of valid rank ``r`` goes to segment
  ``floor(r·m/L)``. Returns ``(means[m, H] float32, nonempty[m] bool)``;
  empty segments (``L < m``) have zero means.
  """
  T = x_TH.shape[0]
  if valid_T is None:
    rank, count = jnp.arange(T), T
  else:
    rank = jnp.cumsum(valid_T.astype(jnp.int32)) - 1
    count = jnp.maximum(jnp.sum(valid_T.astype(jnp.int32)), 1)
  seg = (rank * m) // count
  if valid_T is not None:
    seg = jnp.where(valid_T, seg, m)              # dropped by num_segments
  sums = jax.ops.segment_sum(x_TH.astype(F32), seg, num_segments=m)
  counts = jax.ops.segment_sum(jnp.ones((T,), F32), seg, num_segments=m)
  return sums / jnp.maximum(counts, 1.0)[:, None], counts > 0


def iterative_pinv(a_MN: Array, iterations: int) -> Array:
  """Moore–Penrose pseudo-inverse ``[N, M]`` by Razavi et al.'s iteration.

  ``Z₀ = Aᵀ / (‖A‖₁ ‖A‖_∞)``,
  ``Z ← ¼ Z (13 I − A Z (15 I − A Z (7 I − A Z)))``; converges for any
  ``A`` (cubic order), with matmuls only.
  """
  eye = jnp.eye(a_MN.shape[0], dtype=a_MN.dtype)
  norm1 = jnp.max(jnp.sum(jnp.abs(a_MN), axis=0))
  norm_inf = jnp.max(jnp.sum(jnp.abs(a_MN), axis=1))
  z0 = a_MN.T / jnp.maximum(norm1 * norm_inf, 1e-30)

  def step(_, z):
    az = a_MN @ z
    return 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))

  return jax.lax.fori_loop(0, iterations, step, z0)


def landmark_readout(ql_mH: Array, k_SH: Array, v_SD: Array,
                     kv_valid_S: Optional[Array], *, scale,
                     chunk: int) -> Array:
  """``B V = softmax(scale · Q̃ Kᵀ) V`` for ``m`` landmark queries, ``[m, Dv]``.

  Streams over key chunks with an online softmax (running max and sum), so
  the ``[m, S]`` matrix is never stored. Invalid keys get zero weight; a
  landmark with no valid key reads zeros.
  """
  S, m = k_SH.shape[0], ql_mH.shape[0]
  c = max(1, min(chunk, S))
  n = -(-S // c)
  valid = jnp.ones((S,), bool) if kv_valid_S is None else kv_valid_S
  pieces = lambda x, fill=0: blocks.to_blocks(x, c, fill, num_blocks=n)

  def step(state, xs):
    run_max, run_sum, acc_mD = state
    k_cH, v_cD, ok_c = xs
    s_mc = jnp.where(ok_c[None, :], ql_mH @ k_cH.astype(F32).T * scale,
                     MASK_VALUE)
    new_max = jax.lax.stop_gradient(jnp.maximum(run_max, jnp.max(s_mc, -1)))
    p_mc = jnp.where(ok_c[None, :], jnp.exp(s_mc - new_max[:, None]), 0.0)
    rescale = jnp.exp(run_max - new_max)
    return (new_max, run_sum * rescale + jnp.sum(p_mc, -1),
            acc_mD * rescale[:, None] + p_mc @ v_cD.astype(F32)), None

  init = (jnp.full((m,), MASK_VALUE, F32), jnp.zeros((m,), F32),
          jnp.zeros((m, v_SD.shape[-1]), F32))
  (_, total, acc_mD), _ = jax.lax.scan(
      step, init, (pieces(k_SH), pieces(v_SD), pieces(valid, False)))
  return acc_mD / jnp.where(total > 0, total, 1.0)[:, None]


def nystrom_one_head(q_TH: Array, k_SH: Array, v_SD: Array,
                     q_valid_T: Optional[Array], kv_valid_S: Optional[Array],
                     *, num_landmarks: int, pinv_iterations: int,
                     scale) -> Array:
  """Nyström approximation of ``softmax(scale · q kᵀ) v``, one head.

  Landmarks are segment means over the valid queries / keys; invalid keys
  get zero weight. ``F`` and ``B`` are applied in chunks of ``QUERY_CHUNK``
  tokens.
  Returns ``[T, Dv]`` float32.
  """
  q_TH, k_SH = q_TH.astype(F32), k_SH.astype(F32)
  ql_mH, q_has = segment_means(q_TH, q_valid_T, num_landmarks)
  kl_mH, k_has = segment_means(k_SH, kv_valid_S, num_landmarks)
  a_mm = masked_softmax(ql_mH @ kl_mH.T * scale,
                        q_has[:, None] & k_has[None, :])
  bv_mD = landmark_readout(ql_mH, k_SH, v_SD, kv_valid_S, scale=scale,
                           chunk=QUERY_CHUNK)
  w_mD = iterative_pinv(a_mm, pinv_iterations) @ bv_mD

  def read(q_cH):
    return masked_softmax(q_cH @ kl_mH.T * scale, k_has[None, :]) @ w_mD

  return blocks.map_chunks(read, q_TH, QUERY_CHUNK)


@register_attention(
    "nystrom", exact=False, causal=False,
    padding=True, cross=True,
    complexity="time O((T+S)·m + m³), memory O((T+S)·m) for m landmarks",
    description="Nyström low-rank softmax with segment-mean landmarks and "
    "an iterative pseudo-inverse (Xiong et al. 2021); bidirectional only",
    option_rules={
        "num_landmarks": registry.int_option(1),
        "pinv_iterations": registry.int_option(0)})
def nystrom_attention(query, key, value, bias=None, mask=None, *,
                      num_landmarks: int = 64, pinv_iterations: int = 6,
                      scale=None, is_causal: bool = False,
                      query_seq_lengths=None, key_value_seq_lengths=None,
                      segment_ids=None):
  """Nyströmformer approximation of softmax attention.

  Approximates ``softmax(scale · q kᵀ) v`` by a rank-``m`` Nyström
  extension through ``m`` landmark queries/keys (segment means); the error
  falls as ``m`` grows and vanishes (up to the pseudo-inverse) at
  ``m = T = S``. The paper's depthwise-convolution skip on ``v`` is a
  module-level addition and not part of this kernel.

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]``, ``N % K == 0`` (GQA).
    value: ``[B, S, K, Dv]``.
    bias: not supported (``ValueError``).
    mask: padding mask ``[B, 1, 1, S]`` / ``[B, 1, T, 1]`` only; landmarks
      are computed over the valid tokens only.
    num_landmarks: option ``m``; clamped to ``min(T, S)``.
    pinv_iterations: option, iterations of the pseudo-inverse (paper: 6).
    scale: option, multiplier of ``q·k`` (default ``1/sqrt(H)``).
    is_causal: must be False (``ValueError``).
    query_seq_lengths / key_value_seq_lengths: int ``[B]``.
    segment_ids: not supported (``ValueError``).

  Returns:
    ``[B, T, N, Dv]`` in the input dtype; computed in float32. Time
    ``O(B·N·((T+S)·m·H + m³))``, memory ``O(B·N·(T+S)·m)``.
  """
  registry.check_options(
      "nystrom", num_landmarks=num_landmarks, pinv_iterations=pinv_iterations,
      scale=scale)
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths, segment_ids=segment_ids)
  blocks.check_supported("nystrom", inputs, causal=False, segments=False)
  empty = blocks.no_keys_output(inputs)
  if empty is not None:
    return empty
  if num_landmarks < 1 or pinv_iterations < 0:
    raise ValueError(f"nystrom: need num_landmarks >= 1 and pinv_iterations "
                     f">= 0, got {num_landmarks}, {pinv_iterations}")
  q_valid, kv_valid = blocks.validity("nystrom", inputs)
  B, T, S, *_ = inputs.shape
  m = min(num_landmarks, T, S)

  def one_head(q_TH, k_SH, v_SD, q_valid_T, kv_valid_S):
    return nystrom_one_head(q_TH, k_SH, v_SD, q_valid_T, kv_valid_S,
                            num_landmarks=m, pinv_iterations=pinv_iterations,
                            scale=inputs.scale)

  out = blocks.map_heads(one_head, inputs.query, inputs.key, inputs.value,
                         q_valid, kv_valid)
  return blocks.finish(out, inputs, q_valid)
