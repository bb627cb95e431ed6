"""Modules that own the learned parts of positional information.

The fixed formulas live in :mod:`attn.positional`; these modules add the
parameters (a learned absolute table, the T5 bucket-bias table) and the
decode-time position counter. A positional encoding is chosen by name
(``attn.positional.POSITIONAL_ENCODINGS``); its kind decides where it acts:

* ``"absolute"`` (sinusoidal, learned): added to the token embeddings by
  :class:`PositionalEmbedding`.
* ``"rotary"`` (rope) and ``"bias"`` (alibi, t5): applied inside
  :class:`attn.modules.MultiHeadAttention`, which uses :class:`T5RelativeBias`.
* ``"none"``: nothing.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import positional as pe

Array = jax.Array


def _unfused_normal(key, shape, dtype):
  # Under jax.jit, XLA fuses a product with the normal draw into the draw
  # and rounds some entries differently (1 ulp) from the same code run
  # eagerly; the barrier keeps them apart, so both give the eager numbers.
  return jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype))


def normal_init(stddev: float):
  """``nn.initializers.normal(stddev)``, with the same numbers eagerly and
  under ``jax.jit`` (so a jitted ``init`` reproduces an eager one)."""
  def init(key, shape, dtype=jnp.float32):
    return _unfused_normal(key, shape, dtype) * jnp.array(stddev, dtype)
  return init


def token_embedding_init(key, shape, dtype=jnp.float32):
  """``nn.Embed``'s default initialiser, N(0, 1/features), with the same
  numbers eagerly and under ``jax.jit`` (see :func:`normal_init`)."""
  return (_unfused_normal(key, shape, dtype)
          * jnp.sqrt(jnp.array(1.0 / shape[-1], dtype)))


def Embed(num_embeddings: int, features: int, **kwargs) -> nn.Embed:  # pylint: disable=invalid-name
  """``nn.Embed`` with :func:`token_embedding_init` (the models' embedding
  tables)."""
  return nn.Embed(num_embeddings, features,
                  embedding_init=token_embedding_init, **kwargs)


class PositionalEmbedding(nn.Module):
  """Adds an absolute positional encoding to ``x[B, T, D]``; else identity.

  Attributes:
    positional: encoding name; only ``"absolute"`` kinds (``"sinusoidal"``,
      ``"learned"``) change ``x``, the others return it unchanged (they act in
      attention).
    max_len: number of positions the learned table / decode cache covers.
    decode: autoregressive decoding: a ``'cache'`` counter remembers how many
      positions were already consumed, so step ``i`` gets position ``i``.
    dtype: output dtype.
  """
  positional: str
  max_len: int
  decode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """``x[B, T, D] -> x + pos[T, D]`` (positions offset by the cache)."""
    if pe.positional_kind(self.positional) != "absolute":
      return x
    T, D = x.shape[-2:]
    if self.positional == "learned":
      table = self.param("embedding", nn.initializers.normal(stddev=0.02),
                         (self.max_len, D))
    else:
      table = pe.sinusoidal_encoding(self.max_len, D)
    offset = 0
    if self.decode:
      is_initialized = self.has_variable("cache", "position_index")
      index = self.variable("cache", "position_index",
                            lambda: jnp.array(0, jnp.int32))
      if is_initialized:
        offset = index.value
        index.value = offset + T
    if T > self.max_len:
      raise ValueError(f"sequence length {T} exceeds max_len={self.max_len} "
                       f"of the {self.positional!r} positional encoding")
    pos_TD = jax.lax.dynamic_slice_in_dim(table, offset, T, axis=0)
    return (x + pos_TD.astype(x.dtype)).astype(self.dtype)


class T5RelativeBias(nn.Module):
  """T5 relative-position bias: a learned scalar per (bucket, head).

  Attributes:
    num_heads: ``N``.
    bidirectional: buckets distinguish past and future (False for causal).
    num_buckets / max_distance: bucketing of ``key_pos - query_pos``.
  """
  num_heads: int
  bidirectional: bool = True
  num_buckets: int = 32
  max_distance: int = 128

  @nn.compact
  def __call__(self, q_len: int, k_len: int, q_offset=0) -> Array:
    """Bias ``[1, N, q_len, k_len]`` (float32) for queries at ``q_offset+t``."""
    table = self.param("rel_embedding", nn.initializers.normal(stddev=0.02),
                       (self.num_buckets, self.num_heads), jnp.float32)
    buckets = pe.t5_relative_buckets(
        q_len, k_len, bidirectional=self.bidirectional,
        num_buckets=self.num_buckets, max_distance=self.max_distance,
        q_offset=q_offset)
    return pe.t5_relative_bias(table, buckets)
