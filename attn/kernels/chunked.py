"""Memory-efficient exact attention (``implementation="chunked"``).

Online softmax over blocks of keys (Rabe & Staats 2021, "Self-attention Does
Not Need O(n²) Memory"; Dao et al. 2022, FlashAttention). For one head, a
query block ``q_i`` visits the key/value blocks ``(k_j, v_j)`` it can see and
keeps, per query row, a running max ``m``, a running sum ``l`` and an
unnormalised output ``acc``::

    s    = scale · q_i k_jᵀ + bias_ij         (masked entries = -inf)
    m'   = max(m, rowmax(s))
    p    = exp(s - m')
    l'   = exp(m - m') · l + rowsum(p)
    acc' = exp(m - m') · acc + p v_j

    out_i = acc / l,   lse_i = m + log l      (l == 0: out 0, lse = +inf)

Only one ``[block_q, block_k]`` score block per head is alive at a time, so
memory is O(T) instead of O(T·S). Gradients come from a ``jax.custom_vjp``
that saves only ``out`` and ``lse`` and recomputes ``p = exp(s - lse)`` block
by block (FlashAttention-2 backward)::

    dv_j += pᵀ do_i,   dp = do_i v_jᵀ,   ds = p ⊙ (dp - rowsum(do_i ⊙ out_i))
    dq_i += scale · ds k_j,   dk_j += scale · dsᵀ q_i,   dbias_ij = ds

Key blocks that causal or local-window structure masks entirely are never
visited: the inner loop bounds depend on the query block index (and the
backward's on the key block index), so causal attention costs about half the
FLOPs of full attention.

The math is written for ONE head (``*_one_head`` functions, einsum with
shapes in names) and lifted over ``[batch, kv_heads, group]`` with
``jax.vmap`` inside each block step, so every block matmul is one batched
dot over all heads. Arrays are kept in a blocked layout
``[num_blocks, B, K, G, block, H]`` so a block is a contiguous slice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from attn.kernels import common
from attn.kernels.common import AttentionInputs

Array = jax.Array

# Defaults chosen by measurement on a 2-core AVX-512 CPU (float32, 8 heads,
# head_dim 64, T = 4096); see the README section on chunked attention.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 1024


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) description of one blocked attention call.

  Attributes:
    scale: multiplier of ``q·k``.
    left / right: query ``t`` may only see keys ``t - left <= s <= t + right``
      (``None`` = unbounded); from ``local_window_size`` and ``is_causal``.
    is_causal / window: passed to :func:`common.structure_mask`.
    block_q / block_k: block sizes.
    num_keys: real key length ``S`` when keys were padded, else ``None``.
  """
  scale: float
  left: Optional[int]
  right: Optional[int]
  is_causal: bool
  window: Optional[Tuple[int, int]]
  block_q: int
  block_k: int
  num_keys: Optional[int]


def block_size(length: int, requested: Optional[int], default: int,
               name: str) -> Tuple[int, int]:
  """``(size, count)`` of blocks covering ``length`` positions.

  ``requested`` (or ``default``) is the largest block allowed; blocks are
  balanced so that padding is less than one block and, where possible, a
  multiple of 8.
  """
  requested = default if requested is None else requested
  if isinstance(requested, bool) or not isinstance(requested, int) or (
      requested <= 0):
    raise ValueError(f"{name} must be a positive int, got {requested!r}")
  if length <= requested:
    return length, 1
  count = -(-length // requested)
  size = -(-length // count)
  size = min(requested, -(-size // 8) * 8)
  return size, -(-length // size)


def reach(is_causal: bool, window: Optional[Tuple[int, int]]):
  """``(left, right)``: how far before/after a query visible keys may lie.

  ``None`` means unbounded on that side.
  """
  left, right = window if window is not None else (None, None)
  if is_causal:
    right = 0 if right is None else min(right, 0)
  return left, right


def kv_block_range(i, *, block_q: int, block_k: int, num_k_blocks: int,
                   left: Optional[int], right: Optional[int]):
  """``[lo, hi)``: the key blocks that query block ``i`` can see."""
  lo = 0 if left is None else jnp.maximum(0, (i * block_q - left) // block_k)
  hi = num_k_blocks if right is None else jnp.minimum(
      num_k_blocks, ((i + 1) * block_q - 1 + right) // block_k + 1)
  return lo, hi


def q_block_range(j, *, block_q: int, block_k: int, num_q_blocks: int,
                  left: Optional[int], right: Optional[int]):
  """``[lo, hi)``: the query blocks that can see key block ``j``."""
  lo = 0 if right is None else jnp.maximum(0, (j * block_k - right) // block_q)
  hi = num_q_blocks if left is None else jnp.minimum(
      num_q_blocks, ((j + 1) * block_k - 1 + left) // block_q + 1)
  return lo, hi


def visited_blocks(T: int, S: int, *, block_q: Optional[int] = None,
                   block_k: Optional[int] = None, is_causal: bool = False,
                   local_window_size=None) -> Tuple[int, int]:
  """``(visited, total)`` numbers of ``[block_q, block_k]`` score blocks.

  ``visited`` is what the forward pass computes for these settings (the
  backward visits the same blocks); ``total`` is the full grid.
  """
  bq, nq = block_size(T, block_q, DEFAULT_BLOCK_Q, "block_q")
  bk, nk = block_size(S, block_k, DEFAULT_BLOCK_K, "block_k")
  left, right = reach(is_causal, common.normalize_window(local_window_size))
  visited = 0
  for i in range(nq):
    lo, hi = kv_block_range(i, block_q=bq, block_k=bk, num_k_blocks=nk,
                            left=left, right=right)
    visited += max(0, int(hi) - int(lo))
  return visited, nq * nk


# ----------------------------------------------------------------------------
# One head, one block.


def _scores_one_head(q_QH: Array, k_KH: Array, bias_QK: Optional[Array],
                     mask_QK: Optional[Array], scale: float) -> Array:
  """float32 ``scale · q kᵀ + bias`` with masked entries at ``-inf``."""
  s_QK = jnp.einsum("qh,kh->qk", q_QH, k_KH,
                    preferred_element_type=jnp.float32) * scale
  if bias_QK is not None:
    s_QK = s_QK + bias_QK.astype(jnp.float32)
  if mask_QK is not None:
    s_QK = jnp.where(mask_QK, s_QK, -jnp.inf)
  return s_QK


def _forward_step_one_head(m_Q, l_Q, acc_QD, q_QH, k_KH, v_KD, bias_QK,
                           mask_QK, *, scale):
  """One online-softmax update of ``(m, l, acc)`` with key block ``k, v``."""
  s_QK = _scores_one_head(q_QH, k_KH, bias_QK, mask_QK, scale)
  m_new_Q = jnp.maximum(m_Q, jnp.max(s_QK, axis=-1))
  # Rows with nothing visible yet keep m = -inf; shift them by 0 instead so
  # that exp(-inf - shift) = 0 rather than NaN.
  shift_Q = jnp.where(m_new_Q == -jnp.inf, 0.0, m_new_Q)
  p_QK = jnp.exp(s_QK - shift_Q[:, None])
  alpha_Q = jnp.exp(m_Q - shift_Q)
  l_Q = alpha_Q * l_Q + jnp.sum(p_QK, axis=-1)
  pv_QD = jnp.einsum("qk,kd->qd", p_QK.astype(v_KD.dtype), v_KD,
                     preferred_element_type=jnp.float32)
  return m_new_Q, l_Q, alpha_Q[:, None] * acc_QD + pv_QD


def _backward_step_one_head(q_QH, k_KH, v_KD, do_QD, lse_Q, delta_Q, bias_QK,
                            mask_QK, *, scale):
  """Gradient contributions of one score block.

  Returns ``(dq[Q, H], dk[K, H], dv[K, Dv], ds[Q, K])`` in float32.
  """
  s_QK = _scores_one_head(q_QH, k_KH, bias_QK, mask_QK, scale)
  p_QK = jnp.exp(s_QK - lse_Q[:, None])          # lse = +inf: dead row -> 0
  dv_KD = jnp.einsum("qk,qd->kd", p_QK.astype(do_QD.dtype), do_QD,
                     preferred_element_type=jnp.float32)
  dp_QK = jnp.einsum("qd,kd->qk", do_QD, v_KD,
                     preferred_element_type=jnp.float32)
  ds_QK = p_QK * (dp_QK - delta_Q[:, None])
  dq_QH = jnp.einsum("qk,kh->qh", ds_QK.astype(k_KH.dtype), k_KH,
                     preferred_element_type=jnp.float32) * scale
  dk_KH = jnp.einsum("qk,qh->kh", ds_QK.astype(q_QH.dtype), q_QH,
                     preferred_element_type=jnp.float32) * scale
  return dq_QH, dk_KH, dv_KD, ds_QK


def _over_heads(fn, *args):
  """Applies one-head ``fn`` over leading ``[B, K, G]`` axes with vmap.

  Each argument is ``(array_or_None, (has_B, has_K, has_G))``: arrays carry
  only the leading axes they have (broadcast axes are absent and mapped with
  ``in_axes=None``, so they are never materialised). Every output gets all
  three axes.
  """
  arrays = [a for a, _ in args]
  for level in (2, 1, 0):             # group innermost, batch outermost
    fn = jax.vmap(fn, in_axes=tuple(
        0 if (a is not None and flags[level]) else None
        for a, flags in args))
  return fn(*arrays)


def _squeeze_heads(x: Optional[Array], full: Tuple[int, int, int]):
  """5-D ``[B|1, K|1, G|1, ...]`` -> ``(x without broadcast axes, flags)``."""
  if x is None:
    return None, (False, False, False)
  flags = tuple(x.shape[a] == full[a] for a in range(3))
  drop = tuple(a for a in range(3) if not flags[a])
  return jnp.squeeze(x, axis=drop), flags


# ----------------------------------------------------------------------------
# Blocks of bias / mask.


def _block_of(x: Array, i, j, block_q: int, block_k: int) -> Array:
  """The ``[..., block_q|1, block_k|1]`` block ``(i, j)`` of a 5-D array."""
  if x.shape[3] != 1:
    x = jax.lax.dynamic_slice_in_dim(x, i * block_q, block_q, axis=3)
  if x.shape[4] != 1:
    x = jax.lax.dynamic_slice_in_dim(x, j * block_k, block_k, axis=4)
  return x


def _add_block(acc: Array, update_BKGQK: Array, i, j, block_q: int,
               block_k: int) -> Array:
  """``acc[block (i, j)] += update`` summed down to ``acc``'s broadcast axes."""
  axes = tuple(a for a in range(5) if acc.shape[a] == 1)
  update = jnp.sum(update_BKGQK, axis=axes, keepdims=True)
  start = [0, 0, 0, 0, 0]
  if acc.shape[3] != 1:
    start[3] = i * block_q
  if acc.shape[4] != 1:
    start[4] = j * block_k
  current = jax.lax.dynamic_slice(acc, start, update.shape)
  return jax.lax.dynamic_update_slice(acc, current + update, start)


def _mask_block(cfg: _Config, i, j, mask, q_len, kv_len, q_seg, kv_seg):
  """Boolean ``[B|1, K|1, G|1, block_q|1, block_k|1]`` mask, or ``None``."""
  q_pos = i * cfg.block_q + jnp.arange(cfg.block_q)
  k_pos = j * cfg.block_k + jnp.arange(cfg.block_k)
  static_kv_len = cfg.num_keys if kv_len is None else None

  def one_example(ql, kl, qs, ks):
    return common.structure_mask(
        q_pos, k_pos, is_causal=cfg.is_causal, window=cfg.window,
        q_length=ql, kv_length=static_kv_len if kl is None else kl,
        q_segment=qs, kv_segment=ks)

  if q_len is None and kv_len is None and q_seg is None:
    smask = one_example(None, None, None, None)
    smask = None if smask is None else smask[None]
  else:
    smask = jax.vmap(one_example)(
        q_len, kv_len,
        None if q_seg is None else jax.lax.dynamic_slice_in_dim(
            q_seg, i * cfg.block_q, cfg.block_q, axis=1),
        None if kv_seg is None else jax.lax.dynamic_slice_in_dim(
            kv_seg, j * cfg.block_k, cfg.block_k, axis=1))
  if smask is not None:
    smask = smask[:, None, None]                 # [B|1, 1, 1, bq, bk]
  if mask is None:
    return smask
  mask = _block_of(mask, i, j, cfg.block_q, cfg.block_k)
  return mask if smask is None else jnp.logical_and(mask, smask)


# ----------------------------------------------------------------------------
# Blocked forward / backward with a custom VJP.


def _forward(cfg: _Config, q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg):
  """``(out[nq, B, K, G, bq, Dv], lse[nq, B, K, G, bq])`` from blocked inputs.

  ``q[nq, B, K, G, bq, H]``, ``k[nk, B, K, bk, H]``, ``v[nk, B, K, bk, Dv]``.
  """
  nq, B, K, G, bq, _ = q.shape
  nk, Dv = k.shape[0], v.shape[-1]
  full = (B, K, G)
  step = functools.partial(_forward_step_one_head, scale=cfg.scale)

  def one_q_block(i, q_i):
    lo, hi = kv_block_range(i, block_q=bq, block_k=cfg.block_k,
                            num_k_blocks=nk, left=cfg.left, right=cfg.right)

    def body(j, carry):
      m, l, acc = carry
      b_ij, b_flags = _squeeze_heads(
          None if bias is None else _block_of(bias, i, j, bq, cfg.block_k),
          full)
      m_ij, m_flags = _squeeze_heads(
          _mask_block(cfg, i, j, mask, q_len, kv_len, q_seg, kv_seg), full)
      kv_flags = (True, True, False)
      return _over_heads(
          step, (m, (True,) * 3), (l, (True,) * 3), (acc, (True,) * 3),
          (q_i, (True,) * 3), (k[j], kv_flags), (v[j], kv_flags),
          (b_ij, b_flags), (m_ij, m_flags))

    init = (jnp.full((B, K, G, bq), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, bq), jnp.float32),
            jnp.zeros((B, K, G, bq, Dv), jnp.float32))
    m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
    dead = l == 0.0
    out = acc / jnp.where(dead, 1.0, l)[..., None]
    lse = jnp.where(dead, jnp.inf, m + jnp.log(jnp.where(dead, 1.0, l)))
    return out.astype(q.dtype), lse

  return jax.lax.map(lambda x: one_q_block(*x), (jnp.arange(nq), q))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_attention(cfg, q, k, v, bias, mask, q_len, kv_len, q_seg,
                       kv_seg):
  """Blocked exact attention; see :func:`_forward` for the layout."""
  return _forward(cfg, q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg)[0]


def _blocked_attention_fwd(cfg, *args):
  out, lse = _forward(cfg, *args)
  return out, (args, out, lse)


def _blocked_attention_bwd(cfg, residuals, do):
  (q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg), out, lse = residuals
  nq, B, K, G, bq, _ = q.shape
  nk, bk = k.shape[0], cfg.block_k
  full = (B, K, G)
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  step = functools.partial(_backward_step_one_head, scale=cfg.scale)
  all_heads, kv_flags = (True,) * 3, (True, True, False)

  def one_k_block(carry, j):
    k_j, v_j = k[j], v[j]
    lo, hi = q_block_range(j, block_q=bq, block_k=bk, num_q_blocks=nq,
                           left=cfg.left, right=cfg.right)

    def body(i, state):
      dq, dbias, dk_j, dv_j = state
      b_ij, b_flags = _squeeze_heads(
          None if bias is None else _block_of(bias, i, j, bq, bk), full)
      m_ij, m_flags = _squeeze_heads(
          _mask_block(cfg, i, j, mask, q_len, kv_len, q_seg, kv_seg), full)
      dq_i, dk_h, dv_h, ds = _over_heads(
          step, (q[i], all_heads), (k_j, kv_flags), (v_j, kv_flags),
          (do[i], all_heads), (lse[i], all_heads), (delta[i], all_heads),
          (b_ij, b_flags), (m_ij, m_flags))
      dq = dq.at[i].add(dq_i)
      if dbias is not None:
        dbias = _add_block(dbias, ds, i, j, bq, bk)
      return dq, dbias, dk_j + dk_h.sum(axis=2), dv_j + dv_h.sum(axis=2)

    dq, dbias = carry
    dk_j = jnp.zeros(k_j.shape, jnp.float32)
    dv_j = jnp.zeros(v_j.shape, jnp.float32)
    dq, dbias, dk_j, dv_j = jax.lax.fori_loop(lo, hi, body,
                                              (dq, dbias, dk_j, dv_j))
    return (dq, dbias), (dk_j, dv_j)

  init = (jnp.zeros(q.shape, jnp.float32),
          None if bias is None else jnp.zeros(bias.shape, jnp.float32))
  (dq, dbias), (dk, dv) = jax.lax.scan(one_k_block, init, jnp.arange(nk))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          None if bias is None else dbias.astype(bias.dtype),
          None, None, None, None, None)


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


# ----------------------------------------------------------------------------
# Public entry point.


def _to_blocks(x: Array, size: int, count: int) -> Array:
  """``[B, L, K, ...]`` -> zero-padded ``[count, B, K, ..., size, last]``."""
  B, L = x.shape[:2]
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, size * count - L)
  x = jnp.pad(x, pad).reshape((B, count, size) + x.shape[2:])
  # [B, n, size, K, (G,) D] -> [n, B, K, (G,) size, D]
  rest = tuple(range(3, x.ndim - 1))
  return x.transpose((1, 0) + rest + (2, x.ndim - 1))


def _broadcast_5d(x: Optional[Array], K: int, G: int, Tp: int, Sp: int,
                  pad_value) -> Optional[Array]:
  """``[B|1, N|1, T|1, S|1]`` -> padded ``[B|1, K|1, G|1, Tp|1, Sp|1]``."""
  if x is None:
    return None
  b, n, t, s = x.shape
  x = x.reshape((b, K, G, t, s) if n != 1 else (b, 1, 1, t, s))
  pad = [(0, 0)] * 3 + [(0, Tp - t if t != 1 else 0),
                        (0, Sp - s if s != 1 else 0)]
  return jnp.pad(x, pad, constant_values=pad_value)


def chunked_attention(inputs: AttentionInputs, *,
                      block_q: Optional[int] = None,
                      block_k: Optional[int] = None) -> Array:
  """Exact attention by blockwise online softmax; memory O(T), not O(T·S).

  Args:
    inputs: canonical arguments from :func:`common.canonicalize`:
      ``query[B, T, N, H]``, ``key[B, S, K, H]``, ``value[B, S, K, Dv]``,
      bias/mask broadcastable to ``[B, N, T, S]``, causal, lengths, local
      window, segment ids. Any ``T``/``S`` (padded internally), ``N`` a
      multiple of ``K``, any float dtype (softmax and accumulation in
      float32).
    block_q / block_k: largest query / key block (defaults
      ``DEFAULT_BLOCK_Q`` / ``DEFAULT_BLOCK_K``); blocks are balanced so the
      padding is under one block.

  Returns:
    ``out[B, T, N, Dv]`` in the input dtype; query rows that can see no key
    are zeros with zero gradients. Differentiable (reverse mode) w.r.t.
    query, key, value, bias and a traced ``scale``.

  Raises:
    ValueError: block sizes that are not positive ints.
  """
  B, T, S, N, K, H, Dv = inputs.shape
  G = N // K
  bq, nq = block_size(T, block_q, DEFAULT_BLOCK_Q, "block_q")
  bk, nk = block_size(S, block_k, DEFAULT_BLOCK_K, "block_k")
  Tp, Sp = bq * nq, bk * nk
  query, scale = inputs.query, inputs.scale
  if not isinstance(scale, float):        # traced scale: let autodiff see it
    query = query * jnp.asarray(scale).astype(query.dtype)
    scale = 1.0
  left, right = reach(inputs.is_causal, inputs.window)
  cfg = _Config(scale=scale, left=left, right=right,
                is_causal=inputs.is_causal, window=inputs.window,
                block_q=bq, block_k=bk, num_keys=S if Sp > S else None)
  kv_len = inputs.kv_lengths
  if kv_len is not None and Sp > S:
    kv_len = jnp.minimum(kv_len, S)
  pad_seg = lambda x, L: None if x is None else jnp.pad(  # noqa: E731
      x, ((0, 0), (0, L - x.shape[1])))
  out = _blocked_attention(
      cfg,
      _to_blocks(query.reshape(B, T, K, G, H), bq, nq),
      _to_blocks(inputs.key, bk, nk),
      _to_blocks(inputs.value, bk, nk),
      _broadcast_5d(inputs.bias, K, G, Tp, Sp, 0),
      _broadcast_5d(inputs.mask, K, G, Tp, Sp, False),
      inputs.q_lengths, kv_len,
      pad_seg(inputs.q_segment_ids, Tp), pad_seg(inputs.kv_segment_ids, Sp))
  # [nq, B, K, G, bq, Dv] -> [B, T, N, Dv]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, Tp, N, Dv)
  return out[:, :T]
