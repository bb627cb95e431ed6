"""Registry entries for the exact softmax kernels."""

from attn.kernels.attention import dot_product_attention
from attn.registry import register_attention


@register_attention(
    "softmax", aliases=("exact", "dot_product", "scaled_dot_product"),
    exact=True, complexity="time O(T·S), memory O(T·S) (xla) / O(T) (chunked)",
    description="exact scaled dot-product attention, implementation chosen "
    "automatically (cuDNN on GPU, chunked for long sequences, else xla)")
def softmax_attention(query, key, value, bias=None, mask=None, *,
                      implementation=None, block_q=None, block_k=None,
                      **kwargs):
  """Exact softmax attention; see :func:`attn.dot_product_attention`."""
  return dot_product_attention(query, key, value, bias, mask,
                               implementation=implementation, block_q=block_q,
                               block_k=block_k, **kwargs)


@register_attention(
    "xla", exact=True, complexity="time O(T·S), memory O(T·S)",
    description="exact attention with the materialised [T, S] score matrix")
def xla_attention_kernel(query, key, value, bias=None, mask=None, **kwargs):
  """Exact attention, ``implementation="xla"``."""
  return dot_product_attention(query, key, value, bias, mask,
                               implementation="xla", **kwargs)


@register_attention(
    "chunked", aliases=("flash", "memory_efficient"), exact=True,
    complexity="time O(T·S) (half when causal), memory O(T)",
    description="exact attention by online softmax over key/query blocks "
    "with a recomputing custom VJP (Rabe & Staats 2021; FlashAttention)")
def chunked_attention_kernel(query, key, value, bias=None, mask=None, *,
                             block_q=None, block_k=None, **kwargs):
  """Exact memory-efficient attention, ``implementation="chunked"``."""
  return dot_product_attention(query, key, value, bias, mask,
                               implementation="chunked", block_q=block_q,
                               block_k=block_k, **kwargs)


@register_attention(
    "cudnn", exact=True, complexity="time O(T·S), memory O(T)",
    description="jax.nn's cuDNN flash attention (NVIDIA GPU, bf16/fp16)")
def cudnn_attention_kernel(query, key, value, bias=None, mask=None, **kwargs):
  """Exact attention through cuDNN, ``implementation="cudnn"``."""
  return dot_product_attention(query, key, value, bias, mask,
                               implementation="cudnn", **kwargs)
