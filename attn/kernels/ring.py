"""Ring attention: exact attention with the sequence sharded over a mesh axis.

Liu, Zaharia & Abbeel (2023), "Ring Attention with Blockwise Transformers for
Near-Infinite Context". With ``n`` devices on the ``seq`` mesh axis, device
``i`` holds query block ``Q_i`` and key/value block ``K_i, V_i`` (``T/n`` and
``S/n`` positions). For ``r = 0 .. n-1`` device ``i`` attends ``Q_i`` to the
key/value block it currently holds, ``K_{(i-r) mod n}``, then passes that
block to device ``i+1`` with ``jax.lax.ppermute``. Blocks are combined with
the online softmax (running max ``m``, running sum ``l``, unnormalised
output ``o``): the block step, forward and backward, and its masking
convention are :mod:`attn.kernels.online_softmax`, shared with the chunked
kernel. Shape letters as in :mod:`attn.kernels` (``b``, ``tq``: the batch
and query length held by one device).

Within a ring step the block pair is itself processed in ``block_q × block_k``
chunks, so no device ever holds more than one chunk of scores: per-device
memory is ``O((T + S) / n)``.

The backward pass is a ``jax.custom_vjp`` (FlashAttention-2 style): it keeps
only ``out`` and the per-row ``m``, ``log l`` (``O(T)``), recomputes each
chunk's probabilities ``p = exp((s - m) - log l)``, keeps ``dQ_i`` on its
device and sends ``dK, dV``
accumulators around the ring together with their key/value block; one extra
``ppermute`` returns them to the owning device.

Chunk pairs that the causal/window structure or the ring's own padding
masks completely are skipped with ``lax.cond``: their compute is not done
(the loop still visits them, a few scalar ops each). With ``is_causal=True``
that halves the work, but the load is unbalanced: device ``n-1`` computes
``n`` block pairs, device 0 one (no striped/zigzag reordering).

Memory per device: the local ``q, k, v``, the output, the float32 output
accumulator, one ``[block_q, block_k]`` score chunk per head, and a second
key/value block (the receive buffer that lets XLA overlap the ``ppermute``
with the step's compute).

The batch axis is sharded over ``data_axis`` and heads over ``model_axis``
when the mesh has those axes and the sizes divide; otherwise they are
replicated (correct, but computed redundantly).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, Optional, Tuple

import einops
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from attn import masks
from attn.kernels import canonical, online_softmax
from attn import registry
from attn.registry import register_attention

Array = jax.Array

# Chunk size inside a ring step. Each device already holds only T/n
# positions; 256 keeps the per-head score chunk (256 x 256 float32) small
# next to the O(T/n) buffers (see the README's memory table).
DEFAULT_BLOCK = 256


# --------------------------------------------------------------------------
# The one-head block step (attn.kernels.online_softmax), lifted to the ring's
# layout.
# --------------------------------------------------------------------------

def _over_heads(fn, out_axes):
  """Lifts a one-head chunk function over batch, kv heads and groups.

  ``fn`` is :func:`attn.kernels.online_softmax.forward_step` or
  ``backward_step``. Arguments are ``(q, k, v, bias, mask, *per_query)`` in
  the sequence-major layout of the ring: ``q[b, t, K, G, H]``,
  ``k[b, s, K, H]``, ``v[b, s, K, Dv]``, ``bias/mask[b, K, G, t, s]`` (or
  ``None``) and per-query arrays ``[b, t, K, G, ...]``. ``k``/``v`` are
  shared by the ``G`` query heads of a group (grouped-query attention).
  ``out_axes`` gives, per output, its axis at the group and kv-head levels
  (batch is always 0). Mapping non-leading axes avoids transposing the large
  per-device arrays.
  """
  def lift(q, k, v, bias, mask, *rest):
    per_query = (1,) * len(rest)
    over_group = jax.vmap(fn, in_axes=(1, None, None, 0, 0) + per_query,
                          out_axes=out_axes)
    over_kv = jax.vmap(over_group, in_axes=(1, 1, 1, 0, 0) + per_query,
                       out_axes=out_axes)
    return jax.vmap(over_kv)(q, k, v, bias, mask, *rest)
  return lift


# --------------------------------------------------------------------------
# One ring step: the local query block against one key/value block, chunked.
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _RingConfig:
  """Static description of one ring-attention call (hashable)."""
  mesh: Any
  seq_axis: str
  batch_axis: Optional[str]
  head_axis: Optional[str]
  scale: float
  is_causal: bool
  window: Optional[Tuple[int, int]]
  kv_valid: int          # keys at positions >= kv_valid are ring padding
  kv_padded: bool
  block_q: int
  block_k: int
  bias_psum_axes: Tuple[str, ...] = ()
  soft_cap: Optional[float] = None
  precision: Any = None

  @property
  def step_options(self):
    return dict(soft_cap=self.soft_cap, precision=self.precision)

  @property
  def ring_size(self) -> int:
    return self.mesh.shape[self.seq_axis]

  @property
  def has_skippable_structure(self) -> bool:
    return self.is_causal or self.window is not None or self.kv_padded

  def skip(self, q_first, q_last, k_first, k_last):
    """True when no (query, key) pair in the position ranges may attend."""
    out = jnp.asarray(False)
    if self.is_causal:
      out |= k_first > q_last
    if self.window is not None:
      left, right = self.window
      out |= (k_first > q_last + right) | (k_last < q_first - left)
    if self.kv_padded:
      out |= k_first >= self.kv_valid
    return out


def _slice_ts(x, row, col, rows, cols):
  """Rows/cols of a ``[b, n, t|1, s|1]`` array (size-1 axes broadcast)."""
  if x.shape[2] > 1:
    x = lax.dynamic_slice_in_dim(x, row, rows, axis=2)
  if x.shape[3] > 1:
    x = lax.dynamic_slice_in_dim(x, col, cols, axis=3)
  return x


def _put_ts(x, chunk, row, col):
  """Writes ``chunk`` (from :func:`_slice_ts`) back into ``x``."""
  starts = (0, 0, row if x.shape[2] > 1 else 0, col if x.shape[3] > 1 else 0)
  return lax.dynamic_update_slice(x, chunk, starts)


def _sum_to(x, shape):
  """Sums broadcast axes of ``x`` so it has ``shape`` (same rank)."""
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if a != b)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _chunk_mask(cfg, ex, q_pos, k_pos, q_start, kv_seg, k_start, k_col):
  """Boolean ``[b, N, bq, bk]`` mask of one chunk pair, or ``None``.

  Combines the user mask with the structure mask (causal, window, lengths,
  segments, ring padding) built from global positions by
  :func:`attn.masks.structure_mask`.
  """
  bq, bk = q_pos.shape[0], k_pos.shape[0]
  b, N = ex["q"].shape[0], ex["q"].shape[2]
  parts = []
  if "mask" in ex:
    parts.append(_slice_ts(ex["mask"], q_start, k_col, bq, bk))
  qlen, kvlen = ex.get("q_lengths"), ex.get("kv_lengths")
  qseg = kvseg = None
  if "q_segment_ids" in ex:
    qseg = lax.dynamic_slice_in_dim(ex["q_segment_ids"], q_start, bq, axis=1)
    kvseg = lax.dynamic_slice_in_dim(kv_seg, k_start, bk, axis=1)
  if (cfg.is_causal or cfg.window is not None or qlen is not None
      or kvlen is not None or qseg is not None):
    smask = jax.vmap(
        lambda ql, kl, qs, ks: masks.structure_mask(
            q_pos, k_pos, is_causal=cfg.is_causal, window=cfg.window,
            q_length=ql, kv_length=kl, q_segment=qs, kv_segment=ks),
        in_axes=(None if qlen is None else 0, None if kvlen is None else 0,
                 None if qseg is None else 0, None if kvseg is None else 0),
        axis_size=b)(qlen, kvlen, qseg, kvseg)
    parts.append(smask[:, None])
  if not parts:
    return None
  mask = functools.reduce(jnp.logical_and, parts)
  return jnp.broadcast_to(mask, (b, N, bq, bk))


def _heads_ts(x, K):
  """``[b, K·G, bq, bk]`` -> ``[b, K, G, bq, bk]`` (``None`` passes)."""
  if x is None:
    return None
  return einops.rearrange(x, "b (k g) bq bk -> b k g bq bk", k=K)


def _pair_loop(cfg, q_offset, k_offset, n_q, n_k, body, carry):
  """``body(carry, q_start, k_start, q_pos, k_pos, skip)`` over chunk pairs.

  ``skip`` is a scalar bool (True: the chunk pair is entirely masked by
  causal/window structure or ring padding) or ``None`` without such
  structure; ``body`` guards its compute with :func:`_unless`.
  """
  bq, bk = cfg.block_q, cfg.block_k

  def one(p, carry):
    i, j = p // n_k, p % n_k
    q_pos = q_offset + i * bq + jnp.arange(bq)
    k_pos = k_offset + j * bk + jnp.arange(bk)
    skip = None
    if cfg.has_skippable_structure:
      skip = cfg.skip(q_pos[0], q_pos[-1], k_pos[0], k_pos[-1])
    return body(carry, i * bq, j * bk, q_pos, k_pos, skip)

  return lax.fori_loop(0, n_q * n_k, one, carry)


def _unless(skip, skipped, compute):
  """``compute()``, or ``skipped()`` without computing when ``skip`` is True.

  The ``lax.cond`` sits on chunk-sized values only, so skipping never copies
  the per-device accumulators.
  """
  if skip is None:
    return compute()
  return lax.cond(skip, skipped, compute)


def _chunk_inputs(cfg, ex, blk, q_start, k_start, q_pos, k_pos, k_offset):
  """Slicers and the grouped ``(q, k, v, bias, mask)`` of one chunk pair."""
  bq, bk = cfg.block_q, cfg.block_k
  b, _, N, _ = ex["q"].shape
  K = blk["k"].shape[2]
  k_col = k_offset + k_start
  sl_q = functools.partial(lax.dynamic_slice_in_dim, start_index=q_start,
                           slice_size=bq, axis=1)
  sl_k = functools.partial(lax.dynamic_slice_in_dim, start_index=k_start,
                           slice_size=bk, axis=1)
  mask = _chunk_mask(cfg, ex, q_pos, k_pos, q_start, blk.get("kv_seg"),
                     k_start, k_col)
  bias = None
  if "bias" in ex:
    bias = jnp.broadcast_to(_slice_ts(ex["bias"], q_start, k_col, bq, bk),
                            (b, N, bq, bk))
  # The block step takes q pre-multiplied by the scale; scaling the chunk
  # (not the whole local q) keeps no scaled copy of q alive.
  q = ex["q"]
  q_c = (sl_q(q).astype(jnp.float32) * cfg.scale).astype(q.dtype)
  args = (_groups(q_c, K), sl_k(blk["k"]), sl_k(blk["v"]),
          _heads_ts(bias, K), _heads_ts(mask, K))
  return sl_q, sl_k, args


def _step_forward(cfg, ex, acc, blk, q_offset, k_offset):
  """Folds key/value block ``blk`` into the accumulators ``(m, l, o)``.

  ``m/l[b, tq, N]``, ``o[b, tq, N, Dv]``. Returns ``(acc, blk)``.
  """
  K = blk["k"].shape[2]
  n_q = ex["q"].shape[1] // cfg.block_q
  n_k = blk["k"].shape[1] // cfg.block_k
  step = _over_heads(functools.partial(online_softmax.forward_step,
                                       **cfg.step_options),
                     out_axes=(1, 1, 1))

  def body(acc, q_start, k_start, q_pos, k_pos, skip):
    sl_q, _, args = _chunk_inputs(cfg, ex, blk, q_start, k_start, q_pos,
                                  k_pos, k_offset)
    old = tuple(sl_q(x) for x in acc)
    new = _unless(skip, lambda: old, lambda: tuple(map(_ungroup, step(
        *args, *(_groups(x, K) for x in old)))))
    return tuple(lax.dynamic_update_slice_in_dim(x, x_c, q_start, axis=1)
                 for x, x_c in zip(acc, new))

  return _pair_loop(cfg, q_offset, k_offset, n_q, n_k, body, acc), blk


def _step_backward(cfg, ex, grads, blk, q_offset, k_offset):
  """Adds one key/value block's gradient contributions.

  ``grads = (dq[b, tq, N, H], dbias)`` stay on this device; the float32
  accumulators ``blk["dk"], blk["dv"]`` travel with the block. Returns
  ``(grads, blk)``.
  """
  b, tq, N, _ = ex["q"].shape
  K = blk["k"].shape[2]
  bq, bk = cfg.block_q, cfg.block_k
  n_q, n_k = tq // bq, blk["k"].shape[1] // bk
  step = _over_heads(functools.partial(online_softmax.backward_step,
                                       **cfg.step_options),
                     out_axes=(1, 1, 1, 0))

  def body(carry, q_start, k_start, q_pos, k_pos, skip):
    dq, dbias, dk, dv = carry
    k_col = k_offset + k_start
    sl_q, sl_k, args = _chunk_inputs(cfg, ex, blk, q_start, k_start, q_pos,
                                     k_pos, k_offset)
    old = (sl_q(dq), sl_k(dk), sl_k(dv),
           None if dbias is None else _slice_ts(dbias, q_start, k_col, bq, bk))

    def compute():
      dq_c, dk_c, dv_c, ds_c = step(
          *args, *(_groups(sl_q(ex[name]), K)
                   for name in ("do", "m", "log_l", "delta")))
      # dk_c/dv_c are [b, bk, K, G, D]: sum the G query heads of each group.
      # dq_c is with respect to the scaled query chunk.
      new = [old[0] + _ungroup(dq_c) * cfg.scale, old[1] + dk_c.sum(axis=3),
             old[2] + dv_c.sum(axis=3), None]
      if dbias is not None:
        ds_c = einops.rearrange(ds_c, "b k g bq bk -> b (k g) bq bk")
        new[3] = old[3] + _sum_to(ds_c, old[3].shape)
      return tuple(new)

    dq_c, dk_c, dv_c, dbias_c = _unless(skip, lambda: old, compute)
    dq = lax.dynamic_update_slice_in_dim(dq, dq_c, q_start, axis=1)
    dk = lax.dynamic_update_slice_in_dim(dk, dk_c, k_start, axis=1)
    dv = lax.dynamic_update_slice_in_dim(dv, dv_c, k_start, axis=1)
    if dbias is not None:
      dbias = _put_ts(dbias, dbias_c, q_start, k_col)
    return dq, dbias, dk, dv

  dq, dbias, dk, dv = _pair_loop(cfg, q_offset, k_offset, n_q, n_k, body,
                                 (*grads, blk["dk"], blk["dv"]))
  return (dq, dbias), dict(blk, dk=dk, dv=dv)


# --------------------------------------------------------------------------
# The ring: per-device bodies run under jax.shard_map.
# --------------------------------------------------------------------------

def _ring_loop(cfg, step, carry, blk):
  """Runs ``step(r, carry, blk) -> (carry, blk)`` for ``r = 0..n-1``.

  Between steps every leaf of ``blk`` moves one device along the ring
  (device ``i`` -> ``i+1``), so at step ``r`` device ``i`` holds the block of
  device ``(i - r) mod n``.
  """
  def body(r, state):
    carry, blk = step(r, *state)
    return carry, _shift(cfg, blk)

  carry, blk = lax.fori_loop(0, cfg.ring_size - 1, body, (carry, blk))
  return step(cfg.ring_size - 1, carry, blk)


def _shift(cfg, tree):
  """Sends every leaf to the next device on the ring (``i`` -> ``i+1``)."""
  n = cfg.ring_size
  perm = [(i, (i + 1) % n) for i in range(n)]
  return jax.tree.map(lambda x: lax.ppermute(x, cfg.seq_axis, perm), tree)


def _groups(x, K):
  """``[b, t, N, ...]`` -> ``[b, t, K, G, ...]`` (a free reshape)."""
  return einops.rearrange(x, "b t (k g) ... -> b t k g ...", k=K)


def _ungroup(x):
  """``[b, t, K, G, ...]`` -> ``[b, t, K·G, ...]``."""
  return einops.rearrange(x, "b t k g ... -> b t (k g) ...")


def _offsets(cfg, ex, blk, r):
  """Global position of this device's queries and of the held block."""
  idx = lax.axis_index(cfg.seq_axis)
  src = (idx - r) % cfg.ring_size
  return idx * ex["q"].shape[1], src * blk["k"].shape[1]


def _forward_body(cfg, arrays):
  """Per-device forward: ``{q, k, v, ...}`` shards -> ``(out, m, log_l)``.

  Everything stays in the ``[b, t, N, ...]`` layout of the inputs; heads
  are grouped per chunk, so no per-device array is transposed.
  """
  ex = dict(arrays)
  blk = {"k": ex.pop("k"), "v": ex.pop("v")}
  if "kv_segment_ids" in ex:
    blk["kv_seg"] = ex.pop("kv_segment_ids")
  b, tq, N, _ = ex["q"].shape
  acc = online_softmax.init_state((b, tq, N), blk["v"].shape[-1])

  def step(r, acc, blk):
    return _step_forward(cfg, ex, acc, blk, *_offsets(cfg, ex, blk, r))

  acc, _ = _ring_loop(cfg, step, acc, blk)
  out, m, log_l = online_softmax.finalize(*acc)
  return out.astype(ex["q"].dtype), m, log_l


def _backward_body(cfg, arrays):
  """Per-device backward: shards + ``out, m, log_l, do`` -> gradients."""
  ex = dict(arrays)
  k, v, out = ex.pop("k"), ex.pop("v"), ex.pop("out")
  ex["delta"] = jnp.sum(ex["do"].astype(jnp.float32)
                        * out.astype(jnp.float32), axis=-1)     # [b, tq, N]
  blk = {"k": k, "v": v, "dk": jnp.zeros(k.shape, jnp.float32),
         "dv": jnp.zeros(v.shape, jnp.float32)}
  if "kv_segment_ids" in ex:
    blk["kv_seg"] = ex.pop("kv_segment_ids")
  bias = ex.get("bias")
  grads = (jnp.zeros(ex["q"].shape, jnp.float32),
           None if bias is None else jnp.zeros(bias.shape, jnp.float32))

  def step(r, grads, blk):
    return _step_backward(cfg, ex, grads, blk, *_offsets(cfg, ex, blk, r))

  (dq, dbias), blk = _ring_loop(cfg, step, grads, blk)
  # One more hop brings each dK/dV accumulator home to its block's owner.
  dk, dv = _shift(cfg, (blk["dk"], blk["dv"]))
  grads = {"q": dq.astype(ex["q"].dtype), "k": dk.astype(k.dtype),
           "v": dv.astype(v.dtype)}
  if bias is not None:
    if cfg.bias_psum_axes:
      dbias = lax.psum(dbias, cfg.bias_psum_axes)
    grads["bias"] = dbias.astype(bias.dtype)
  return grads


def _bias_psum_axes(bias_shape, batch_axis, head_axis, seq_axis):
  """Mesh axes a ``[B|1, N|1, T|1, S]`` bias is broadcast along.

  Devices on those axes hold different batch rows / heads / queries, so
  their bias-gradient contributions are summed with ``psum``.
  """
  if bias_shape is None:
    return ()
  axes = (batch_axis if bias_shape[0] == 1 else None,
          head_axis if bias_shape[1] == 1 else None,
          seq_axis if bias_shape[2] == 1 else None)
  return tuple(a for a in axes if a is not None)


def _specs(cfg, arrays) -> Dict[str, P]:
  """PartitionSpec of every (global, padded) array passed to shard_map."""
  bax, sax, hax = cfg.batch_axis, cfg.seq_axis, cfg.head_axis
  btnh = P(bax, sax, hax, None)
  specs = {}
  for name, x in arrays.items():
    if name in ("q", "k", "v", "out", "do"):
      specs[name] = btnh
    elif name in ("bias", "mask"):
      specs[name] = P(bax if x.shape[0] > 1 else None,
                      hax if x.shape[1] > 1 else None,
                      sax if x.shape[2] > 1 else None, None)
    elif name in ("q_lengths", "kv_lengths"):
      specs[name] = P(bax)
    elif name in ("q_segment_ids", "kv_segment_ids"):
      specs[name] = P(bax, sax)
    elif name in ("m", "log_l"):
      specs[name] = P(bax, sax, hax)
    else:
      raise AssertionError(name)
  return specs


def _explicit(mesh) -> bool:
  return any(t == AxisType.Explicit for t in mesh.axis_types)


def _shard_map(cfg, fn, arrays, out_specs):
  """``fn(cfg, local_arrays)`` on every device; arrays resharded to ``_specs``.

  Auto mesh axes are resharded by ``shard_map`` itself; Explicit axes (the
  default of ``jax.make_mesh``) need an explicit ``jax.sharding.reshard``.
  """
  specs = _specs(cfg, arrays)
  if _explicit(cfg.mesh):
    arrays = {name: jax.sharding.reshard(x, NamedSharding(cfg.mesh,
                                                          specs[name]))
              for name, x in arrays.items()}
  return jax.shard_map(
      functools.partial(fn, cfg), mesh=cfg.mesh, in_specs=(specs,),
      out_specs=out_specs, check_vma=False)(arrays)


def _like(cfg, x, primal):
  """With Explicit mesh axes, gives ``x`` the sharding type of ``primal``.

  Outputs and cotangents must match their primal's type there, and an
  unevenly padded sequence axis can only be sliced when it is unsharded.
  """
  if not _explicit(cfg.mesh):
    return x
  sharding = jax.typeof(primal).sharding
  if sharding.mesh.empty:  # an array outside any mesh: replicate it
    sharding = NamedSharding(cfg.mesh, P())
  return jax.sharding.reshard(x, sharding)


def _forward(cfg, arrays):
  specs = _specs(cfg, arrays)
  stats = P(cfg.batch_axis, cfg.seq_axis, cfg.head_axis)
  out, m, log_l = _shard_map(cfg, _forward_body, arrays,
                             (specs["q"], stats, stats))
  return _like(cfg, out, arrays["q"]), m, log_l


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg, arrays):
  """``(out, lse)`` on padded global arrays; ``arrays`` is a dict.

  ``lse`` carries no gradient (as in ``jax.nn``).
  """
  out, m, log_l = _forward(cfg, arrays)
  return out, online_softmax.logsumexp(m, log_l)


def _ring_fwd(cfg, arrays):
  out, m, log_l = _forward(cfg, arrays)
  return (out, online_softmax.logsumexp(m, log_l)), (arrays, out, m, log_l)


def _ring_bwd(cfg, residuals, cotangents):
  arrays, out, m, log_l = residuals
  do, _ = cotangents                   # lse is stop-gradient, as in jax.nn
  full = dict(arrays, out=out, m=m, log_l=log_l, do=do)
  specs = _specs(cfg, full)
  diff = [name for name in ("q", "k", "v", "bias") if name in arrays]
  grads = _shard_map(cfg, _backward_body, full,
                     {name: specs[name] for name in diff})
  return ({name: _like(cfg, grads[name], x) if name in grads else None
           for name, x in arrays.items()},)


_ring.defvjp(_ring_fwd, _ring_bwd)


# --------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------

def _resolve_mesh(mesh, seq_axis: str):
  """The explicit mesh, or the ambient one from ``jax.set_mesh``."""
  source = "mesh="
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    source = "the ambient mesh (jax.set_mesh)"
  if mesh is None or mesh.empty or seq_axis not in mesh.axis_names:
    names = () if mesh is None or mesh.empty else tuple(mesh.axis_names)
    raise ValueError(
        f"ring attention needs a device mesh with a {seq_axis!r} axis; "
        f"{source} has axes {names}. Pass mesh=..., or run the model inside "
        "`with jax.set_mesh(attn.parallel.make_mesh(seq=...)):`")
  return mesh


def _mesh_axis(mesh, name: Optional[str], *sizes: int) -> Optional[str]:
  """``name`` if it is a mesh axis of size > 1 dividing every size."""
  if name is None or name not in mesh.axis_names:
    return None
  n = mesh.shape[name]
  if n == 1 or any(s % n for s in sizes):
    return None
  return name


def _block(block: Optional[int], length: int, n: int, name: str) -> int:
  if block is None:
    block = DEFAULT_BLOCK
  if not isinstance(block, int) or block <= 0:
    raise ValueError(f"{name} must be a positive int, got {block!r}")
  return min(block, -(-length // n))


def _pad_axis(x, axis: int, size: int, broadcast: bool = False):
  """Zero-pads ``axis`` to ``size``; with ``broadcast``, size 1 stays 1."""
  if x is None or x.shape[axis] == size or (broadcast and x.shape[axis] == 1):
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def ring_attention(query: Array, key: Array, value: Array,
                   bias: Optional[Array] = None, mask: Optional[Array] = None,
                   *, mesh=None, seq_axis: str = "seq",
                   data_axis: Optional[str] = "data",
                   model_axis: Optional[str] = "model",
                   scale: Optional[float] = None,
                   block_q: Optional[int] = None,
                   block_k: Optional[int] = None,
                   is_causal: bool = False,
                   query_seq_lengths: Optional[Array] = None,
                   key_value_seq_lengths: Optional[Array] = None,
                   local_window_size=None, segment_ids=None,
                   logits_soft_cap: Optional[float] = None, precision=None,
                   return_residual: bool = False):
  """Exact softmax attention with the sequence sharded over ``seq_axis``.

  Same result (forward and gradients, to float tolerance) as
  :func:`attn.dot_product_attention`, computed with key/value blocks passed
  around the ring of devices on the ``seq_axis`` of ``mesh`` (see the module
  docstring). Works inside or outside ``jax.jit``; inputs may have any
  sharding (they are resharded to the ring layout).

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]``, ``N % K == 0``.
    value: ``[B, S, K, Dv]``.
    bias: added to the scores, broadcastable to ``[B, N, T, S]``;
      differentiable. Each device keeps its query rows and all ``S`` columns.
    mask: boolean, True = may attend, broadcastable to ``[B, N, T, S]``.
    mesh: a ``jax.sharding.Mesh``; ``None`` uses the mesh set with
      ``jax.set_mesh`` (``attn.parallel.make_mesh`` builds one).
    seq_axis: mesh axis the sequence is sharded over (the ring).
    data_axis / model_axis: mesh axes for batch / heads, used when present
      and they divide ``B`` / both head counts; otherwise replicated.
    scale: Python float, defaults to ``1/sqrt(H)``.
    block_q / block_k: chunk sizes inside each ring step (default 256,
      clipped to the per-device length).
    is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size,
    segment_ids: as in :func:`attn.dot_product_attention`.
    logits_soft_cap: ``c``: the scaled logits become ``c·tanh(logits / c)``
      before bias and mask (forward and backward).
    precision: ``jax.lax.Precision`` for every einsum.
    return_residual: also return ``lse[B, T, N]`` (float32, no gradient),
      as :func:`attn.kernels.chunked.chunked_attention` defines it; then the
      result is ``(out, lse)``.

  Returns:
    ``[B, T, N, Dv]`` in the input dtype (``[T, N, Dv]`` for 3-D inputs).
    Queries with nothing to attend to give zeros and zero gradients.

  Lengths need not divide the ring size: ``T`` and ``S`` are padded to a
  multiple of ``n · block`` and padded keys are masked.

  Raises:
    ValueError: no mesh with ``seq_axis``; bad shapes; non-static scale.
  """
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids,
      logits_soft_cap=logits_soft_cap, precision=precision)
  mesh = _resolve_mesh(mesh, seq_axis)
  try:
    scale = float(inputs.scale)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError("ring attention needs a static Python float scale, got "
                     f"{inputs.scale!r}") from None
  B, T, S, N, K, _, _ = inputs.shape
  n = mesh.shape[seq_axis]
  bq = _block(block_q, T, n, "block_q")
  bk = _block(block_k, S, n, "block_k")
  t_pad = math.ceil(T / (n * bq)) * n * bq
  s_pad = math.ceil(S / (n * bk)) * n * bk
  kv_lengths = inputs.kv_lengths
  if s_pad != S:  # mask the ring's padding keys
    kv_lengths = (jnp.full((B,), S, jnp.int32) if kv_lengths is None
                  else jnp.minimum(kv_lengths, S))
  arrays = {
      "q": _pad_axis(inputs.query, 1, t_pad),
      "k": _pad_axis(inputs.key, 1, s_pad),
      "v": _pad_axis(inputs.value, 1, s_pad),
      "bias": _pad_axis(_pad_axis(inputs.bias, 2, t_pad, True), 3, s_pad,
                        True),
      "mask": _pad_axis(_pad_axis(inputs.mask, 2, t_pad, True), 3, s_pad,
                        True),
      "q_lengths": inputs.q_lengths,
      "kv_lengths": kv_lengths,
      "q_segment_ids": _pad_axis(inputs.q_segment_ids, 1, t_pad),
      "kv_segment_ids": _pad_axis(inputs.kv_segment_ids, 1, s_pad),
  }
  arrays = {name: x for name, x in arrays.items() if x is not None}
  batch_axis = _mesh_axis(mesh, data_axis, B)
  head_axis = _mesh_axis(mesh, model_axis, N, K)
  cfg = _RingConfig(
      mesh=mesh, seq_axis=seq_axis, batch_axis=batch_axis,
      head_axis=head_axis, scale=scale, is_causal=inputs.is_causal,
      window=inputs.window, kv_valid=S, kv_padded=s_pad != S, block_q=bq,
      block_k=bk, bias_psum_axes=_bias_psum_axes(
          None if inputs.bias is None else inputs.bias.shape, batch_axis,
          head_axis, seq_axis),
      soft_cap=None if inputs.logits_soft_cap is None
      else float(inputs.logits_soft_cap),
      precision=inputs.precision)
  out, lse = _ring(cfg, arrays)
  if t_pad != T:
    out = out[:, :T]
  out = canonical.restore_batch(out, inputs)
  if not return_residual:
    return out
  if t_pad != T:
    if _explicit(mesh):  # an unevenly padded sharded axis cannot be sliced
      lse = jax.sharding.reshard(lse, NamedSharding(mesh, P()))
    lse = lse[:, :T]
  return out, canonical.restore_batch(
      masks.residual_lse(lse, jnp.float32), inputs)


def _is_mesh(x) -> bool:
  return x is None or isinstance(x, jax.sharding.Mesh)


_AXIS_NAME = registry.OptionRule(
    "a mesh axis name (str) or None", lambda x: x is None or isinstance(x, str))


register_attention(
    "ring", exact=True, causal=True, padding=True, cross=True,
    # One-token decoding appends to a KV cache on one device; ring attention
    # shards the sequence, so it has no decode path.
    decode=False,
    option_rules={
        "mesh": registry.OptionRule("a jax.sharding.Mesh or None", _is_mesh),
        "seq_axis": registry.OptionRule("a mesh axis name (str)",
                                        lambda x: isinstance(x, str)),
        "data_axis": _AXIS_NAME, "model_axis": _AXIS_NAME},
    complexity="time O(T·S/n), memory O((T+S)/n) per device "
    "(n = size of the mesh 'seq' axis)",
    description="exact attention with the sequence sharded over the mesh "
    "'seq' axis; key/value blocks circulate with ppermute, online softmax, "
    "recomputing custom VJP (Liu et al. 2023)")(ring_attention)
