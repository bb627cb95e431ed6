"""Memory-efficient exact attention (``implementation="chunked"``).

Online softmax over blocks of keys (Rabe & Staats 2021, "Self-attention Does
Not Need O(n²) Memory"; Dao et al. 2022, FlashAttention): a query block
visits the key/value blocks it can see and keeps a running max, sum and
unnormalised output per query row. The block step, forward and backward,
is :mod:`attn.kernels.online_softmax` (shared with ring attention; its
docstring has the formulas and the masking convention).

Only one ``[R, C]`` score block per head is alive at a time, so memory is
O(T) instead of O(T·S). Gradients come from a ``jax.custom_vjp`` that saves
only ``out`` and the per-row ``m``, ``log l`` and recomputes the
probabilities block by block (FlashAttention-2 backward). Dropout on the
weights happens inside the kernel, each block's keep-mask drawn from the
key and the block indices (:func:`block_keep`), so the backward sees the
forward's mask; ``logits_soft_cap`` and ``precision`` reach every block.

A call that is not differentiated (no causal or window structure, no
dropout, default ``block_q``) runs its forward with taller query blocks
(``DEFAULT_FORWARD_ONLY_BLOCK_Q``): the custom VJP's primal has its own
layout, while its forward and backward rules share the training blocks.

On a CPU without bfloat16/float16 matrix instructions (no ``avx512_bf16`` /
``amx_bf16`` etc. in ``/proc/cpuinfo``), half-precision inputs are converted
to float32 once per call and the blocks run in float32 (:func:`block_dtype`):
XLA:CPU would otherwise convert every block around every dot.

Key blocks that causal or local-window structure masks entirely are never
visited: the inner loop bounds depend on the query block index (and the
backward's on the key block index), so causal attention costs about half the
FLOPs of full attention.

The one-head step is lifted with ``jax.vmap`` over the ``B·K`` (batch ×
key/value head) axis inside each block step, so every block matmul is one
batched dot over all heads. The ``G = N / K`` query heads that share a
key/value head (GQA) are stacked as ``R = G·bq`` rows of that head. Arrays
live in a blocked layout (``q[nq, B·K, G·bq, H]``, ``k[nk, B·K, bk, H]``) so
that a block is a contiguous slice and no axis of size 1 reaches XLA (such
axes made it copy whole score blocks). Shape letters as in
:mod:`attn.kernels`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Tuple

import einops
import jax
import jax.numpy as jnp

from attn.kernels import canonical, online_softmax
from attn.kernels.canonical import AttentionInputs
from attn.masks import structure_mask

Array = jax.Array

# Defaults chosen by measurement on a 2-core AVX-512 CPU (float32, 8 heads,
# head_dim 64, T = 4096); see the README section on chunked attention.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512
# A call that is not differentiated and has no causal/window structure or
# dropout runs its forward with query blocks of up to this size: larger
# blocks give XLA:CPU larger matmuls (measured 15-22% faster forward at
# T = 4096-16384 on a 2-core AVX-512/AMX CPU, fp32 and bf16), while the
# backward is fastest with the default blocks, and causal attention wastes
# more pairs on its diagonal with larger ones. The README's chunked section
# has the numbers.
DEFAULT_FORWARD_ONLY_BLOCK_Q = 1024

# x86 / Arm CPU flags (from /proc/cpuinfo) of instructions that multiply
# bfloat16 / float16 matrices natively. Without them XLA:CPU converts every
# half-precision block to float32 around each dot, which made bf16 blocks
# 25-45% slower than float32 ones on a 2-core AVX2 CPU; the README's
# chunked section has the numbers.
_NATIVE_HALF_FLAGS = {
    "bfloat16": frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
    "float16": frozenset({"avx512_fp16", "amx_fp16"}),
}


@functools.cache
def _cpu_flags() -> Optional[frozenset]:
  """The CPU's feature flags from ``/proc/cpuinfo`` (None where unreadable)."""
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      for line in f:
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
          return frozenset(value.split())
  except OSError:
    pass
  return None


def block_dtype(dtype, platform: Optional[str] = None):
  """The dtype the score blocks' dots run in for inputs of ``dtype``.

  ``dtype`` itself, except for bfloat16 / float16 on a CPU whose flags
  (``/proc/cpuinfo``) list no instructions that multiply that type natively
  (:data:`_NATIVE_HALF_FLAGS`): there query, key and value are converted to
  float32 once per call (O(T) memory) and the output and gradients back, so
  each block skips XLA's per-dot conversion. Elsewhere (GPU, TPU, CPUs with
  such instructions, systems without ``/proc/cpuinfo``) nothing changes.
  """
  dtype = jnp.dtype(dtype)
  native = _NATIVE_HALF_FLAGS.get(dtype.name)
  platform = jax.default_backend() if platform is None else platform
  if native is None or platform != "cpu":
    return dtype
  flags = _cpu_flags()
  if flags is None or flags & native:
    return dtype
  return jnp.dtype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) description of one blocked attention call.

  Attributes:
    heads: ``(B, K, G)``: batch, key/value heads, query heads per kv head.
    left / right: query ``t`` may only see keys ``t - left <= s <= t + right``
      (``None`` = unbounded); from ``local_window_size`` and ``is_causal``.
    is_causal / window: passed to :func:`attn.masks.structure_mask`.
    block_q / block_k: block sizes.
    num_keys: real key length ``S`` when keys were padded, else ``None``.
    soft_cap: ``c`` of ``c·tanh(logits / c)``, or ``None``.
    precision: passed to every einsum.
    dropout_rate / broadcast_dropout: dropout on the weights (see
      :func:`block_keep`).
  """
  heads: Tuple[int, int, int]
  left: Optional[int]
  right: Optional[int]
  is_causal: bool
  window: Optional[Tuple[int, int]]
  block_q: int
  block_k: int
  num_keys: Optional[int]
  soft_cap: Optional[float] = None
  precision: Any = None
  dropout_rate: float = 0.0
  broadcast_dropout: bool = False

  @property
  def step_options(self):
    return dict(soft_cap=self.soft_cap, precision=self.precision,
                dropout_rate=self.dropout_rate)


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
  left, right = reach(is_causal, canonical.normalize_window(local_window_size))
  visited = 0
  for i in range(nq):
    lo, hi = kv_block_range(i, block_q=bq, block_k=bk, num_k_blocks=nk,
                            left=left, right=right)
    visited += max(0, int(hi) - int(lo))
  return visited, nq * nk


# ----------------------------------------------------------------------------
# Blocks of bias / mask, kept as 5-D [B|1, K|1, G|1, Tp|1, Sp|1] arrays.


def _block_of(x: Array, i, j, block_q: int, block_k: int) -> Array:
  """The ``[..., block_q|1, block_k|1]`` block ``(i, j)`` of a 5-D array."""
  if x.shape[3] != 1:
    x = jax.lax.dynamic_slice_in_dim(x, i * block_q, block_q, axis=3)
  if x.shape[4] != 1:
    x = jax.lax.dynamic_slice_in_dim(x, j * block_k, block_k, axis=4)
  return x


def _as_rows(x: Optional[Array], B: int, K: int, G: int, block_q: int):
  """``[B|1, K|1, G|1, bq|1, bk|1]`` -> ``[B·K, G·bq|1, bk|1]`` (or None).

  Broadcast axes are expanded with ``broadcast_to``, which XLA fuses into
  the elementwise consumer instead of materialising.
  """
  if x is None:
    return None
  _, _, g, t, c = x.shape
  rows = (1, 1) if g == 1 and t == 1 else (G, block_q)
  x = jnp.broadcast_to(x, (B, K) + rows + (c,))
  return einops.rearrange(x, "b k g r c -> (b k) (g r) c")


def _add_block(acc: Array, ds_RC: Array, i, j, heads: Tuple[int, int, int],
               block_q: int, block_k: int) -> Array:
  """``acc[block (i, j)] += ds``, summed down to ``acc``'s broadcast axes.

  ``acc`` is 5-D ``[B|1, K|1, G|1, Tp|1, Sp|1]``; ``ds`` is
  ``[B·K, G·block_q, block_k]`` and ``heads = (B, K, G)``.
  """
  B, K, G = heads
  ds = einops.rearrange(ds_RC, "(b k) (g bq) bk -> b k g bq bk", b=B, g=G)
  update = jnp.sum(ds, axis=tuple(a for a in range(5) if acc.shape[a] == 1),
                   keepdims=True)
  start = [0, 0, 0, 0, 0]
  if acc.shape[3] != 1:
    start[3] = i * block_q
  if acc.shape[4] != 1:
    start[4] = j * block_k
  current = jax.lax.dynamic_slice(acc, start, update.shape)
  return jax.lax.dynamic_update_slice(acc, current + update, start)


def _block_mask(cfg: _Config, i, j, masks) -> Optional[Array]:
  """Boolean ``[B|1, K|1, G|1, block_q|1, block_k|1]`` mask, or ``None``.

  ``masks = (mask, q_len, kv_len, q_seg, kv_seg)``; the structure part comes
  from :func:`attn.masks.structure_mask` on the block's positions.
  """
  mask, q_len, kv_len, q_seg, kv_seg = masks
  q_pos = i * cfg.block_q + jnp.arange(cfg.block_q)
  k_pos = j * cfg.block_k + jnp.arange(cfg.block_k)
  static_kv_len = cfg.num_keys if kv_len is None else None

  def one_example(ql, kl, qs, ks):
    return structure_mask(
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


def _block_unmasked(cfg: _Config, i, j):
  """Scalar bool: no causal/window/padding structure touches block (i, j).

  ``None`` when there is no such structure at all.
  """
  bq, bk = cfg.block_q, cfg.block_k
  conds = []
  if cfg.right is not None:     # last key <= first query + right
    conds.append((j + 1) * bk - 1 <= i * bq + cfg.right)
  if cfg.left is not None:      # first key >= last query - left
    conds.append(j * bk >= (i + 1) * bq - 1 - cfg.left)
  if cfg.num_keys is not None:  # no padded key in the block
    conds.append((j + 1) * bk <= cfg.num_keys)
  if not conds:
    return None
  return functools.reduce(jnp.logical_and, conds)


def _masked_or_not(cfg: _Config, i, j, masks, step):
  """``step(mask_block_or_None)``, skipping the mask where it is all True.

  Data-dependent masks (user mask, lengths, segments) are always applied;
  pure structure (causal, window, padding) only on the blocks it touches,
  chosen with ``lax.cond`` so interior blocks skip the masking pass.
  """
  if any(x is not None for x in masks):
    return step(_block_mask(cfg, i, j, masks))
  unmasked = _block_unmasked(cfg, i, j)
  if unmasked is None:
    return step(None)
  return jax.lax.cond(unmasked, lambda: step(None),
                      lambda: step(_block_mask(cfg, i, j, masks)))


def block_keep(rng, i, j, *, rate: float, heads: Tuple[int, int, int],
               block_q: int, block_k: int, broadcast: bool = False):
  """Dropout keep-mask of score block ``(i, j)``: bool ``[B·K, G·bq, bk]``.

  Drawn from ``fold_in(fold_in(rng, i), j)`` alone, so the backward pass,
  which visits the blocks in another order, regenerates exactly the mask
  the forward used, and only one block of it is ever alive (memory O(T)).
  Within the block, element ``(b·K + k, g·bq + r, c)`` belongs to batch
  ``b``, query head ``k·G + g``, query ``i·bq + r`` and key ``j·bk + c``;
  with ``broadcast`` one ``[bq, bk]`` mask is shared by all batch rows and
  heads. The pattern depends on the block sizes (not on the
  ``xla`` path's draw): same key and block sizes, same result.
  """
  B, K, G = heads
  key = jax.random.fold_in(jax.random.fold_in(rng, i), j)
  if broadcast:
    keep = jax.random.bernoulli(key, 1.0 - rate, (1, 1, block_q, block_k))
    keep = jnp.broadcast_to(keep, (B * K, G, block_q, block_k))
    return einops.rearrange(keep, "bk g r c -> bk (g r) c")
  return jax.random.bernoulli(key, 1.0 - rate, (B * K, G * block_q, block_k))


def dropout_keep_dense(rng, rate: float, *, shape, block_q=None,
                       block_k=None, broadcast: bool = False) -> Array:
  """The whole keep-mask ``[B, N, T, S]`` that chunked dropout applies.

  ``shape = (B, T, S, N, K)``; block sizes as passed to
  :func:`chunked_attention`. Materialises what the kernel draws block by
  block (:func:`block_keep`), for tests and dense references.
  """
  B, T, S, N, K = shape
  G = N // K
  bq, nq = block_size(T, block_q, DEFAULT_BLOCK_Q, "block_q")
  bk, nk = block_size(S, block_k, DEFAULT_BLOCK_K, "block_k")
  rows = []
  for i in range(nq):
    row = [block_keep(rng, i, j, rate=rate, heads=(B, K, G), block_q=bq,
                      block_k=bk, broadcast=broadcast) for j in range(nk)]
    rows.append(jnp.concatenate(row, axis=-1))
  keep = jnp.stack(rows)                        # [nq, B·K, G·bq, Sp]
  keep = einops.rearrange(keep, "nq (b k) (g r) s -> b (k g) (nq r) s",
                          b=B, g=G)
  return keep[:, :, :T, :S]


# ----------------------------------------------------------------------------
# Blocked forward / backward with a custom VJP. Shapes:
#   q[nq, B·K, G·bq, H] (scaled), k[nk, B·K, bk, H], v[nk, B·K, bk, Dv],
#   bias[B|1, K|1, G|1, Tp|1, Sp|1] or None,
#   masks = (mask like bias (bool), q_len[B], kv_len[B], q_seg[B, Tp],
#            kv_seg[B, Sp]), each possibly None.
# cfg.heads = (B, K, G) recovers the head axes.


def _keep(cfg: _Config, rng, i, j):
  if cfg.dropout_rate == 0.0:
    return None
  return block_keep(rng, i, j, rate=cfg.dropout_rate, heads=cfg.heads,
                    block_q=cfg.block_q, block_k=cfg.block_k,
                    broadcast=cfg.broadcast_dropout)


def _forward(cfg: _Config, q, k, v, bias, masks, rng):
  """``(out[nq, B·K, G·bq, Dv], m, log_l)``, statistics ``[nq, B·K, G·bq]``.
  """
  nq, BK, R, _ = q.shape
  nk, Dv = k.shape[0], v.shape[-1]
  B, K, G = cfg.heads
  bq, bk = cfg.block_q, cfg.block_k

  def one_q_block(i, q_i):
    lo, hi = kv_block_range(i, block_q=bq, block_k=bk, num_k_blocks=nk,
                            left=cfg.left, right=cfg.right)

    def body(j, carry):
      bias_ij = None if bias is None else _as_rows(
          _block_of(bias, i, j, bq, bk), B, K, G, bq)

      keep_ij = _keep(cfg, rng, i, j)

      def step(mask_ij):
        return jax.vmap(functools.partial(
            online_softmax.forward_step, **cfg.step_options))(
                q_i, k[j], v[j], bias_ij, _as_rows(mask_ij, B, K, G, bq),
                *carry, keep_ij)

      return _masked_or_not(cfg, i, j, masks, step)

    state = jax.lax.fori_loop(lo, hi, body,
                              online_softmax.init_state((BK, R), Dv))
    out, m, log_l = online_softmax.finalize(*state)
    return out.astype(q.dtype), m, log_l

  return jax.lax.map(lambda x: one_q_block(*x), (jnp.arange(nq), q))


def _backward(cfg, q, k, v, bias, masks, rng, out, m, log_l, do):
  """Blocked ``(dq, dk, dv, dbias)``, float32; layout as :func:`_forward`."""
  nq, nk = q.shape[0], k.shape[0]
  B, K, G = cfg.heads
  bq, bk = cfg.block_q, cfg.block_k
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  # With float32 blocks (transposed_dq), each key block is also stored
  # transposed, [B·K, H, bk], outside the loop over query blocks (a
  # transpose inside it would be folded into the dot), and dq accumulated
  # transposed, [nq, B·K, H, G·bq]: dqᵀ = kᵀ · dsᵀ is a plain matmul for
  # XLA:CPU, dq = dsᵀ · k is not (see online_softmax.backward_step).

  transposed = transposed_dq(k.dtype)

  def one_k_block(carry, j):
    k_j, v_j = k[j], v[j]
    k_t_j = jnp.swapaxes(k_j, -1, -2) if transposed else None
    lo, hi = q_block_range(j, block_q=bq, block_k=bk, num_q_blocks=nq,
                           left=cfg.left, right=cfg.right)

    def body(i, state):
      dq, dbias, dk_j, dv_j = state
      bias_ij = None if bias is None else _as_rows(
          _block_of(bias, i, j, bq, bk), B, K, G, bq)

      keep_ij = _keep(cfg, rng, i, j)

      def step(mask_ij):
        return jax.vmap(functools.partial(
            online_softmax.backward_step, **cfg.step_options))(
                q[i], k_j, v_j, bias_ij, _as_rows(mask_ij, B, K, G, bq),
                do[i], m[i], log_l[i], delta[i], keep_ij, k_t_j)

      dq_i, dk_ij, dv_ij, ds = _masked_or_not(cfg, i, j, masks, step)
      dq = dq.at[i].add(dq_i)
      if dbias is not None:
        dbias = _add_block(dbias, ds, i, j, cfg.heads, bq, bk)
      return dq, dbias, dk_j + dk_ij, dv_j + dv_ij

    dq, dbias = carry
    dk_j = jnp.zeros(k_j.shape, jnp.float32)
    dv_j = jnp.zeros(v_j.shape, jnp.float32)
    dq, dbias, dk_j, dv_j = jax.lax.fori_loop(lo, hi, body,
                                              (dq, dbias, dk_j, dv_j))
    return (dq, dbias), (dk_j, dv_j)

  init = (jnp.zeros(_transposed_rows(q.shape) if transposed else q.shape,
                    jnp.float32),
          None if bias is None else jnp.zeros(bias.shape, jnp.float32))
  (dq, dbias), (dk, dv) = jax.lax.scan(one_k_block, init, jnp.arange(nk))
  return (jnp.swapaxes(dq, -1, -2) if transposed else dq), dk, dv, dbias


def transposed_dq(dtype) -> bool:
  """Whether the backward computes ``dq`` transposed (``dqᵀ = kᵀ · dsᵀ``,
  see :func:`_backward`): for float32 blocks only. With bfloat16 / float16
  blocks (CPUs with native half-precision instructions, and accelerators)
  XLA:CPU leaves that dot out of its YNNPACK fusions for short sequences
  (one block), and its plain dot rejects ``BF16 x BF16 = F32`` when the
  program runs (``UNIMPLEMENTED``; T <= 256 on an AVX-512/AMX Xeon)."""
  return jnp.dtype(dtype) == jnp.float32


def _transposed_rows(shape):
  """``[nq, B·K, R, H]`` -> ``(nq, B·K, H, R)``: the layout dq accumulates
  in (see :func:`_backward`)."""
  nq, BK, R, H = shape
  return nq, BK, H, R


def _query_side(cfg: _Config, query, bias, masks, num_keys: int):
  """``(q, bias, masks)`` in ``cfg``'s blocked, padded layout.

  ``query[B, T, N, H]`` (scaled), ``bias``/``mask`` canonical ``[B|1,
  N|1, T|1, S|1]`` or None, ``masks = (mask, q_len, kv_len, q_seg,
  kv_seg)``; ``num_keys = S``. Everything that depends on the query blocks.
  """
  B, T, N, _ = query.shape
  K, G = cfg.heads[1], cfg.heads[2]
  nq = -(-T // cfg.block_q)
  Tp = cfg.block_q * nq
  Sp = cfg.block_k * -(-num_keys // cfg.block_k)
  mask, q_len, kv_len, q_seg, kv_seg = masks

  def pad_segments(x, length):
    return None if x is None else jnp.pad(x, ((0, 0), (0, length - x.shape[1])))

  return (_q_blocks(query, cfg.block_q, nq, K),
          _broadcast_5d(bias, K, G, Tp, Sp, 0),
          (_broadcast_5d(mask, K, G, Tp, Sp, False), q_len, kv_len,
           pad_segments(q_seg, Tp), pad_segments(kv_seg, Sp)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(cfgs, T, blocked, forward_only, rng):
  """``(out, lse)`` in ``trained``'s blocked layout: exact attention.

  ``cfgs = (forward_only, trained)`` configs; ``blocked = (q, k, v, bias,
  masks)`` in ``trained``'s layout (:func:`_query_side`,
  :func:`_kv_blocks`), ``forward_only = (q, bias, masks)`` in the other's
  (None when the configs are the same; key blocks always are). The primal (a call that is not differentiated)
  runs with ``forward_only``'s blocks and re-blocks its result (one copy of
  ``out``); a differentiated call runs forward and backward with
  ``trained``'s, and XLA drops the unused layout. ``lse`` has no gradient
  (as in ``jax.nn``): its cotangent is ignored.
  """
  fast, trained = cfgs
  q, k, v, bias, masks = blocked
  if forward_only is None:
    return _with_lse(*_forward(trained, q, k, v, bias, masks, rng))
  q_fast, bias, masks = forward_only
  out, lse = _with_lse(*_forward(fast, q_fast, k, v, bias, masks, rng))
  B, K, G = fast.heads
  nq = q.shape[0]

  def reblock(x):
    x = _from_q_blocks(x, B, K, G, T)
    return _q_blocks(x, trained.block_q, nq, K)

  return reblock(out), reblock(lse[..., None])[..., 0]


def _with_lse(out, m, log_l):
  return out, online_softmax.logsumexp(m, log_l)


def _attention_fwd(cfgs, T, blocked, forward_only, rng):
  out, m, log_l = _forward(cfgs[1], *blocked, rng)
  return _with_lse(out, m, log_l), (blocked, rng, out, m, log_l)


def _attention_bwd(cfgs, T, residuals, cotangents):
  blocked, rng, out, m, log_l = residuals
  q, k, v, bias, masks = blocked
  do, _ = cotangents                   # lse is stop-gradient, as in jax.nn
  dq, dk, dv, dbias = _backward(cfgs[1], q, k, v, bias, masks, rng, out, m,
                                log_l, do)
  no_grad = jax.tree.map(lambda _: None, masks)
  alternative = None if cfgs[0] == cfgs[1] else (None, None, no_grad)
  return ((dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
           None if bias is None else dbias.astype(bias.dtype), no_grad),
          alternative, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------
# Public entry point.


def _kv_blocks(x: Array, size: int, count: int) -> Array:
  """``[B, S, K, D]`` -> zero-padded ``[nk, B·K, bk, D]`` (``bk = size``)."""
  S = x.shape[1]
  x = jnp.pad(x, ((0, 0), (0, size * count - S), (0, 0), (0, 0)))
  return einops.rearrange(x, "b (nk bk) k d -> nk (b k) bk d", nk=count)


def _q_blocks(x: Array, size: int, count: int, K: int) -> Array:
  """``[B, T, N, D]`` -> zero-padded ``[nq, B·K, G·bq, D]`` (``bq = size``)."""
  T = x.shape[1]
  x = jnp.pad(x, ((0, 0), (0, size * count - T), (0, 0), (0, 0)))
  return einops.rearrange(x, "b (nq bq) (k g) d -> nq (b k) (g bq) d",
                          nq=count, k=K)


def _from_q_blocks(x: Array, B: int, K: int, G: int, T: int) -> Array:
  """Inverse of :func:`_q_blocks` (drops the padding)."""
  x = einops.rearrange(x, "nq (b k) (g bq) d -> b (nq bq) (k g) d", b=B, g=G)
  return x[:, :T]


def _broadcast_5d(x: Optional[Array], K: int, G: int, Tp: int, Sp: int,
                  pad_value) -> Optional[Array]:
  """``[B|1, N|1, T|1, S|1]`` -> padded ``[B|1, K|1, G|1, Tp|1, Sp|1]``."""
  if x is None:
    return None
  b, n, t, s = x.shape
  x = einops.rearrange(x, "b (k g) t s -> b k g t s", k=K if n != 1 else 1)
  pad = [(0, 0)] * 3 + [(0, Tp - t if t != 1 else 0),
                        (0, Sp - s if s != 1 else 0)]
  return jnp.pad(x, pad, constant_values=pad_value)


def chunked_attention(inputs: AttentionInputs, *,
                      block_q: Optional[int] = None,
                      block_k: Optional[int] = None,
                      dropout_rate: float = 0.0, dropout_rng=None,
                      broadcast_dropout: bool = False,
                      return_residual: bool = False):
  """Exact attention by blockwise online softmax; memory O(T), not O(T·S).

  Args:
    inputs: canonical arguments from :func:`canonical.canonicalize`:
      ``query[B, T, N, H]``, ``key[B, S, K, H]``, ``value[B, S, K, Dv]``,
      bias/mask broadcastable to ``[B, N, T, S]``, causal, lengths, local
      window, segment ids, ``logits_soft_cap`` and ``precision`` (when the
      record has them). Any ``T``/``S`` (padded internally), ``N`` a
      multiple of ``K``, any float dtype (softmax and accumulation in
      float32; bfloat16/float16 blocks run in float32 on a CPU without
      instructions for them, see :func:`block_dtype`).
    block_q / block_k: largest query / key block (defaults
      ``DEFAULT_BLOCK_Q`` / ``DEFAULT_BLOCK_K``); blocks are balanced so the
      padding is under one block. With the default ``block_q``, a call that
      is not differentiated, has no causal or window structure and no
      dropout uses query blocks of up to ``DEFAULT_FORWARD_ONLY_BLOCK_Q``
      (same result up to float rounding; a differentiated call's forward
      and backward use ``DEFAULT_BLOCK_Q``).
    dropout_rate / dropout_rng / broadcast_dropout: dropout on the
      attention weights inside the kernel (FlashAttention-2 style): each
      score block's keep-mask is drawn from the key and the block indices
      (:func:`block_keep`), so the backward recomputes the forward's mask
      and memory stays O(T). Same key and block sizes -> same result; the
      pattern differs from the ``xla`` path's (same distribution).
    return_residual: also return ``lse[B, T, N]``, float32, the
      log-sum-exp of each query row's scaled (capped, biased, masked)
      logits, as ``jax.nn.dot_product_attention(return_residual=True)``
      (``-inf`` for rows that see no key). Like jax.nn's it carries no
      gradient.

  Returns:
    ``out[B, T, N, Dv]`` in the input dtype (or ``(out, lse)``); query rows
    that can see no key are zeros with zero gradients. Differentiable in
    reverse mode w.r.t. query, key, value, bias and a traced ``scale``.

  Raises:
    ValueError: block sizes that are not positive ints; bad dropout
      arguments.
  """
  canonical.check_dropout(dropout_rate, dropout_rng)
  B, T, S, N, K, H, Dv = inputs.shape
  G = N // K
  bq, _ = block_size(T, block_q, DEFAULT_BLOCK_Q, "block_q")
  bk, nk = block_size(S, block_k, DEFAULT_BLOCK_K, "block_k")
  if S == 0:                            # no keys: every row is fully masked
    out = jnp.zeros((B, T, N, Dv), inputs.query.dtype)
    return (out, jnp.full((B, T, N), -jnp.inf)) if return_residual else out
  # Scale q once (as Flax does) instead of every score block; a traced scale
  # stays differentiable because this happens outside the custom VJP.
  compute = block_dtype(inputs.query.dtype)
  query = (inputs.query.astype(jnp.float32)
           * jnp.asarray(inputs.scale, jnp.float32)).astype(compute)
  key, value = (x.astype(jnp.promote_types(x.dtype, compute))
                for x in (inputs.key, inputs.value))
  left, right = reach(inputs.is_causal, inputs.window)
  trained = _Config(heads=(B, K, G), left=left, right=right,
                    is_causal=inputs.is_causal, window=inputs.window,
                    block_q=bq, block_k=bk,
                    num_keys=S if bk * nk > S else None,
                    soft_cap=_soft_cap(getattr(inputs, "logits_soft_cap",
                                               None)),
                    precision=getattr(inputs, "precision", None),
                    dropout_rate=float(dropout_rate),
                    broadcast_dropout=bool(broadcast_dropout))
  forward_only = trained
  if (block_q is None and dropout_rate == 0 and left is None
      and right is None):
    forward_only = dataclasses.replace(trained, block_q=block_size(
        T, None, DEFAULT_FORWARD_ONLY_BLOCK_Q, "block_q")[0])
  kv_len = inputs.kv_lengths
  if kv_len is not None and trained.num_keys is not None:   # keys padded
    kv_len = jnp.minimum(kv_len, S)
  masks = (inputs.mask, inputs.q_lengths, kv_len, inputs.q_segment_ids,
           inputs.kv_segment_ids)
  q, bias, masks_5d = _query_side(trained, query, inputs.bias, masks, S)
  blocked = (q, _kv_blocks(key, bk, nk), _kv_blocks(value, bk, nk), bias,
             masks_5d)
  alternative = None
  if forward_only != trained:
    alternative = _query_side(forward_only, query, inputs.bias, masks, S)
  out, lse = _attention((forward_only, trained), T, blocked, alternative,
                        dropout_rng if dropout_rate > 0 else None)
  out = _from_q_blocks(out, B, K, G, T).astype(inputs.query.dtype)
  if not return_residual:
    return out
  return out, _from_q_blocks(lse[..., None], B, K, G, T)[..., 0]


def _soft_cap(c) -> Optional[float]:
  """``logits_soft_cap`` (validated by :mod:`canonical`) as a static float."""
  return None if c is None else float(c)
