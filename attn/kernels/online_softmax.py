"""The online-softmax block step, forward and backward, for ONE head.

Blockwise exact kernels (:mod:`attn.kernels.chunked`, :mod:`attn.kernels.ring`)
visit a ``[R, C]`` block of scores at a time (``R`` query rows, ``C`` key
columns; letters as in :mod:`attn.kernels`) and keep, per query row, a
running max ``m``, a running sum ``l`` and an unnormalised output ``acc``
(Rabe & Staats 2021; Dao et al. 2022, FlashAttention)::

    s    = q kᵀ + bias                 (q pre-multiplied by scale;
                                        masked entries = -inf)
    m'   = max(m, rowmax(s))
    p    = exp(s - m')
    l'   = exp(m - m') · l + rowsum(p)
    acc' = exp(m - m') · acc + p v

    out = acc / l,   lse = m + log l   (l == 0: out 0, lse = +inf)

The backward step recomputes ``p = exp(s - lse)`` from the saved ``lse``
(FlashAttention-2)::

    delta = rowsum(do ⊙ out)
    dv += pᵀ do,   dp = do vᵀ,   ds = p ⊙ (dp - delta)
    dq += ds k,    dk += dsᵀ q,  dbias = ds

Masking convention (shared by every blockwise kernel): masked scores are
``-inf`` via ``jnp.where``, so ``exp`` zeroes them exactly; a row that has
seen nothing yet keeps ``m = -inf`` and is shifted by 0 instead (no
``-inf - -inf``); a row that saw nothing at all ends with ``l = 0``, outputs
zeros and gets ``lse = +inf``, so its recomputed ``p`` and its gradients are
zero. Only the block's scores, never the ``[T, S]`` matrix, are alive.

Callers lift these one-head functions with ``jax.vmap`` over heads/batch.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def scores(q_RH: Array, k_CH: Array, bias_RC: Optional[Array],
           mask_RC: Optional[Array]) -> Array:
  """float32 ``q kᵀ + bias`` with masked entries at ``-inf`` (``[R, C]``).

  ``q`` arrives pre-multiplied by ``scale``, which saves a full pass over
  every score block.
  """
  s_RC = jnp.einsum("rh,ch->rc", q_RH, k_CH,
                    preferred_element_type=jnp.float32)
  if bias_RC is not None:
    s_RC = s_RC + bias_RC.astype(jnp.float32)
  if mask_RC is not None:
    s_RC = jnp.where(mask_RC, s_RC, -jnp.inf)
  return s_RC


def init_state(rows: Tuple[int, ...], value_dim: int):
  """``(m, l, acc)`` before any key: ``-inf``, 0, 0 (float32).

  ``rows`` is the shape of the per-row statistics (e.g. ``(B·K, R)``).
  """
  return (jnp.full(rows, -jnp.inf, jnp.float32),
          jnp.zeros(rows, jnp.float32),
          jnp.zeros(rows + (value_dim,), jnp.float32))


def forward_step(q_RH: Array, k_CH: Array, v_CD: Array,
                 bias_RC: Optional[Array], mask_RC: Optional[Array],
                 m_R: Array, l_R: Array, acc_RD: Array):
  """One online-softmax update of ``(m, l, acc)`` with key block ``k, v``.

  ``q_RH`` is scaled; ``v_CD`` has the value dim ``D`` (= Dv). Returns the
  new ``(m[R], l[R], acc[R, D])``, float32.
  """
  s_RC = scores(q_RH, k_CH, bias_RC, mask_RC)
  m_new_R = jnp.maximum(m_R, jnp.max(s_RC, axis=-1))
  # Rows with nothing visible yet keep m = -inf; shift them by 0 instead so
  # that exp(-inf - shift) = 0 rather than NaN.
  shift_R = jnp.where(m_new_R == -jnp.inf, 0.0, m_new_R)
  p_RC = jnp.exp(s_RC - shift_R[:, None])
  alpha_R = jnp.exp(m_R - shift_R)
  l_R = alpha_R * l_R + jnp.sum(p_RC, axis=-1)
  pv_RD = jnp.einsum("rc,cd->rd", p_RC.astype(v_CD.dtype), v_CD,
                     preferred_element_type=jnp.float32)
  return m_new_R, l_R, alpha_R[:, None] * acc_RD + pv_RD


def finalize(m: Array, l: Array, acc: Array):
  """``(out, lse)`` from the final state; any leading axes.

  Rows that saw no key (``l == 0``) get ``out = 0`` and ``lse = +inf``.
  ``out`` is float32 (callers cast to the input dtype).
  """
  dead = l == 0.0
  l = jnp.where(dead, 1.0, l)
  out = acc / l[..., None]
  lse = jnp.where(dead, jnp.inf, m + jnp.log(l))
  return out, lse


def backward_step(q_RH: Array, k_CH: Array, v_CD: Array,
                  bias_RC: Optional[Array], mask_RC: Optional[Array],
                  do_RD: Array, lse_R: Array, delta_R: Array):
  """Gradient contributions of one score block (scaled ``q``).

  ``delta_R = rowsum(do ⊙ out)``. Works on the transposed block
  ``s[C, R] = k qᵀ`` so that three of the four gradient matmuls contract
  over the leading axis of both operands; XLA:CPU runs a dot whose left
  operand is contracted over its *leading* axis about 2x slower, and only
  ``dq`` needs one here.

  Returns ``(dq[R, H], dk[C, H], dv[C, D], ds[R, C])`` in float32; ``dq``
  and ``dk`` are with respect to the scaled ``q`` and ``k`` as given, ``ds``
  with respect to the biased scores.
  """
  transpose = lambda x: None if x is None else x.T  # noqa: E731
  s_CR = scores(k_CH, q_RH, transpose(bias_RC), transpose(mask_RC))
  p_CR = jnp.exp(s_CR - lse_R[None, :])          # lse = +inf: dead row -> 0
  dv_CD = jnp.einsum("cr,rd->cd", p_CR.astype(do_RD.dtype), do_RD,
                     preferred_element_type=jnp.float32)
  dp_CR = jnp.einsum("cd,rd->cr", v_CD, do_RD,
                     preferred_element_type=jnp.float32)
  ds_CR = p_CR * (dp_CR - delta_R[None, :])
  dk_CH = jnp.einsum("cr,rh->ch", ds_CR.astype(q_RH.dtype), q_RH,
                     preferred_element_type=jnp.float32)
  dq_RH = jnp.einsum("cr,ch->rh", ds_CR.astype(k_CH.dtype), k_CH,
                     preferred_element_type=jnp.float32)
  return dq_RH, dk_CH, dv_CD, ds_CR.T
