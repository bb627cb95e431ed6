"""The matmul floor: the chunked kernel's block matmuls with nothing else.

``block_matmuls(q, k, v, is_causal=)`` runs exactly the matmuls that
:func:`attn.kernels.chunked.chunked_attention` runs, at its default block
shapes, on the blocks it visits and in its loop order, but none of the
softmax (no max, exp, sum, rescale, masking or normalisation):

* forward, per visited block ``(i, j)``: ``s = q_i k_jᵀ``, ``acc_i += s v_j``
  (query blocks of ``DEFAULT_FORWARD_ONLY_BLOCK_Q`` rows for a call that is
  not differentiated and not causal, else ``DEFAULT_BLOCK_Q``);
* backward (custom VJP, key blocks outer as in the kernel): ``s`` is
  recomputed and the four gradient matmuls run, ``dv_j += sᵀ do_i``,
  ``dp = v_j do_iᵀ``, ``dk_j += dp q_i``, ``dq_iᵀ += k_jᵀ dp`` (``k_jᵀ`` stored
  once per key block, ``dq`` accumulated transposed, as the kernel does for
  float32 blocks; ``dq_i += dpᵀ k_j`` otherwise, see
  :func:`attn.kernels.chunked.transposed_dq`).

Its output is not attention. Its time is how fast any kernel built from
XLA's dots at these blocks could be on the machine, whatever it did
between them: the benchmark's ``block_matmuls`` baseline (no error check;
FLOPs are exact attention's analytic count).
"""

from __future__ import annotations

import functools

import einops
import jax
import jax.numpy as jnp

from attn.kernels import chunked


def _blocks(T: int, S: int, causal: bool, forward_only: bool):
  """``(bq, nq, bk, nk, right)``: the kernel's default blocks."""
  default_q = (chunked.DEFAULT_FORWARD_ONLY_BLOCK_Q
               if forward_only and not causal else chunked.DEFAULT_BLOCK_Q)
  bq, nq = chunked.block_size(T, None, default_q, "block_q")
  bk, nk = chunked.block_size(S, None, chunked.DEFAULT_BLOCK_K, "block_k")
  return bq, nq, bk, nk, chunked.reach(causal, None)[1]


# The kernel's own layout: [nq, B·K, G·bq, D] query blocks, [nk, B·K, bk, D]
# key/value blocks, zero-padded.
_q_blocks = chunked._q_blocks
_kv_blocks = chunked._kv_blocks


def _from_q_blocks(x, B: int, G: int, T: int):
  return chunked._from_q_blocks(x, B, x.shape[1] // B, G, T)


def _from_kv_blocks(x, B: int, S: int):
  return einops.rearrange(x, "n (b k) c d -> b (n c) k d", b=B)[:, :S]


def _dot(spec: str, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _forward(q, k, v, bq, bk, right):
  """``acc[nq, X, R, Dv]``: ``Σ_j (q_i k_jᵀ) v_j`` over visited blocks."""
  nq, nk = q.shape[0], k.shape[0]

  def one_q_block(i, q_i):
    lo, hi = chunked.kv_block_range(i, block_q=bq, block_k=bk,
                                    num_k_blocks=nk, left=None, right=right)

    def body(j, acc):
      s = _dot("xrh,xch->xrc", q_i, k[j]).astype(v.dtype)
      return acc + _dot("xrc,xcd->xrd", s, v[j])

    init = jnp.zeros(q_i.shape[:2] + (v.shape[-1],), jnp.float32)
    return jax.lax.fori_loop(lo, hi, body, init)

  return jax.lax.map(lambda a: one_q_block(*a), (jnp.arange(nq), q))


def _backward(q, k, v, do, bq, bk, right):
  """``(dq, dk, dv)`` of :func:`_forward`, key blocks outer, float32."""
  nq, nk = q.shape[0], k.shape[0]
  do = do.astype(q.dtype)

  transposed = chunked.transposed_dq(q.dtype)   # as the kernel

  def one_k_block(dq_t, j):
    k_j, v_j = k[j], v[j]
    k_t_j = jnp.swapaxes(k_j, -1, -2) if transposed else None  # dqᵀ = kᵀ·dpᵀ
    lo, hi = chunked.q_block_range(j, block_q=bq, block_k=bk,
                                   num_q_blocks=nq, left=None, right=right)

    def body(i, state):
      dq_t, dk_j, dv_j = state
      s = _dot("xch,xrh->xcr", k_j, q[i]).astype(q.dtype)
      dv_j = dv_j + _dot("xcr,xrd->xcd", s, do[i])
      dp = _dot("xcd,xrd->xcr", v_j, do[i]).astype(q.dtype)
      dk_j = dk_j + _dot("xcr,xrh->xch", dp, q[i])
      dq_i = (_dot("xhc,xcr->xhr", k_t_j, dp) if transposed
              else _dot("xcr,xch->xrh", dp, k_j))
      return dq_t.at[i].add(dq_i), dk_j, dv_j

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    dq_t, dk_j, dv_j = jax.lax.fori_loop(lo, hi, body,
                                         (dq_t, zeros(k_j), zeros(v_j)))
    return dq_t, (dk_j, dv_j)

  dq_t = jnp.zeros(chunked._transposed_rows(q.shape) if transposed
                   else q.shape, jnp.float32)
  dq_t, (dk, dv) = jax.lax.scan(one_k_block, dq_t, jnp.arange(nk))
  return (jnp.swapaxes(dq_t, -1, -2) if transposed else dq_t), dk, dv


def _run(q, k, v, causal: bool, forward_only: bool):
  """``out[B, T, N, Dv]`` (float32) of :func:`_forward`."""
  (B, T, N, _), (S, K) = q.shape, k.shape[1:3]
  bq, nq, bk, nk, right = _blocks(T, S, causal, forward_only)
  acc = _forward(_q_blocks(q, bq, nq, K), _kv_blocks(k, bk, nk),
                 _kv_blocks(v, bk, nk), bq, bk, right)
  return _from_q_blocks(acc, B, N // K, T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmuls(q, k, v, causal: bool):
  return _run(q, k, v, causal, forward_only=True)


def _matmuls_fwd(q, k, v, causal):
  out = _run(q, k, v, causal, forward_only=False)
  return out, (q, k, v, out)


def _matmuls_bwd(causal, residuals, do):
  q, k, v, out = residuals
  # The kernel's backward needs the forward's output (δ = rowsum(do ⊙
  # out)); this one would not, and XLA would then drop the whole forward
  # of a gradient step. Taking δ (times 0) into do keeps it, as the
  # kernel's O(T) pass does, so fwd_bwd times the kernel's 7 matmuls.
  delta = jnp.sum(do.astype(jnp.float32) * out, axis=-1, keepdims=True)
  do = do + (0.0 * delta).astype(do.dtype)
  (B, T, N, _), (S, K) = q.shape, k.shape[1:3]
  bq, nq, bk, nk, right = _blocks(T, S, causal, forward_only=False)
  dq, dk, dv = _backward(_q_blocks(q, bq, nq, K), _kv_blocks(k, bk, nk),
                         _kv_blocks(v, bk, nk), _q_blocks(do, bq, nq, K),
                         bq, bk, right)
  return (_from_q_blocks(dq, B, N // K, T).astype(q.dtype),
          _from_kv_blocks(dk, B, S).astype(k.dtype),
          _from_kv_blocks(dv, B, S).astype(v.dtype))


_matmuls.defvjp(_matmuls_fwd, _matmuls_bwd)


def block_matmuls(q, k, v, *, is_causal: bool = False):
  """The kernel's block matmuls alone (module docstring): ``[B, T, N, Dv]``
  in ``q``'s dtype for ``q[B, T, N, H]``, ``k[B, S, K, H]``, ``v[B, S, K,
  Dv]``.

  Not attention: a timing floor. Blocks run in
  :func:`attn.kernels.chunked.block_dtype`, as the kernel's do;
  differentiable (the backward runs the kernel's five matmuls per visited
  block).
  """
  compute = chunked.block_dtype(q.dtype)
  out = _matmuls(*(x.astype(compute) for x in (q, k, v)), bool(is_causal))
  return out.astype(q.dtype)
