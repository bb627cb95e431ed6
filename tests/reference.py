"""Independent float64 NumPy references for attention tests.

Nothing here imports :mod:`attn`: these are the yardsticks the kernels are
measured against. Layout is ``[batch, length, heads, head_dim]``.
"""

from __future__ import annotations

import numpy as np


def _to4d(x):
  x = np.asarray(x)
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def reference_attention(q, k, v, bias=None, mask=None, scale=None,
                        soft_cap=None):
  """Softmax attention in float64 with explicit loops over batch and heads.

  Args:
    q: ``[B, T, N, H]``.
    k: ``[B, S, K, H]``; query head ``n`` uses key/value head ``n // (N//K)``.
    v: ``[B, S, K, Dv]``.
    bias: ``None`` or broadcastable to ``[B, N, T, S]`` (any rank <= 4).
    mask: ``None`` or boolean, broadcastable to ``[B, N, T, S]``.
    scale: defaults to ``1 / sqrt(H)``.
    soft_cap: ``None`` or ``c``: the scaled logits ``x`` become
      ``c·tanh(x / c)`` before the bias is added (Gemma 2 soft-capping).

  Returns:
    ``(out[B, T, N, Dv], weights[B, N, T, S])`` as float64. A query row with
    no allowed key has zero weights and a zero output.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  scale = 1.0 / np.sqrt(H) if scale is None else float(scale)
  full = (B, N, T, S)
  bias = np.zeros(full) if bias is None else np.broadcast_to(
      _to4d(np.asarray(bias, np.float64)), full)
  logits = np.zeros(full)
  for b in range(B):
    for n in range(N):
      x = scale * q[b, :, n] @ k[b, :, n // G].T
      if soft_cap is not None:
        x = soft_cap * np.tanh(x / soft_cap)
      logits[b, n] = x + bias[b, n]
  return reference_from_logits(logits, v, mask)


def reference_from_logits(logits, v, mask=None):
  """Masked softmax of given float64 ``logits[B, N, T, S]``, then ``@ v``.

  ``v`` is ``[B, S, K, Dv]`` (query head ``n`` uses value head
  ``n // (N//K)``); ``mask`` as in :func:`reference_attention`. Returns
  ``(out[B, T, N, Dv], weights[B, N, T, S])``; empty rows give zeros.
  """
  logits = np.asarray(logits, np.float64)
  v = np.asarray(v, np.float64)
  B, N, T, S = logits.shape
  K, Dv = v.shape[2], v.shape[-1]
  G = N // K
  full = (B, N, T, S)
  mask = np.ones(full, bool) if mask is None else np.broadcast_to(
      _to4d(mask), full)
  out = np.zeros((B, T, N, Dv))
  weights = np.zeros(full)
  for b in range(B):
    for n in range(N):
      for t in range(T):
        allowed = mask[b, n, t]
        if not allowed.any():
          continue
        z = logits[b, n, t, allowed]
        e = np.exp(z - z.max())
        weights[b, n, t, allowed] = e / e.sum()
      out[b, :, n] = weights[b, n] @ v[b, :, n // G]
  return out, weights


def reference_output(q, k, v, mask=None, bias=None, scale=None):
  """Only the output ``[B, T, N, Dv]`` of :func:`reference_attention`."""
  return reference_attention(q, k, v, bias=bias, mask=mask, scale=scale)[0]


def reference_mask(B, T, S, *, is_causal=False, window=None, q_lengths=None,
                   kv_lengths=None, q_segment_ids=None, kv_segment_ids=None):
  """Brute-force boolean ``[B, 1, T, S]`` mask from structural options.

  ``window`` is an int or ``(left, right)``: query ``t`` may see key ``s``
  iff ``t - left <= s <= t + right``. Causal means ``s <= t``. Lengths are
  per-example valid lengths; segment ids are ``[B, T]`` and ``[B, S]``.
  """
  if window is not None and np.ndim(window) == 0:
    window = (window, window)
  mask = np.ones((B, 1, T, S), bool)
  for b in range(B):
    for t in range(T):
      for s in range(S):
        ok = True
        if is_causal:
          ok &= s <= t
        if window is not None:
          ok &= t - window[0] <= s <= t + window[1]
        if q_lengths is not None:
          ok &= t < q_lengths[b]
        if kv_lengths is not None:
          ok &= s < kv_lengths[b]
        if q_segment_ids is not None:
          ok &= q_segment_ids[b][t] == kv_segment_ids[b][s]
        mask[b, 0, t, s] = ok
  return mask


def tolerance(dtype) -> dict:
  """``rtol``/``atol`` for comparing ``dtype`` results with float64."""
  name = np.dtype(dtype).name
  return {"float32": dict(rtol=2e-5, atol=2e-5),
          "float16": dict(rtol=5e-3, atol=5e-3),
          "bfloat16": dict(rtol=3e-2, atol=3e-2)}[name]


def random_gqa_inputs(seed, B, T, S, N, K, H):
  """Random ``(q[B,T,N,H], k[B,S,K,H], v[B,S,K,H], bias[B,N,T,S],
  cotangent[B,T,N,H])`` float32 arrays for GQA tests."""
  import jax  # pylint: disable=g-import-not-at-top
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  return (jax.random.normal(ks[0], (B, T, N, H)),
          jax.random.normal(ks[1], (B, S, K, H)),
          jax.random.normal(ks[2], (B, S, K, H)),
          jax.random.normal(ks[3], (B, N, T, S)),
          jax.random.normal(ks[4], (B, T, N, H)))
