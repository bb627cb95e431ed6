"""BigBird block-sparse attention (Zaheer et al. 2020).

Sequences are cut into blocks of ``block_size``. Query block ``i`` attends,
with exact softmax over the union, to

* ``num_window_blocks`` key blocks around ``i`` (sliding window),
* the first ``num_global_blocks`` key blocks (global tokens),
* ``num_random_blocks`` other key blocks drawn once from ``seed``;

and the queries of the global blocks attend to every key. The block pattern
is static (NumPy at trace time): time and memory are
``O(T·b·(w + g + r) + g·b·S)`` — linear in the length for fixed options.
When the window covers every block the pattern is dense and the result is
exact softmax attention.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attn.kernels import blocks, canonical
from attn import registry
from attn.registry import register_attention


def bigbird_block_table(n_q: int, n_k: int, *, num_window_blocks: int,
                        num_global_blocks: int, num_random_blocks: int,
                        is_causal: bool, seed: int) -> np.ndarray:
  """Key-block indices ``[n_q, C]`` each query block attends (``-1`` = none).

  Row ``i``: window blocks ``i - (w-1)//2 .. i + w//2`` (only ``<= i`` when
  causal), global blocks ``0 .. g-1``, then up to ``r`` random blocks drawn
  without replacement from the remaining blocks (only ``< i`` when causal)
  by ``np.random.default_rng(seed)``. Out-of-range and repeated entries are
  ``-1``, so each key block appears at most once per row.
  """
  left = (num_window_blocks - 1) // 2
  right = 0 if is_causal else num_window_blocks - 1 - left
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n_q):
    fixed = [j for j in range(i - left, i + right + 1) if 0 <= j < n_k]
    fixed += [j for j in range(min(num_global_blocks, n_k))
              if j not in fixed and (j <= i or not is_causal)]
    limit = min(i, n_k) if is_causal else n_k
    candidates = np.setdiff1d(np.arange(limit), fixed)
    picked = rng.choice(candidates, min(num_random_blocks, len(candidates)),
                        replace=False) if len(candidates) else []
    rows.append(fixed + sorted(int(j) for j in picked))
  width = max(1, max(len(r) for r in rows))
  table = np.full((n_q, width), -1, np.int64)
  for i, r in enumerate(rows):
    table[i, :len(r)] = r
  return table


@register_attention(
    "bigbird", exact=False, causal=True, padding=True, cross=True,
    complexity="time O(T·b·(w+g+r) + g·b·S), memory the same (block b, "
    "w window / g global / r random blocks)",
    description="block-sparse window + global + random blocks, exact softmax "
    "on the pattern (Zaheer et al. 2020)",
    option_rules={
        "block_size": registry.int_option(1),
        "num_window_blocks": registry.int_option(1),
        "num_global_blocks": registry.int_option(0),
        "num_random_blocks": registry.int_option(0)})
def bigbird_attention(query, key, value, bias=None, mask=None, *,
                      block_size: int = 64, num_window_blocks: int = 3,
                      num_global_blocks: int = 2, num_random_blocks: int = 3,
                      seed: int = 0, scale=None, is_causal: bool = False,
                      query_seq_lengths=None, key_value_seq_lengths=None,
                      segment_ids=None):
  """BigBird (ITC) block-sparse attention.

  Approximates softmax attention by exact softmax over a sparse block
  pattern (window + global + random key blocks per query block; global
  query blocks see all keys). Exact when ``num_window_blocks >= 2·n - 1``
  for ``n`` blocks, or ``num_global_blocks >= n``.

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]``, ``N % K == 0`` (GQA). Query block ``i`` is aligned
      with key block ``i`` for cross-attention.
    value: ``[B, S, K, Dv]``.
    bias: not supported (``ValueError``).
    mask: padding mask ``[B, 1, 1, S]`` / ``[B, 1, T, 1]`` only.
    block_size: option ``b``.
    num_window_blocks: option ``w``, blocks in the sliding window (odd keeps
      it centred).
    num_global_blocks: option ``g``, leading blocks that attend and are
      attended globally.
    num_random_blocks: option ``r``, random key blocks per query block.
    seed: option, seeds the random blocks (the pattern is fixed per seed).
    scale: option, multiplier of ``q·k`` (default ``1/sqrt(H)``).
    is_causal: restrict to ``s <= t`` (window and random blocks from the
      past only).
    query_seq_lengths / key_value_seq_lengths: int ``[B]``.
    segment_ids: ``[B, T]`` or ``([B, T], [B, S])``: attend within segment.

  Returns:
    ``[B, T, N, Dv]`` in the input dtype. Time and memory
    ``O(B·N·(T·b·(w+g+r) + g·b·S))``.
  """
  registry.check_options(
      "bigbird", block_size=block_size, num_window_blocks=num_window_blocks,
      num_global_blocks=num_global_blocks, num_random_blocks=num_random_blocks,
      seed=seed, scale=scale)
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths, segment_ids=segment_ids)
  blocks.check_supported("bigbird", inputs, causal=True, segments=True)
  if (block_size < 1 or num_window_blocks < 1 or num_global_blocks < 0
      or num_random_blocks < 0):
    raise ValueError(
        "bigbird: need block_size >= 1, num_window_blocks >= 1, "
        "num_global_blocks >= 0, num_random_blocks >= 0; got "
        f"{block_size}, {num_window_blocks}, {num_global_blocks}, "
        f"{num_random_blocks}")
  q_valid, kv_valid = blocks.validity("bigbird", inputs)
  B, T, S, *_ = inputs.shape
  n_q, n_k = -(-T // block_size), -(-S // block_size)
  table = bigbird_block_table(
      n_q, n_k, num_window_blocks=num_window_blocks,
      num_global_blocks=num_global_blocks,
      num_random_blocks=num_random_blocks, is_causal=inputs.is_causal,
      seed=seed)
  n_global_q = min(num_global_blocks * block_size, T)

  def one_head(q_TH, k_SH, v_SD, kv_valid_S, q_seg_T, kv_seg_S):
    out_TD = blocks.sparse_rows_one_head(
        q_TH, k_SH, v_SD, table, block=block_size, scale=inputs.scale,
        is_causal=inputs.is_causal, window=None, kv_valid=kv_valid_S,
        q_segment=q_seg_T, kv_segment=kv_seg_S)
    if not n_global_q:
      return out_TD
    # Queries of the global blocks attend to every key: O(g·b·S).
    rows_YD = blocks.dense_rows_one_head(
        q_TH[:n_global_q], np.arange(n_global_q), k_SH, v_SD,
        scale=inputs.scale, is_causal=inputs.is_causal, kv_valid=kv_valid_S,
        q_segment=q_seg_T, kv_segment=kv_seg_S)
    return jnp.concatenate([rows_YD, out_TD[n_global_q:]], axis=0)

  out = blocks.map_heads(one_head, inputs.query, inputs.key, inputs.value,
                         kv_valid, inputs.q_segment_ids, inputs.kv_segment_ids)
  return blocks.finish(out, inputs, q_valid)
