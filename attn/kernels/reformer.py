"""Reformer LSH attention (Kitaev et al. 2020).

Per hash round ``r``, a random rotation ``R_r [H, n_buckets/2]`` buckets a
vector by ``argmax([xR_r, -xR_r])`` (angular LSH). Queries and keys are
sorted by ``(bucket, position)`` (padded keys last), cut into ``n_chunks``
equal chunks, and
query chunk ``i`` attends key chunks ``i`` and ``i - 1`` (cyclically) in
that order. Each round gives an output and its log-normaliser ``lse_r``; the
rounds are combined as ``Σ_r softmax_r(lse_r) · out_r`` (no de-duplication of
keys seen in several rounds).

* ``shared_qk=False`` (default): queries and keys are hashed with the same
  rotations and sorted separately; one chunk (``chunk_size >= max(T, S)``)
  is exact softmax attention. Not causal (``ValueError``): which past keys
  share a chunk with a query would depend on later tokens.
* ``shared_qk=True``: the paper's shared-QK attention: keys are the unit-
  normalised queries (the ``key`` argument's values are not read, ``S`` must
  equal ``T``), one sort serves both, and a token attends to itself only
  when nothing else is available.

Causal (``shared_qk=True``): query ``t`` attends itself and the
``chunk_size`` most recent earlier tokens of its own bucket, in every round.
Those always lie in its chunk or the previous one, and the set depends on no
later token (not even through the chunk boundaries), so perturbing tokens
after ``t`` never changes output ``t``.

Time ``O(n_hashes·(T·(c + n_buckets)·H + T log T))`` for chunk size ``c``
(``n_buckets`` is capped by default, see ``MAX_AUTO_BUCKETS``); no ``[T, S]``
matrix. Chunks run in steps of ``QUERIES_PER_STEP`` queries
(:func:`attn.kernels.blocks.map_blocks`): memory ``O(n_hashes·T·(H +
n_buckets))`` forward, ``O(n_hashes·T·c)`` backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attn.masks import MASK_VALUE
from attn.masks import masked_softmax
from attn.kernels import blocks, canonical
from attn.kernels.blocks import map_blocks, pad_axis0
from attn import registry
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32
# Logit given to a token's own key under shared-QK attention: finite, so it
# is used only when nothing else in the candidate set is allowed.
SELF_LOGIT = -1e5
# Default n_buckets is n_chunks (rounded up to even) up to this many; hashing
# costs O(T·n_buckets·H), so an uncapped default would grow as T².
MAX_AUTO_BUCKETS = 64


def lsh_buckets(x_TH: Array, rotations_HRB: Array) -> Array:
  """Angular LSH: ``argmax([x R_r, -x R_r])`` per round -> int32 ``[R, T]``.

  ``rotations_HRB``: ``[H, n_hashes, n_buckets/2]``.
  """
  proj_RTB = jnp.einsum("th,hrb->rtb", x_TH, rotations_HRB.astype(x_TH.dtype),
                        preferred_element_type=F32)
  # argmax over [proj, -proj] without materialising the concatenation.
  positive = jnp.max(proj_RTB, -1) >= -jnp.min(proj_RTB, -1)
  return jnp.where(positive, jnp.argmax(proj_RTB, -1),
                   proj_RTB.shape[-1] + jnp.argmin(proj_RTB, -1)
                   ).astype(jnp.int32)


def _sort_order(buckets_RT: Array, valid_T: Array, n_buckets: int):
  """Sorts by (bucket, position), invalid entries (padding) last.

  Returns ``(order [R, L], buckets [R, L])`` with invalid entries in bucket
  ``n_buckets``, so they never move a valid entry to another chunk.
  """
  L = buckets_RT.shape[-1]
  buckets_RT = jnp.where(valid_T, buckets_RT, n_buckets)
  return jnp.argsort(buckets_RT * L + jnp.arange(L), axis=-1), buckets_RT


def _look_back(x_C: Array) -> Array:
  """``[C, c, ...]`` -> ``[C, 2c, ...]``: each chunk followed by the previous
  one (cyclically)."""
  return jnp.concatenate([x_C, jnp.roll(x_C, 1, axis=0)], axis=1)


def _attend_round(q_TH, k_SH, v_SD, valid_S, q_order, k_order, q_buckets,
                  k_buckets, *, n_chunks, scale, is_causal, exclude_self):
  """One hash round on padded inputs; returns unsorted ``(out [T, Dv],
  lse [T], any [T])``.

  Query chunk ``i`` of the sorted queries sees key chunks ``i`` and ``i-1``.
  Causal (shared order only): query ``t`` sees itself and the ``c`` most
  recent earlier keys of its own bucket, which sit at most ``c`` places
  before it in the sorted order; within a bucket the sorted order is the
  position order, so this set depends on no later token.
  """
  Tp, H = q_TH.shape
  Sp = k_SH.shape[0]
  cq, ck = Tp // n_chunks, Sp // n_chunks

  def chunks(x, order, size):
    return x[order].reshape((n_chunks, size) + x.shape[1:])

  q_side = (chunks(q_TH, q_order, cq), q_order.reshape(n_chunks, cq),
            jnp.arange(Tp).reshape(n_chunks, cq),
            chunks(q_buckets, q_order, cq))
  k_side = (chunks(k_SH, k_order, ck), chunks(v_SD, k_order, ck),
            k_order.reshape(n_chunks, ck), chunks(valid_S, k_order, ck),
            jnp.arange(Sp).reshape(n_chunks, ck),
            chunks(k_buckets, k_order, ck))
  if n_chunks > 1:
    k_side = tuple(map(_look_back, k_side))

  def chunk(q_QH, qpos_Q, qidx_Q, qb_Q, k_KH, v_KD, kpos_K, ok_K, kidx_K,
            kb_K):
    scores = jnp.einsum("qh,kh->qk", q_QH, k_KH,
                        preferred_element_type=F32) * scale
    mask = jnp.broadcast_to(ok_K[None, :], scores.shape)
    if is_causal:
      back = qidx_Q[:, None] - kidx_K[None, :]
      mask &= ((kpos_K[None, :] <= qpos_Q[:, None])
               & (kb_K[None, :] == qb_Q[:, None]) & (back >= 0)
               & (back <= cq))
    if exclude_self:
      scores = jnp.where(kpos_K[None, :] == qpos_Q[:, None], SELF_LOGIT,
                         scores)
    scores = jnp.where(mask, scores, MASK_VALUE)
    row_max = jax.lax.stop_gradient(jnp.max(scores, -1, keepdims=True))
    unnorm = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(unnorm, -1, keepdims=True)
    has_any = denom > 0
    out_QD = jnp.einsum("qk,kd->qd",
                        unnorm / jnp.where(has_any, denom, 1.0),
                        v_KD.astype(F32))
    lse_Q = row_max + jnp.log(jnp.where(has_any, denom, 1.0))
    return out_QD, lse_Q[:, 0], has_any[:, 0]

  out_CQD, lse_CQ, any_CQ = map_blocks(chunk, q_side + k_side, cq)
  inverse = jnp.zeros_like(q_order).at[q_order].set(jnp.arange(Tp))
  return (out_CQD.reshape(Tp, -1)[inverse], lse_CQ.reshape(Tp)[inverse],
          any_CQ.reshape(Tp)[inverse])


def _reformer_head(q_TH, k_SH, v_SD, valid_S, rotations, *, n_chunks: int,
                   n_buckets: int, shared_qk: bool, scale, is_causal: bool):
  """One head: hash, sort, chunked attention per round, combine rounds."""
  T, S = q_TH.shape[0], k_SH.shape[0]
  Tp = n_chunks * int(np.ceil(T / n_chunks))
  Sp = n_chunks * int(np.ceil(S / n_chunks))
  q = pad_axis0(q_TH, Tp)
  if shared_qk:
    qf = q_TH.astype(F32)
    k_SH = (qf * jax.lax.rsqrt(jnp.sum(qf * qf, -1, keepdims=True) + 1e-6)
            ).astype(q_TH.dtype)
  k = pad_axis0(k_SH, Sp)
  v = pad_axis0(v_SD, Sp)
  valid = pad_axis0(valid_S, Sp, False)
  q_order, q_buckets = _sort_order(lsh_buckets(q, rotations),
                                   jnp.arange(Tp) < T, n_buckets)
  if shared_qk:
    k_order, k_buckets = q_order, q_buckets
  else:
    k_order, k_buckets = _sort_order(lsh_buckets(k, rotations), valid,
                                     n_buckets)

  def one_round(qo, ko, qb, kb):
    return _attend_round(q, k, v, valid, qo, ko, qb, kb, n_chunks=n_chunks,
                         scale=scale, is_causal=is_causal,
                         exclude_self=shared_qk)

  out_RTD, lse_RT, any_RT = jax.vmap(one_round)(q_order, k_order, q_buckets,
                                                k_buckets)
  round_w_TR = masked_softmax(lse_RT.T, any_RT.T)
  return jnp.einsum("tr,rtd->td", round_w_TR, out_RTD)[:T]


N_BUCKETS_OPTION = registry.OptionRule(
    "an even int >= 2, or None (chosen from the length)",
    lambda x: x is None or (registry.int_option(2).ok(x) and x % 2 == 0))


@register_attention(
    "reformer", aliases=("lsh",), exact=False, causal=True, padding=True,
    cross=True,
    complexity="time O(n_hashes·(T·(c + n_buckets)·H + T·log T)) (chunk "
    "size c), memory O(n_hashes·T·(H + n_buckets)) forward, "
    "O(n_hashes·T·c) backward",
    description="Reformer LSH attention: hash-sort into chunks, attend own "
    "and previous chunk, combine hash rounds",
    option_rules={
        "n_hashes": registry.int_option(1),
        "n_buckets": N_BUCKETS_OPTION,
        "shared_qk": registry.bool_option()})
def reformer_attention(query, key, value, bias=None, mask=None, *,
                       n_hashes: int = 2, n_buckets=None,
                       chunk_size: int = 64, shared_qk: bool = False,
                       seed: int = 0, scale=None, is_causal=False,
                       query_seq_lengths=None, key_value_seq_lengths=None,
                       segment_ids=None, local_window_size=None, rng=None):
  """LSH attention: softmax attention within hash-bucket-sorted chunks.

  Args:
    query: ``[B, T, N, H]``; key ``[B, S, K, H]``; value ``[B, S, K, Dv]``
      with ``N % K == 0`` (kv heads are shared).
    bias: not supported (``ValueError``).
    mask: ``None`` or a key-padding mask broadcastable to ``[B, N, 1, S]``;
      dense masks raise ``ValueError``.
    n_hashes: hash rounds; more rounds, better approximation, linear cost.
    n_buckets: even number of buckets; default ``n_chunks`` rounded up to
      even (a bucket fills about one chunk), at most ``MAX_AUTO_BUCKETS``
      (hashing costs ``O(T·n_buckets·H)``).
    chunk_size: ``c``; ``n_chunks = ceil(max(T, S) / c)`` and the queries
      and keys are each padded to ``n_chunks`` equal chunks.
    shared_qk: keys are the unit-normalised queries (``key`` values unused,
      ``S`` must equal ``T``); a token attends to itself only when nothing
      else is available. Required for ``is_causal``.
    seed: when ``rng`` is None the rotations are
      ``numpy.random.default_rng(seed).standard_normal(...)``.
    scale: multiplier of ``q·k``, default ``1/sqrt(H)``.
    is_causal: strictly causal LSH attention (``shared_qk=True`` only):
      itself plus the ``chunk_size`` most recent earlier same-bucket tokens.
    query_seq_lengths / key_value_seq_lengths: int ``[B]`` valid lengths.
    segment_ids / local_window_size: not supported (``ValueError``).
    rng: PRNG key; the rotations ``[H, n_hashes, n_buckets/2]`` (shared by
      batch and heads) are ``jax.random.normal(rng, ...)``. Deterministic for
      a fixed key or seed.

  Returns:
    ``[B, T, N, Dv]``. Time ``O(n_hashes·(T·(c + n_buckets)·H + T log T))``
    per head, memory ``O(n_hashes·T·(H + n_buckets))`` forward and
    ``O(n_hashes·T·c)`` backward.
  """
  registry.check_options(
      "reformer", n_hashes=n_hashes, n_buckets=n_buckets, chunk_size=chunk_size,
      shared_qk=shared_qk, seed=seed, scale=scale)
  if int(n_hashes) < 1:
    raise ValueError(f"reformer: n_hashes must be >= 1, got {n_hashes}")
  if int(chunk_size) < 1:
    raise ValueError(f"reformer: chunk_size must be >= 1, got {chunk_size}")
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids)
  blocks.check_supported("reformer", inputs, causal=True, segments=False)
  empty = blocks.no_keys_output(inputs)
  if empty is not None:
    return empty
  q_valid, kv_valid = blocks.validity("reformer", inputs, per_head=True)
  B, T, S, N, K, H, Dv = inputs.shape
  if shared_qk and S != T:
    raise ValueError(f"reformer(shared_qk=True) derives keys from queries and "
                     f"needs self-attention lengths, got T={T}, S={S}")
  if inputs.is_causal and not shared_qk:
    raise ValueError(
        "reformer: is_causal=True needs shared_qk=True (with separately "
        "sorted keys, which past keys share a chunk with a query depends on "
        "later tokens)")
  n_chunks = max(1, int(np.ceil(max(T, S) / int(chunk_size))))
  if n_buckets is None:
    n_buckets = min(2 * int(np.ceil(n_chunks / 2)), MAX_AUTO_BUCKETS)
  if int(n_buckets) < 2 or int(n_buckets) % 2:
    raise ValueError(f"reformer: n_buckets must be even and >= 2, got "
                     f"{n_buckets}")
  shape = (H, int(n_hashes), int(n_buckets) // 2)
  if rng is None:  # a trace-time constant: no random-number op in the graph
    rotations = jnp.asarray(
        np.random.default_rng(int(seed)).standard_normal(shape), F32)
  else:
    rotations = jax.random.normal(rng, shape, F32)

  def one_head(q_TH, k_SH, v_SD, valid_S):
    return _reformer_head(q_TH, k_SH, v_SD, valid_S, rotations,
                          n_chunks=n_chunks, n_buckets=int(n_buckets),
                          shared_qk=bool(shared_qk), scale=inputs.scale,
                          is_causal=inputs.is_causal)

  out = blocks.map_heads(one_head, inputs.query, inputs.key, inputs.value,
                         per_head=(kv_valid,))
  return blocks.finish(out, inputs, q_valid)
