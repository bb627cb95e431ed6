"""Attention pooling as Nadaraya–Watson kernel regression.

``f(x) = Σ_i α(x, x_i) y_i`` with ``α(x, x_i) = K(‖x - x_i‖ / h) / Σ_j K(...)``:
the query ``x`` attends to keys ``x_i`` and averages the values ``y_i``
(Nadaraya 1964, Watson 1964). The kernel ``K`` plays the role of the score;
with the Gaussian kernel this is softmax attention with score
``-‖x - x_i‖² / (2h²)``.

Weights are computed as a masked float32 softmax of ``log K`` so that kernels
with compact support (boxcar, Epanechnikov) and queries with no key inside
the support return zeros, never NaN.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.masks import masked_softmax

Array = jax.Array

KERNELS = ("gaussian", "boxcar", "epanechnikov", "constant")


def _log_kernel(kernel: str, u2: Array):
  """``(log K(u), support)`` for squared scaled distances ``u2 = u²``."""
  if kernel == "gaussian":
    return -0.5 * u2, None
  if kernel == "boxcar":
    return jnp.zeros_like(u2), u2 <= 1.0
  if kernel == "epanechnikov":
    inside = u2 < 1.0
    return jnp.log(jnp.where(inside, 1.0 - u2, 1.0)), inside
  if kernel == "constant":
    return jnp.zeros_like(u2), None
  raise ValueError(f"unknown kernel {kernel!r}; choose from {KERNELS}")


def nadaraya_watson(queries: Array, keys: Array, values: Array, *,
                    kernel: str = "gaussian", bandwidth=1.0,
                    mask: Optional[Array] = None):
  """Kernel regression ``Σ_s α(q_t, k_s) v_s`` (pure function).

  Args:
    queries: ``[B, T, D]`` (or ``[B, T]`` for scalar inputs).
    keys: ``[B, S, D]`` (or ``[B, S]``).
    values: ``[B, S, Dv]`` (or ``[B, S]``).
    kernel: one of :data:`KERNELS`.
    bandwidth: ``h > 0``, a scalar (float or array).
    mask: boolean, broadcastable to ``[B, T, S]``, True = may attend.

  Returns:
    ``(out[B, T, Dv] (or [B, T]), weights[B, T, S])``, float32 weights.
  """
  queries, keys, values = map(jnp.asarray, (queries, keys, values))
  scalar_values = values.ndim == 2
  if queries.ndim == 2:
    queries, keys = queries[..., None], keys[..., None]
  if scalar_values:
    values = values[..., None]
  q = queries.astype(jnp.float32)
  k = keys.astype(jnp.float32)
  d2_BTS = jnp.sum(jnp.square(q[:, :, None, :] - k[:, None, :, :]), axis=-1)
  u2 = d2_BTS / jnp.square(jnp.asarray(bandwidth, jnp.float32))
  logits, support = _log_kernel(kernel, u2)
  if mask is not None:
    mask = jnp.broadcast_to(mask, u2.shape)
  if support is not None:
    mask = support if mask is None else mask & support
  weights = masked_softmax(logits, mask)
  out = jnp.einsum("bts,bsd->btd", weights, values.astype(jnp.float32))
  out = out.astype(values.dtype)
  return (out[..., 0] if scalar_values else out), weights


class AttentionPooling(nn.Module):
  """Nadaraya–Watson attention pooling, non-parametric or with learned width.

  Attributes:
    kernel: ``"gaussian"``, ``"boxcar"``, ``"epanechnikov"`` or ``"constant"``
      (the last one averages all values: attention without a query).
    bandwidth: kernel width ``h`` (the initial value when learned).
    learn_bandwidth: parametric version: ``h = exp(log_bandwidth)`` is a
      parameter, trained by gradient descent.
  """
  kernel: str = "gaussian"
  bandwidth: float = 1.0
  learn_bandwidth: bool = False

  @nn.compact
  def __call__(self, queries: Array, keys: Array, values: Array,
               mask: Optional[Array] = None):
    """See :func:`nadaraya_watson`; returns ``(out, weights[B, T, S])``."""
    if self.bandwidth <= 0:
      raise ValueError(f"bandwidth must be positive, got {self.bandwidth}")
    h = self.bandwidth
    if self.learn_bandwidth:
      h = jnp.exp(self.param("log_bandwidth", nn.initializers.constant(
          np.log(self.bandwidth)), ()))
    out, weights = nadaraya_watson(queries, keys, values, kernel=self.kernel,
                                   bandwidth=h, mask=mask)
    self.sow("intermediates", "attention_weights", weights)
    return out, weights


NadarayaWatson = AttentionPooling
