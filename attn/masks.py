"""Masking: the mask constant, structure masks, combining, masked softmax.

Masks are boolean, True = may attend, broadcastable to ``[B, N, T, S]``.
Masked logits are replaced with :data:`MASK_VALUE` (finite, so bf16/fp16 and
float32 arithmetic never sees ``inf - inf``) and their weights are then
zeroed explicitly, so a query row with nothing to attend to gets all-zero
weights and finite gradients.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Finite stand-in for -inf: large enough that exp(x - max) underflows to 0,
# small enough that subtracting two of them never overflows float32.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def structure_mask(q_pos: Array, k_pos: Array, *, is_causal: bool,
                   window: Optional[Tuple[int, int]],
                   q_length: Optional[Array] = None,
                   kv_length: Optional[Array] = None,
                   q_segment: Optional[Array] = None,
                   kv_segment: Optional[Array] = None) -> Optional[Array]:
  """Boolean ``[len(q_pos), len(k_pos)]`` mask from positions (one example).

  Works on any block of positions, so dense and blockwise kernels share it.
  Returns ``None`` when nothing is masked.
  """
  parts = []
  q = q_pos[:, None]
  k = k_pos[None, :]
  if is_causal:
    parts.append(k <= q)
  if window is not None:
    left, right = window
    parts.append((k >= q - left) & (k <= q + right))
  if q_length is not None:
    parts.append(q < q_length)
  if kv_length is not None:
    parts.append(k < kv_length)
  if q_segment is not None:
    parts.append(q_segment[:, None] == kv_segment[None, :])
  if not parts:
    return None
  out = parts[0]
  for p in parts[1:]:
    out = out & p
  return jnp.broadcast_to(out, (q_pos.shape[0], k_pos.shape[0]))


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
  """Logical AND of the masks that are not ``None`` (``None`` if all are);
  bool arrays of mutually broadcastable shapes -> their broadcast shape."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out


def masked_softmax(logits: Array, mask: Optional[Array]) -> Array:
  """float32 softmax over the last axis where ``mask`` is True.

  ``logits [..., S]``; ``mask`` bool, broadcastable to it, or None. Returns
  weights of the broadcast shape in float32 (float64 for float64 logits).

  A row with no True entry returns all zeros (not the uniform average), and
  its gradient is zero and finite.
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  logits = jnp.where(mask, logits, MASK_VALUE)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  unnorm = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(unnorm, axis=-1, keepdims=True)
  return unnorm / jnp.where(denom == 0.0, 1.0, denom)


def dropout_keep(rng: Array, rate: float, shape, broadcast_axes=()) -> Array:
  """Boolean keep-mask (True with probability ``1 - rate``) of ``shape``.

  Axes in ``broadcast_axes`` get size 1 (the same mask is shared along them).
  Draws exactly what ``flax.linen.dot_product_attention`` draws for the same
  key and shape, so Flax modules see identical dropout patterns.
  """
  shape = list(shape)
  for a in broadcast_axes:
    shape[a] = 1
  return jax.random.bernoulli(rng, 1.0 - rate, tuple(shape))


def residual_lse(lse, dtype):
  """A blockwise kernel's log-sum-exp as ``jax.nn`` reports it, in ``dtype``.

  ``jax.nn`` counts masked logits as :data:`MASK_VALUE`, so a fully masked
  row has ``lse = MASK_VALUE + log(S)`` (``MASK_VALUE`` in float32) where an
  online softmax that skips masked keys has ``-inf``.
  """
  lse = jnp.where(jnp.isneginf(lse), jnp.float32(MASK_VALUE), lse)
  return lse.astype(dtype)
