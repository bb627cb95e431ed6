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
