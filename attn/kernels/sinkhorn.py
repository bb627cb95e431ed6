"""Sparse Sinkhorn attention (Tay et al. 2020): sorted-block attention.

The keys are cut into ``n_b = ceil(S / b)`` blocks of ``b`` (the queries into
``n_b`` blocks of ``ceil(T / n_b)``). A sorting network scores, for every
block ``i``, every partner block ``j`` from the block's pooled (mean) keys:
``R_i = relu(k̄_i W1 + b1) W2 + b2`` (``W1 [H, hidden]``, ``W2 [hidden, n_b]``,
shared by the heads). ``n_iters`` Sinkhorn normalisations of ``R / τ`` (in
log space, alternately over rows and columns) give a soft permutation ``P``.
Query block ``i`` attends, with one softmax, to

* its own key block ``i`` and
* a sorted block ``K̃_i``: slot ``p`` is the mean of the keys at slot ``p``
  of the ``m = partners`` blocks ``j`` with the largest ``P_ij``, weighted by
  ``P_ij`` (renormalised over those blocks and over valid keys; a slot with
  no valid key is masked). Values alike. ``m >= n_b`` is the paper's
  ``K̃ = P K`` (up to the row normalisation); a small ``m`` keeps the mixing
  linear in ``T``.

Causal (``is_causal=True``, after the paper's causal Sinkhorn): block
``i`` may only be paired with earlier blocks ``j < i``, its sorting-network
input is the mean of the keys of blocks ``< i``, and ``P`` is only
row-normalised (column balancing would let later blocks reweight earlier
rows), so no output depends on a later token. ``block_size >= S`` (one
block) is exact softmax attention (the sorted block duplicates the own block,
which leaves the softmax average unchanged).

Time ``O(T·(b + m)·H + n_b²·(hidden + n_iters))`` per head with
``n_b = S/b``; the ``[n_b, n_b]`` permutation is the only quadratic term,
``b²`` times smaller than the scores of exact attention. Blocks run in steps
of ``QUERIES_PER_STEP`` queries (:func:`attn.kernels.blocks.map_blocks`):
memory ``O(T·H + n_b²)`` forward, ``O(T·(b + m·H))`` backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attn.masks import MASK_VALUE
from attn.masks import masked_softmax
from attn.kernels import blocks, canonical
from attn.kernels.blocks import from_blocks, map_blocks, to_blocks
from attn import registry
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32
_PARAMS = ("sort_w1", "sort_b1", "sort_w2", "sort_b2")


def num_blocks(key_length: int, block_size: int) -> int:
  """``ceil(S / block_size)``: key blocks, and rows/columns of ``P``."""
  return max(1, int(np.ceil(key_length / block_size)))


def sinkhorn_param_shapes(query_shape, key_shape, *, block_size: int = 64,
                          hidden: int = 64, **unused_options):
  """Sorting-network parameters for ``query [B, T, N, H]``, ``key
  [B, S, K, H]``: ``sort_w1 [H, hidden]``, ``sort_b1 [hidden]``,
  ``sort_w2 [hidden, n_b]``, ``sort_b2 [n_b]`` with ``n_b = ceil(S / b)``
  (the most blocks the parameters serve)."""
  registry.check_options(
      "sinkhorn", block_size=block_size, hidden=hidden)
  del unused_options
  H = query_shape[-1]
  n_b = num_blocks(key_shape[1], block_size)
  init = jax.nn.initializers
  return {"sort_w1": ((H, hidden), init.lecun_normal()),
          "sort_b1": ((hidden,), init.zeros),
          "sort_w2": ((hidden, n_b), init.lecun_normal()),
          "sort_b2": ((n_b,), init.zeros)}


def sinkhorn_normalize(logits_IJ: Array, allowed_IJ: Array,
                       n_iters: int) -> Array:
  """``n_iters`` alternating row/column normalisations in log space.

  ``logits_IJ [I, J]`` float, ``allowed_IJ [I, J]`` bool -> ``P [I, J]``.

  Returns ``P = exp(logits)`` on allowed entries (0 elsewhere); rows and
  columns without an allowed entry stay 0. With every entry allowed, ``P``
  approaches a doubly stochastic matrix as ``n_iters`` grows.
  """
  def normalize(x, axis):
    lse = jax.nn.logsumexp(x, axis=axis, keepdims=True)
    return jnp.where(allowed_IJ, x - lse, MASK_VALUE)

  x = jnp.where(allowed_IJ, logits_IJ, MASK_VALUE)
  x = jax.lax.fori_loop(0, n_iters,
                        lambda _, x: normalize(normalize(x, 1), 0), x)
  return jnp.where(allowed_IJ, jnp.exp(x), 0.0)


def _pooled_keys(k_IBH: Array, ok_IB: Array, is_causal: bool) -> Array:
  """Mean of the valid keys per block ``[n_b, H]``; causal: of all blocks
  strictly before (zeros where there are none)."""
  sums_IH = jnp.einsum("ibh,ib->ih", k_IBH.astype(F32), ok_IB.astype(F32))
  counts_I = jnp.sum(ok_IB, axis=1).astype(F32)
  if is_causal:
    sums_IH = jnp.cumsum(sums_IH, axis=0) - sums_IH
    counts_I = jnp.cumsum(counts_I) - counts_I
  return sums_IH / jnp.maximum(counts_I, 1.0)[:, None]


def _sinkhorn_head(q_TH, k_SH, v_SD, valid_S, params, *, n_b: int,
                   partners: int, n_iters: int, temperature: float, scale,
                   is_causal: bool) -> Array:
  """One head of Sinkhorn attention on unpadded inputs."""
  T, H = q_TH.shape
  S = k_SH.shape[0]
  bq, bk = int(np.ceil(T / n_b)), int(np.ceil(S / n_b))
  q_IQH = to_blocks(q_TH, bq, num_blocks=n_b)
  k_IBH = to_blocks(k_SH, bk, num_blocks=n_b)
  v_IBD = to_blocks(v_SD, bk, num_blocks=n_b)
  ok_IB = to_blocks(valid_S, bk, False, num_blocks=n_b)

  pooled_IH = _pooled_keys(k_IBH, ok_IB, is_causal)
  hidden_IA = jax.nn.relu(pooled_IH @ params["sort_w1"].astype(F32)
                          + params["sort_b1"].astype(F32))
  logits_IJ = (hidden_IA @ params["sort_w2"][:, :n_b].astype(F32)
               + params["sort_b2"][:n_b].astype(F32)) / temperature
  block_I = jnp.arange(n_b)
  allowed_IJ = (block_I[None, :] < block_I[:, None] if is_causal
                else jnp.ones((n_b, n_b), bool))
  # Column balancing would let later blocks reweight earlier rows, so causal
  # attention only normalises rows (one softmax over the earlier blocks).
  P_IJ = (masked_softmax(logits_IJ, allowed_IJ) if is_causal
          else sinkhorn_normalize(logits_IJ, allowed_IJ, n_iters))

  # sorted block: P-weighted mean of the valid keys at each slot, over the
  # `partners` largest entries of each row of P.
  p_IM, idx_IM = jax.lax.top_k(P_IJ, min(partners, n_b))
  causal_QB = jnp.tril(jnp.ones((bq, bk), bool))  # T == S: blocks align

  def block(q_QH, k_BH, v_BD, ok_B, p_M, idx_M):
    w_MB = p_M[:, None] * ok_IB[idx_M].astype(F32)
    mass_B = jnp.sum(w_MB, axis=0)
    w_MB = w_MB / jnp.where(mass_B > 0, mass_B, 1.0)[None, :]
    ks_BH = jnp.einsum("mb,mbh->bh", w_MB, k_IBH[idx_M].astype(F32))
    vs_BD = jnp.einsum("mb,mbd->bd", w_MB, v_IBD[idx_M].astype(F32))
    own = jnp.einsum("qh,bh->qb", q_QH, k_BH, preferred_element_type=F32)
    srt = jnp.einsum("qh,bh->qb", q_QH.astype(F32), ks_BH)
    own_mask = jnp.broadcast_to(ok_B[None, :], own.shape)
    if is_causal:
      own_mask &= causal_QB
    srt_mask = jnp.broadcast_to((mass_B > 0)[None, :], srt.shape)
    w = masked_softmax(jnp.concatenate([own, srt], -1) * scale,
                       jnp.concatenate([own_mask, srt_mask], -1))
    return (jnp.einsum("qb,bd->qd", w[:, :bk], v_BD.astype(F32))
            + jnp.einsum("qb,bd->qd", w[:, bk:], vs_BD))

  out_IQD = map_blocks(block, (q_IQH, k_IBH, v_IBD, ok_IB, p_IM, idx_IM), bq)
  return from_blocks(out_IQD, T)


@register_attention(
    "sinkhorn", exact=False, causal=True, padding=True, cross=True,
    complexity="time O(T·(b + m)·H + (S/b)²) (block size b, m partners), "
    "memory O(T·H + (S/b)²) forward, O(T·(b + m·H)) backward",
    description="Sparse Sinkhorn attention: each block attends itself and a "
    "softly sorted partner block (Sinkhorn-balanced sorting network)",
    metadata={"param_shapes": sinkhorn_param_shapes},
    option_rules={
        "block_size": registry.int_option(1),
        "partners": registry.int_option(1),
        "n_iters": registry.int_option(0),
        "temperature": registry.float_option(positive=True),
        "hidden": registry.int_option(1)})
def sinkhorn_attention(query, key, value, bias=None, mask=None, *,
                       block_size: int = 64, partners: int = 4,
                       n_iters: int = 8,
                       temperature: float = 0.75, hidden: int = 64,
                       scale=None, is_causal=False, query_seq_lengths=None,
                       key_value_seq_lengths=None, segment_ids=None,
                       local_window_size=None, params=None):
  """Sparse Sinkhorn attention: own block + Sinkhorn-sorted partner block.

  Args:
    query: ``[B, T, N, H]``; key ``[B, S, K, H]``; value ``[B, S, K, Dv]``
      with ``N % K == 0`` (kv heads are shared).
    bias: not supported (``ValueError``).
    mask: ``None`` or a key-padding mask broadcastable to ``[B, N, 1, S]``;
      dense masks raise ``ValueError``.
    block_size: key block ``b``; ``b >= S`` is exact attention.
    partners: ``m``, entries of each row of ``P`` mixed into the sorted
      block (renormalised); ``m >= n_b`` is the paper's full soft
      permutation, ``m = 1`` a hard sort (no gradient to the sorter).
    n_iters: Sinkhorn normalisation rounds (rows then columns); causal
      attention normalises rows once.
    temperature: ``τ``, divides the sorting logits (lower = harder sort).
    hidden: sorting-network width (sets the parameter shapes).
    scale: multiplier of ``q·k``, default ``1/sqrt(H)``.
    is_causal: causal Sinkhorn (needs ``T == S``).
    query_seq_lengths / key_value_seq_lengths: int ``[B]`` valid lengths.
    segment_ids / local_window_size: not supported (``ValueError``).
    params: ``sort_w1, sort_b1, sort_w2, sort_b2`` from
      :func:`sinkhorn_param_shapes` (``sort_w2`` may have more columns than
      blocks; they are sliced).

  Returns:
    ``[B, T, N, Dv]``. Cross-attention pairs query block ``i`` with key
    block ``i``. Time ``O(T·(b + m)·H + (S/b)²)`` per head, memory
    ``O(T·H + (S/b)²)`` forward, ``O(T·(b + m·H))`` backward.
  """
  registry.check_options(
      "sinkhorn", block_size=block_size, partners=partners, n_iters=n_iters,
      temperature=temperature, hidden=hidden, scale=scale)
  if (int(block_size) < 1 or int(partners) < 1 or int(n_iters) < 0
      or not float(temperature) > 0):
    raise ValueError(f"sinkhorn: need block_size >= 1, partners >= 1, "
                     f"n_iters >= 0, temperature > 0; got {block_size}, "
                     f"{partners}, {n_iters}, {temperature}")
  del hidden  # sets the parameter shapes only
  if params is None or any(name not in params for name in _PARAMS):
    raise ValueError(
        f"sinkhorn needs params {list(_PARAMS)}, got "
        f"{None if params is None else sorted(params)}; create them from "
        "attn.registry.attention_param_shapes")
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids)
  blocks.check_supported("sinkhorn", inputs, causal=True, segments=False)
  empty = blocks.no_keys_output(inputs)
  if empty is not None:
    return empty
  q_valid, kv_valid = blocks.validity("sinkhorn", inputs, per_head=True)
  B, T, S, N, K, H, Dv = inputs.shape
  if inputs.is_causal and T != S:
    raise ValueError(f"sinkhorn: causal attention needs T == S (aligned "
                     f"blocks), got T={T}, S={S}")
  n_b = num_blocks(S, int(block_size))
  have = params["sort_w2"].shape[-1]
  if params["sort_w1"].shape[0] != H or have < n_b:
    raise ValueError(f"sinkhorn: params serve head_dim "
                     f"{params['sort_w1'].shape[0]} and {have} blocks; the "
                     f"inputs need head_dim {H} and {n_b} blocks")

  def one_head(q_TH, k_SH, v_SD, valid_S):
    return _sinkhorn_head(q_TH, k_SH, v_SD, valid_S, params, n_b=n_b,
                          partners=int(partners), n_iters=int(n_iters),
                          temperature=float(temperature), scale=inputs.scale,
                          is_causal=inputs.is_causal)

  out = blocks.map_heads(one_head, inputs.query, inputs.key, inputs.value,
                         per_head=(kv_valid,))
  return blocks.finish(out, inputs, q_valid)
