"""Positional encodings as pure functions (no parameters, no state).

Four families, told apart by :func:`positional_kind`:

* ``"absolute"`` — a ``[length, dim]`` table added to the token embeddings:
  :func:`sinusoidal_encoding` (Vaswani et al. 2017), :func:`sinusoidal_2d`
  (ViT-style 2-D grid); ``"learned"`` is a trained table owned by a module.
* ``"rotary"`` — :func:`apply_rope` rotates query/key channel pairs by an
  angle proportional to the position (Su et al. 2021, RoFormer), so
  ``q_i · k_j`` depends on ``i - j`` only.
* ``"bias"`` — a ``[1, N, T, S]`` float32 bias added to the attention scores:
  :func:`alibi_bias` (Press et al. 2022) and :func:`t5_relative_bias` over
  :func:`t5_relative_buckets` (Raffel et al. 2020).
* ``"none"``.

Everything is computed in float32; ``q_offset`` / ``offset`` arguments shift
query positions for incremental decoding.
"""

from __future__ import annotations

import math
from typing import Optional

import einops
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

POSITIONAL_ENCODINGS = ("none", "sinusoidal", "learned", "rope", "alibi", "t5")
_KINDS = {"none": "none", "sinusoidal": "absolute", "learned": "absolute",
          "rope": "rotary", "alibi": "bias", "t5": "bias"}


def positional_kind(name: str) -> str:
  """``"none"``, ``"absolute"``, ``"rotary"`` or ``"bias"`` for an encoding.

  Absolute encodings are added to the embeddings, rotary ones are applied to
  queries and keys, bias ones are added to the attention scores.

  Raises:
    ValueError: ``name`` is not one of :data:`POSITIONAL_ENCODINGS`.
  """
  if name not in _KINDS:
    raise ValueError(f"unknown positional encoding {name!r}; known: "
                     f"{', '.join(POSITIONAL_ENCODINGS)}")
  return _KINDS[name]


def _inverse_frequencies(dim: int, base: float) -> Array:
  """``base^(-2i/dim)`` for ``i = 0 .. dim/2 - 1`` (float32 ``[dim/2]``)."""
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  return jnp.power(jnp.float32(base), -exponents)


def sinusoidal_encoding(length: int, dim: int, *, base: float = 10000.0,
                        offset=0) -> Array:
  """The Transformer's sinusoidal table, channels interleaved as in the paper.

  ``PE[p, 2i] = sin(p / base^(2i/dim))``,
  ``PE[p, 2i+1] = cos(p / base^(2i/dim))`` for positions
  ``p = offset, ..., offset + length - 1``.

  Args:
    length: number of positions.
    dim: embedding width; must be even.
    base: wavelength base (10000 in Vaswani et al.).
    offset: first position (an int or a traced int scalar, for decoding).

  Returns:
    float32 ``[length, dim]``.
  """
  if dim <= 0 or dim % 2:
    raise ValueError(f"sinusoidal_encoding needs an even dim > 0, got {dim}")
  pos_P = (jnp.arange(length, dtype=jnp.float32)
           + jnp.asarray(offset, jnp.float32))
  angle_PI = pos_P[:, None] * _inverse_frequencies(dim, base)[None, :]
  return einops.rearrange([jnp.sin(angle_PI), jnp.cos(angle_PI)],
                          "two p i -> p (i two)")


def sinusoidal_2d(height: int, width: int, dim: int, *,
                  base: float = 10000.0) -> Array:
  """2-D sinusoidal table for a ``height × width`` grid of patches (ViT).

  Row ``r * width + c`` (row-major patch order) is
  ``concat(PE_dim/2[r], PE_dim/2[c])``: the first half of the channels
  encodes the row, the second half the column, each with
  :func:`sinusoidal_encoding`.

  Returns:
    float32 ``[height * width, dim]``; ``dim`` must be a multiple of 4.
  """
  if dim <= 0 or dim % 4:
    raise ValueError(f"sinusoidal_2d needs dim to be a positive multiple of "
                     f"4 (half for rows, half for columns), got {dim}")
  rows_HD = sinusoidal_encoding(height, dim // 2, base=base)
  cols_WD = sinusoidal_encoding(width, dim // 2, base=base)
  grid = jnp.concatenate([
      jnp.broadcast_to(rows_HD[:, None, :], (height, width, dim // 2)),
      jnp.broadcast_to(cols_WD[None, :, :], (height, width, dim // 2)),
  ], axis=-1)
  return einops.rearrange(grid, "h w d -> (h w) d")


def apply_rope(x_BTNH: Array, positions: Optional[Array] = None, *,
               base: float = 10000.0) -> Array:
  """Rotary position embedding (RoPE) in the *rotate-half* convention.

  Channel ``i`` is paired with channel ``i + H/2`` (GPT-NeoX / LLaMA layout,
  not the interleaved ``(2i, 2i+1)`` pairs of the RoFormer paper; the two are
  a fixed channel permutation of each other). Pair ``i`` at position ``p`` is
  rotated by the angle ``p · base^(-2i/H)``::

    out[..., :H/2] = x1 cos - x2 sin,   out[..., H/2:] = x2 cos + x1 sin

  Applied to both queries and keys, ``rope(q, i) · rope(k, j)`` depends on
  ``q``, ``k`` and ``i - j`` only.

  Args:
    x_BTNH: ``[B, T, N, H]`` queries or keys, ``H`` even.
    positions: int ``[T]`` or ``[B, T]``; defaults to ``arange(T)``.
    base: frequency base.

  Returns:
    Same shape and dtype as ``x_BTNH`` (rotation computed in float32).
  """
  if x_BTNH.ndim != 4:
    raise ValueError(f"apply_rope expects [B, T, N, H], got shape "
                     f"{x_BTNH.shape}")
  B, T, _, H = x_BTNH.shape
  if H % 2:
    raise ValueError(f"apply_rope needs an even head_dim, got {H}")
  if positions is None:
    positions = jnp.arange(T)
  positions = jnp.asarray(positions)
  if positions.shape not in ((T,), (B, T)):
    raise ValueError(f"positions must be [T]=({T},) or [B, T]=({B}, {T}), "
                     f"got {positions.shape}")
  pos_BT = jnp.broadcast_to(positions, (B, T)).astype(jnp.float32)
  angle_BTI = pos_BT[:, :, None] * _inverse_frequencies(H, base)
  cos = jnp.cos(angle_BTI)[:, :, None, :]
  sin = jnp.sin(angle_BTI)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = x[..., :H // 2], x[..., H // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def _alibi_power_of_two(n: int) -> list[float]:
  start = 2.0 ** (-8.0 / n)
  return [start ** (i + 1) for i in range(n)]


def alibi_slopes(num_heads: int) -> Array:
  """ALiBi head slopes: the geometric sequence of Press et al. (2022).

  For ``n`` a power of two the slopes are ``2^(-8/n), 2^(-16/n), ...,
  2^(-8)`` (8 heads: 1/2, 1/4, ..., 1/256). Otherwise, with ``m`` the largest
  power of two below ``n``, the ``m`` slopes for ``m`` heads are followed by
  every other slope of the ``2m``-head sequence, ``n - m`` of them.

  Returns:
    float32 ``[num_heads]``.
  """
  if num_heads <= 0:
    raise ValueError(f"alibi_slopes needs num_heads > 0, got {num_heads}")
  m = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = _alibi_power_of_two(m)
  if m < num_heads:
    slopes += _alibi_power_of_two(2 * m)[0::2][:num_heads - m]
  return jnp.asarray(np.asarray(slopes, np.float64), jnp.float32)


def alibi_bias(num_heads: int, q_len: int, k_len: int, *, causal: bool = False,
               q_offset=0) -> Array:
  """ALiBi attention bias, linear in the query-key distance.

  With query position ``i = q_offset + t`` and key position ``j = s``:
  bidirectional ``bias = -slope·|i - j|``; causal ``bias = -slope·(i - j)``
  for ``j <= i`` and 0 for ``j > i`` (those keys must be removed by the
  causal mask; a bias is not a mask).

  Returns:
    float32 ``[1, num_heads, q_len, k_len]``.
  """
  i_T = jnp.arange(q_len) + jnp.asarray(q_offset, jnp.int32)
  dist_TS = (i_T[:, None] - jnp.arange(k_len)[None, :]).astype(jnp.float32)
  if causal:
    dist_TS = jnp.maximum(dist_TS, 0.0)
  else:
    dist_TS = jnp.abs(dist_TS)
  slopes_N = alibi_slopes(num_heads)
  return -(slopes_N[:, None, None] * dist_TS[None])[None]


def t5_relative_buckets(q_len: int, k_len: int, *, bidirectional: bool = True,
                        num_buckets: int = 32, max_distance: int = 128,
                        q_offset=0) -> Array:
  """T5's relative-position buckets for every (query, key) pair.

  With ``n = i - j`` (query position ``i = q_offset + t`` minus key position
  ``j = s``): when bidirectional, half of the buckets are for keys after the
  query (``n < 0``, buckets offset by ``num_buckets/2``) and ``n = |n|``;
  otherwise ``n = max(n, 0)``. Of the remaining ``nb`` buckets, distances
  ``n < nb/2`` get their own bucket; larger ones share log-spaced buckets
  ``nb/2 + floor(log(n / (nb/2)) / log(max_distance / (nb/2)) · nb/2)``,
  capped at ``nb - 1`` (all distances ``>= max_distance`` share the last).
  This is the Mesh-TensorFlow / T5 formula, float32 arithmetic included.

  Returns:
    int32 ``[q_len, k_len]`` in ``[0, num_buckets)``.
  """
  if num_buckets < 2 or (bidirectional and num_buckets % 2):
    raise ValueError(f"num_buckets must be >= 2 (and even when "
                     f"bidirectional), got {num_buckets}")
  i_T = jnp.arange(q_len) + jnp.asarray(q_offset, jnp.int32)
  n_TS = i_T[:, None] - jnp.arange(k_len)[None, :]
  buckets_TS = jnp.zeros_like(n_TS)
  if bidirectional:
    num_buckets //= 2
    buckets_TS = buckets_TS + jnp.where(n_TS < 0, num_buckets, 0)
    n_TS = jnp.abs(n_TS)
  else:
    n_TS = jnp.maximum(n_TS, 0)
  max_exact = num_buckets // 2
  if max_exact < 1 or max_distance <= max_exact:
    raise ValueError(f"t5_relative_buckets needs max_distance ({max_distance})"
                     f" > num_buckets/4 or /2 ({max_exact}) >= 1")
  ratio = jnp.log(jnp.maximum(n_TS, 1).astype(jnp.float32) / max_exact)
  large_TS = max_exact + (ratio / math.log(max_distance / max_exact)
                          * (num_buckets - max_exact)).astype(jnp.int32)
  large_TS = jnp.minimum(large_TS, num_buckets - 1)
  buckets_TS = buckets_TS + jnp.where(n_TS < max_exact, n_TS, large_TS)
  return buckets_TS.astype(jnp.int32)


def t5_relative_bias(table: Array, buckets: Array) -> Array:
  """Looks up a learned ``[num_buckets, N]`` table at ``[T, S]`` buckets.

  Returns:
    float32 ``[1, N, T, S]``, ready to add to the attention scores.
  """
  if table.ndim != 2:
    raise ValueError(f"t5_relative_bias: table must be [num_buckets, heads], "
                     f"got shape {table.shape}")
  if buckets.ndim != 2:
    raise ValueError(f"t5_relative_bias: buckets must be [T, S], got shape "
                     f"{buckets.shape}")
  bias_TSN = jnp.take(table.astype(jnp.float32), buckets, axis=0)
  return einops.rearrange(bias_TSN, "t s n -> 1 n t s")
