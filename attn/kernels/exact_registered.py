"""Registry entries for the exact softmax kernels.

Each entry's signature says what it supports: ``softmax`` and ``xla`` take
every option of :func:`attn.dot_product_attention` (dropout,
``return_weights``, ...); ``chunked`` and ``cudnn`` list only the arguments
they can honour, so the Flax wrapper refuses dropout for them and sows no
weights.
"""

from attn.kernels.attention import dot_product_attention
from attn.registry import register_attention


@register_attention(
    "softmax", aliases=("exact", "dot_product", "scaled_dot_product"),
    exact=True, complexity="time O(T·S), memory O(T·S) (xla) / O(T) (chunked)",
    description="exact scaled dot-product attention, implementation chosen "
    "automatically (cuDNN on GPU, chunked for long sequences, else xla)")
def softmax_attention(query, key, value, bias=None, mask=None, *,
                      implementation=None, block_q=None, block_k=None,
                      scale=None, **kwargs):
  """Exact softmax attention; see :func:`attn.dot_product_attention`.

  ``query [B, T, N, H]``, ``key [B, S, K, H]``, ``value [B, S, K, Dv]``
  (``N`` a multiple of ``K``) -> ``[B, T, N, Dv]``.
  """
  return dot_product_attention(query, key, value, bias, mask, scale=scale,
                               implementation=implementation, block_q=block_q,
                               block_k=block_k, **kwargs)


@register_attention(
    "xla", exact=True, complexity="time O(T·S), memory O(T·S)",
    description="exact attention with the materialised [T, S] score matrix")
def xla_attention_kernel(query, key, value, bias=None, mask=None, *,
                         scale=None, **kwargs):
  """Exact attention, ``implementation="xla"``; takes every option.

  ``query [B, T, N, H]``, ``key [B, S, K, H]``, ``value [B, S, K, Dv]``
  (``N`` a multiple of ``K``) -> ``[B, T, N, Dv]``.
  """
  return dot_product_attention(query, key, value, bias, mask, scale=scale,
                               implementation="xla", **kwargs)


@register_attention(
    "chunked", aliases=("flash", "memory_efficient"), exact=True,
    complexity="time O(T·S) (half when causal), memory O(T)",
    description="exact attention by online softmax over key/query blocks "
    "with a recomputing custom VJP (Rabe & Staats 2021; FlashAttention)")
def chunked_attention_kernel(query, key, value, bias=None, mask=None, *,
                             block_q=None, block_k=None, scale=None,
                             is_causal=False, query_seq_lengths=None,
                             key_value_seq_lengths=None,
                             local_window_size=None, segment_ids=None):
  """Exact memory-efficient attention, ``implementation="chunked"``.

  No dropout and no weights: they would need the ``[T, S]`` matrix.

  ``query [B, T, N, H]``, ``key [B, S, K, H]``, ``value [B, S, K, Dv]``
  (``N`` a multiple of ``K``) -> ``[B, T, N, Dv]``.
  """
  return dot_product_attention(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids,
      implementation="chunked", block_q=block_q, block_k=block_k)


@register_attention(
    "cudnn", exact=True, complexity="time O(T·S), memory O(T)",
    description="jax.nn's cuDNN flash attention (NVIDIA GPU, bf16/fp16)")
def cudnn_attention_kernel(query, key, value, bias=None, mask=None, *,
                           scale=None, is_causal=False, query_seq_lengths=None,
                           key_value_seq_lengths=None,
                           local_window_size=None):
  """Exact attention through cuDNN, ``implementation="cudnn"``.

  Raises ``ValueError`` off NVIDIA GPUs and for fp32 inputs.

  ``query [B, T, N, H]``, ``key [B, S, K, H]``, ``value [B, S, K, Dv]``
  (``N`` a multiple of ``K``) -> ``[B, T, N, Dv]``.
  """
  return dot_product_attention(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, implementation="cudnn")
