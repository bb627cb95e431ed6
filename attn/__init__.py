"""attn: attention mechanisms in JAX/Flax.

Attention turns queries ``q_t``, keys ``k_s`` and values ``v_s`` into context
vectors ``c_t = Σ_s α_ts v_s`` with weights ``α_t = softmax_s(score(q_t,
k_s))``. Everything here computes that (or approximates it) for arrays in
the ``[batch, length, heads, head_dim]`` layout: ``query [B, T, N, H]``,
``key [B, S, K, H]``, ``value [B, S, K, Dv]`` -> ``out [B, T, N, Dv]``, with
``N`` a multiple of ``K`` (grouped-query attention). Masks are boolean
(True = may attend) and broadcast to ``[B, N, T, S]``; softmax and
accumulation run in float32; a query with nothing to attend to outputs
zeros.

Layers, from the bottom up (nothing imports upwards):

* :mod:`attn.kernels` -- pure functions ``kernel(query, key, value,
  bias=None, mask=None, **options) -> [B, T, N, Dv]``, one file per
  variant: the math for one head in ``einsum``, lifted with ``jax.vmap``.
  :func:`attn.dot_product_attention` is the exact entry point (the
  arguments of ``jax.nn.dot_product_attention`` plus sequence lengths,
  sliding windows, packed segments, dropout, returned weights, and
  ``implementation="xla" | "chunked" | "cudnn"``).
* :mod:`attn.scores` -- the classic score functions for one head
  (``dot``, ``scaled_dot``, ``general``, ``additive``, ``cosine``,
  ``location``): ``score(q_TH, k_SH, **params) -> scores_TS``.
* :mod:`attn.positional` -- sinusoidal, RoPE, ALiBi and T5 encodings as
  pure functions.
* :mod:`attn.registry` -- one registry: :func:`attn.get_attention` turns a
  spec string such as ``"performer(num_features=64)"`` into a kernel that
  is also a Flax ``attention_fn``; :func:`attn.list_attention` lists the
  names; :func:`attn.register_attention` adds a variant.
* :mod:`attn.modules` -- Flax modules that own parameters and call the
  kernels: ``MultiHeadAttention`` (any registered variant, GQA, KV cache),
  ``AdditiveAttention``, ``LuongAttention``, ``GlimpseAttention``,
  ``AttentionPooling`` (Nadaraya-Watson).
* :mod:`attn.models` -- ``TransformerLM``, ``Seq2SeqTransformer``,
  ``EncoderClassifier``, ``ViT`` (+ attention rollout) and ``RNNSeq2Seq``,
  each taking its attention and positional encoding by name.
* :mod:`attn.parallel` -- device meshes, shardings and multi-host start-up
  (ring attention shards the sequence over the mesh's ``"seq"`` axis).

Example::

    import jax, attn
    q = k = v = jax.random.normal(jax.random.key(0), (2, 128, 8, 64))
    out = attn.dot_product_attention(q, k, v, is_causal=True)   # exact
    fast = attn.get_attention("linear")(q, k, v, is_causal=True)  # O(T)
    attn.list_attention()   # ['bigbird', 'chunked', ..., 'xla']

Submodules are imported on use (``from attn.modules import
MultiHeadAttention``). The README's guide explains each mechanism with its
formula and a picture drawn by ``python -m experiments.figures``.
"""

# Importing attn.kernels registers every built-in kernel with attn.registry
# (kernels import the registry, never the other way round).
from attn import kernels  # noqa: F401
from attn import scores
from attn.kernels.exact import dot_product_attention
from attn.registry import get_attention, list_attention, register_attention

__all__ = ["dot_product_attention", "get_attention", "list_attention",
           "register_attention", "scores"]
__version__ = "0.1.0"
