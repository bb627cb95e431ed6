"""Longformer attention (Beltagy et al. 2020): sliding window + global tokens.

Every query attends, with one exact softmax, to the keys in its window
``t - left <= s <= t + right`` plus the global tokens; the global tokens'
queries attend to every key. The window part is blockwise (see
:mod:`attn.kernels.local`), the global part is ``Y`` dense rows and ``Y``
extra keys per query: time and memory ``O(T·(w + b + Y) + Y·S)``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import jax
import numpy as np

from attn.kernels import blocks, canonical
from attn.kernels.local import default_block
from attn import registry
from attn.registry import register_attention

Array = jax.Array
WindowSpec = Union[int, Tuple[int, int]]


def global_positions(global_tokens: Union[int, Sequence[int]], T: int,
                     S: int) -> np.ndarray:
  """Sorted distinct global positions from a count or explicit indices.

  An int ``n`` means positions ``0 .. n-1`` (clipped to ``max(T, S)``); a
  sequence lists them. Raises ``ValueError`` for negative or out-of-range
  indices.
  """
  if np.ndim(global_tokens) == 0:
    if int(global_tokens) < 0:
      raise ValueError(f"longformer: global_tokens must be >= 0, got "
                       f"{global_tokens}")
    return np.arange(min(int(global_tokens), max(T, S)))
  pos = np.unique(np.asarray(global_tokens, np.int64))
  bad = pos[(pos < 0) | (pos >= max(T, S))]
  if bad.size:
    raise ValueError(f"longformer: global token indices {bad.tolist()} are "
                     f"outside [0, {max(T, S)}) for T={T}, S={S}")
  return pos


GLOBAL_TOKENS_OPTION = registry.OptionRule(
    "an int >= 0 (the first tokens) or a sequence of token indices",
    lambda x: (registry.int_option(0).ok(x) or (
        isinstance(x, (tuple, list))
        and all(registry.int_option(-(2**62)).ok(i) for i in x))))


@register_attention(
    "longformer", exact=False, causal=True, padding=True, cross=True,
    complexity="time O(T·(w+Y) + Y·S), memory the same (window w, Y global "
    "tokens)",
    description="sliding window plus global tokens, exact softmax on the "
    "pattern (Beltagy et al. 2020)",
    option_rules={
        "window": registry.WINDOW_OPTION,
        "global_tokens": GLOBAL_TOKENS_OPTION,
        "block_size": registry.int_option(1, none=True)})
def longformer_attention(query, key, value, bias=None, mask=None, *,
                         window: WindowSpec = 128,
                         global_tokens: Union[int, Sequence[int]] = 1,
                         block_size: Optional[int] = None, scale=None,
                         is_causal: bool = False, query_seq_lengths=None,
                         key_value_seq_lengths=None, segment_ids=None,
                         local_window_size: Optional[WindowSpec] = None):
  """Longformer: sliding-window attention with global tokens.

  Approximates softmax attention by exact softmax over the pattern
  "window ∪ global keys" (and full rows for global queries). With every
  token global it is exact softmax attention; with no global token it is
  :func:`attn.kernels.local.local_attention`.

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]``, ``N % K == 0`` (GQA).
    value: ``[B, S, K, Dv]``.
    bias: not supported (``ValueError``).
    mask: padding mask ``[B, 1, 1, S]`` / ``[B, 1, T, 1]`` only.
    window: option, ``w`` (= ``(w, w)``) or ``(left, right)``.
    global_tokens: option, number of leading global tokens or a tuple of
      their positions (a query position ``< T`` is a global query, a key
      position ``< S`` a global key).
    block_size: option, block length of the window part.
    scale: option, multiplier of ``q·k`` (default ``1/sqrt(H)``).
    is_causal: restrict everything, global tokens included, to ``s <= t``.
    query_seq_lengths / key_value_seq_lengths: int ``[B]``.
    segment_ids: ``[B, T]`` or ``([B, T], [B, S])``: attend within segment.
    local_window_size: runtime window; intersected with ``window``.

  Returns:
    ``[B, T, N, Dv]`` in the input dtype. Time and memory
    ``O(B·N·(T·(left + right + block + Y) + Y·S))``.
  """
  registry.check_options(
      "longformer", window=window, global_tokens=global_tokens,
      block_size=block_size, scale=scale)
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids)
  blocks.check_supported("longformer", inputs, causal=True, segments=True,
                         window=True)
  q_valid, kv_valid = blocks.validity("longformer", inputs)
  B, T, S, *_ = inputs.shape
  win = blocks.intersect_windows(canonical.normalize_window(window),
                                 inputs.window)
  block = block_size or default_block(win, inputs.is_causal, T)
  if block < 1:
    raise ValueError(f"longformer: block_size must be >= 1, got {block_size}")
  glob = global_positions(global_tokens, T, S)
  glob_q, glob_k = glob[glob < T], glob[glob < S]
  key_blocks = blocks.window_blocks(T, S, block, win, inputs.is_causal)

  def one_head(q_TH, k_SH, v_SD, kv_valid_S, q_seg_T, kv_seg_S):
    window_part = blocks.sparse_rows_one_head(
        q_TH, k_SH, v_SD, key_blocks, block=block, scale=inputs.scale,
        is_causal=inputs.is_causal, window=win, kv_valid=kv_valid_S,
        q_segment=q_seg_T, kv_segment=kv_seg_S, global_keys=glob_k)
    if not len(glob_q):
      return window_part
    rows_YD = blocks.dense_rows_one_head(
        q_TH[glob_q], glob_q, k_SH, v_SD, scale=inputs.scale,
        is_causal=inputs.is_causal, kv_valid=kv_valid_S, q_segment=q_seg_T,
        kv_segment=kv_seg_S)
    return window_part.at[glob_q].set(rows_YD)

  out = blocks.map_heads(one_head, inputs.query, inputs.key, inputs.value,
                         kv_valid, inputs.q_segment_ids, inputs.kv_segment_ids)
  return blocks.finish(out, inputs, q_valid)
