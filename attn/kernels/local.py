"""Sliding-window (local) attention, computed blockwise.

Query ``t`` attends keys ``t - left <= s <= t + right`` with exact softmax
over that band. Queries are cut into blocks of ``block_size``; each block
gathers only the key blocks its window touches, so time and memory are
``O(T·(left + right + block))`` — no ``[T, S]`` mask or score matrix.
With a window ``>= max(T, S)`` it is exact softmax attention.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax

from attn.kernels import blocks, canonical
from attn import registry
from attn.registry import register_attention

Array = jax.Array
WindowSpec = Union[int, Tuple[int, int]]


def default_block(window: Tuple[int, int], is_causal: bool, T: int) -> int:
  """Block length when none is given: the wider window side, in [16, 512].

  Each query block reads ``ceil(left/b) + 1 + ceil(right/b)`` key blocks,
  i.e. about ``left + right + b`` keys per query; ``b`` near the window keeps
  that overhead within ~1.5x while keeping blocks large enough to vectorise.
  Never longer than ``T``.
  """
  side = window[0] if is_causal else max(window)
  return max(1, min(T, max(16, min(512, side))))


@register_attention(
    "local", exact=False, causal=True,
    padding=True, cross=True,
    complexity="time O(T·w), memory O(T·w) for window w (+ block size)",
    description="exact softmax inside a sliding window t-left <= s <= "
    "t+right, computed blockwise (Beltagy et al. 2020; Child et al. 2019)",
    option_rules={
        "window": registry.WINDOW_OPTION,
        "block_size": registry.int_option(1, none=True)})
def local_attention(query, key, value, bias=None, mask=None, *,
                    window: WindowSpec = 128,
                    block_size: Optional[int] = None, scale=None,
                    is_causal: bool = False, query_seq_lengths=None,
                    key_value_seq_lengths=None, segment_ids=None,
                    local_window_size: Optional[WindowSpec] = None):
  """Sliding-window softmax attention.

  Approximates softmax attention by restricting query ``t`` to keys
  ``t - left <= s <= t + right`` (exact on that band; equal to
  ``attn.dot_product_attention(..., local_window_size=(left, right))``).

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]``, ``N % K == 0`` (GQA). Positions are absolute, so
      cross-attention (``S != T``) aligns query ``t`` with key ``t``.
    value: ``[B, S, K, Dv]``.
    bias: not supported (``ValueError``).
    mask: padding mask ``[B, 1, 1, S]`` or ``[B, 1, T, 1]``; dense masks
      raise ``ValueError``.
    window: option, ``w`` (= ``(w, w)``) or ``(left, right)``.
    block_size: option, query/key block length (default from the window,
      see :func:`default_block`).
    scale: option, multiplier of ``q·k`` (default ``1/sqrt(H)``).
    is_causal: additionally restrict to ``s <= t``.
    query_seq_lengths / key_value_seq_lengths: int ``[B]``.
    segment_ids: ``[B, T]`` or ``([B, T], [B, S])``: attend within segment.
    local_window_size: runtime window; intersected with ``window``.

  Returns:
    ``[B, T, N, Dv]`` in the input dtype. Time and memory
    ``O(B·N·T·(left + right + block))``. Queries with no allowed key output
    zeros.
  """
  registry.check_options(
      "local", window=window, block_size=block_size, scale=scale)
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids)
  blocks.check_supported("local", inputs, causal=True, segments=True,
                         window=True)
  q_valid, kv_valid = blocks.validity("local", inputs)
  B, T, S, *_ = inputs.shape
  win = blocks.intersect_windows(canonical.normalize_window(window),
                                 inputs.window)
  block = block_size or default_block(win, inputs.is_causal, T)
  if block < 1:
    raise ValueError(f"local: block_size must be >= 1, got {block_size}")
  key_blocks = blocks.window_blocks(T, S, block, win, inputs.is_causal)

  def one_head(q_TH, k_SH, v_SD, kv_valid_S, q_seg_T, kv_seg_S):
    return blocks.sparse_rows_one_head(
        q_TH, k_SH, v_SD, key_blocks, block=block, scale=inputs.scale,
        is_causal=inputs.is_causal, window=win, kv_valid=kv_valid_S,
        q_segment=q_seg_T, kv_segment=kv_seg_S)

  out = blocks.map_heads(one_head, inputs.query, inputs.key, inputs.value,
                         kv_valid, inputs.q_segment_ids, inputs.kv_segment_ids)
  return blocks.finish(out, inputs, q_valid)
