"""``implementation="pallas"``: jax's own Pallas attention kernels.

The attention kernels shipped inside jax, wrapped with our contract (layout
``[B, T, N, H]``, GQA, causal, segment ids, lengths, the fully-masked-row
rule: a query row with no key to attend to returns zeros and zero gradients):

* NVIDIA GPU: ``jax.experimental.pallas.ops.gpu.attention.mha`` (Triton).
  Its layout is ours (``[B, T, N, H]``); it takes ``causal`` (top-left,
  ``s <= t``, as ours) and ONE ``segment_ids[B, L]`` array shared by queries
  and keys. We repeat key/value heads for GQA, pad lengths to a block multiple
  and express padding and ``key_value_seq_lengths`` as segment ids. It has no
  bias, mask, window, ``Dv != H`` or separate query/key segment ids.
* TPU: splash attention (``jax.experimental.pallas.ops.tpu.
  splash_attention.make_splash_mha``), layout ``[B, N, T, H]`` per example
  (we transpose and vmap over the batch). GQA natively; causal and
  ``local_window_size`` become its static block-sparse mask (blocks with
  nothing to attend are skipped); separate query/key segment ids, so lengths
  and the padding to a multiple of 128 become segment ids;
  ``logits_soft_cap`` is its ``attn_logits_soft_cap``. It takes no bias and
  no traced mask: with a ``bias`` or dense ``mask`` we call
  ``jax.experimental.pallas.ops.tpu.flash_attention.flash_attention``
  instead, whose additive ``ab[B, N, T, S]`` carries both (it adds ``ab``
  before multiplying by its ``sm_scale``, so we pass ``bias / scale``), with
  key/value heads repeated; it has no window, no soft cap and no
  ``Dv != H`` (splash has all three).

The kernels give a fully-masked row the mean of the values (finite mask
value), or, where splash skips every key block of a row, whatever its empty
sum gives; we zero such rows afterwards with :func:`valid_rows`, so their
gradients are zero too.

Interpret mode: ``with attn.kernels.pallas.interpret("gpu"):`` (or ``"tpu"``)
runs that kernel through Pallas' interpreter on any backend, CPU included;
the tests do this. Keep the ``jax.jit`` call inside the ``with`` block.
"""

from __future__ import annotations

import contextlib

import einops
import jax
import jax.numpy as jnp
import numpy as np

from attn import masks
from attn.kernels import canonical, chunked
from attn.kernels.canonical import AttentionInputs

Array = jax.Array

# None (use the hardware), "gpu" or "tpu" (run that kernel interpreted).
INTERPRET: str | None = None
# Segment id given to padded / out-of-length positions. User segment ids must
# not use it.
SENTINEL = int(np.iinfo(np.int32).min)
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@contextlib.contextmanager
def interpret(target: str = "gpu"):
  """Runs ``implementation="pallas"`` through Pallas' interpreter as ``target``
  (``"gpu"`` or ``"tpu"``) inside the ``with`` block."""
  global INTERPRET
  if target not in ("gpu", "tpu"):
    raise ValueError(f"interpret target must be 'gpu' or 'tpu', got {target!r}")
  old, INTERPRET = INTERPRET, target
  try:
    if target == "tpu":
      # Read when jit lowers, so it must cover the call, not just the trace.
      from jax.experimental.pallas import tpu as pltpu
      with pltpu.force_tpu_interpret_mode():
        yield
    else:
      yield
  finally:
    INTERPRET = old


def target_platform() -> str:
  """``"gpu"``/``"tpu"`` this module will run on, or the platform name."""
  return INTERPRET or jax.devices()[0].platform


def valid_rows(inputs: AttentionInputs) -> Array | None:
  """``[B, N|1, T]`` bool: the query row has at least one key to attend to
  (``None`` when every row does). The ``[T, S]`` booleans are built from
  iotas inside a reduction, which XLA fuses, so nothing ``T x S`` is stored
  unless the user passed a dense mask."""
  if not (inputs.has_structure_mask or inputs.mask is not None):
    return None
  B, T, S, *_ = inputs.shape

  def one(qlen, kvlen, qseg, kvseg):
    m = masks.structure_mask(
        jnp.arange(T), jnp.arange(S), is_causal=inputs.is_causal,
        window=inputs.window, q_length=qlen, kv_length=kvlen,
        q_segment=qseg, kv_segment=kvseg)
    return jnp.ones((T, S), bool) if m is None else m

  smask = jax.vmap(one, axis_size=B)(inputs.q_lengths, inputs.kv_lengths,
                        inputs.q_segment_ids, inputs.kv_segment_ids)
  full = smask[:, None]                                   # [B, 1, T, S]
  if inputs.mask is not None:
    full = full & inputs.mask
  return jnp.any(full, axis=-1)


def zero_invalid_rows(out_BTND: Array, inputs: AttentionInputs) -> Array:
  """Applies the fully-masked-row rule to a kernel's output."""
  rows = valid_rows(inputs)
  if rows is None:
    return out_BTND
  rows = einops.rearrange(rows, "b n t -> b t n")[..., None]
  return jnp.where(rows, out_BTND, jnp.zeros((), out_BTND.dtype))


def _largest_block(n: int, cap: int, floor: int) -> int | None:
  b = cap
  while b >= floor:
    if n % b == 0:
      return b
    b //= 2
  return None


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _repeat_kv(x_BSKH: Array, groups: int) -> Array:
  return x_BSKH if groups == 1 else jnp.repeat(x_BSKH, groups, axis=2)


def _static_scale(inputs: AttentionInputs, query: Array):
  """The kernels take a static ``sm_scale``; a traced scale is folded into q."""
  if isinstance(inputs.scale, (int, float)):
    return query, float(inputs.scale)
  return (query * inputs.scale).astype(query.dtype), 1.0


def _concrete(x) -> np.ndarray | None:
  """``x`` as a NumPy array, or ``None`` when it is traced (under jit)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None


def _lengths_fit_one_segment_array(inputs: AttentionInputs) -> bool:
  """``True`` when ``query_seq_lengths <= key_value_seq_lengths`` is known
  (the GPU kernel's one segment array can then express both); ``False`` when
  the lengths are traced. Raises ``ValueError`` when concretely violated."""
  q, kv = _concrete(inputs.q_lengths), _concrete(inputs.kv_lengths)
  if q is None or kv is None:
    return False
  if np.any(q > kv):
    raise ValueError(
        "implementation='pallas' on GPU needs query_seq_lengths <= "
        f"key_value_seq_lengths (got {q.tolist()} and {kv.tolist()}); use "
        "implementation='chunked' or 'xla'")
  return True


# ----------------------------------------------------------------------------
# NVIDIA GPU: the Triton kernel.

def gpu_unsupported(inputs: AttentionInputs) -> list[str]:
  """What the Pallas GPU kernel cannot express for these inputs."""
  _B, T, S, _N, _K, H, Dv = inputs.shape
  out = []
  if Dv != H:
    out.append(f"value head_dim {Dv} != query head_dim {H}")
  if inputs.bias is not None:
    out.append("bias")
  if inputs.mask is not None:
    out.append("a dense mask")
  if inputs.window is not None:
    out.append("local_window_size")
  if inputs.q_segment_ids is not None and (
      inputs.q_segment_ids is not inputs.kv_segment_ids):
    out.append("separate query/key segment_ids (pass one [B, T] array)")
  if inputs.kv_lengths is not None and inputs.q_lengths is None:
    out.append("key_value_seq_lengths without query_seq_lengths (the kernel "
               "shares one segment array between queries and keys)")
  if T != S and (inputs.q_segment_ids is not None
                 or inputs.kv_lengths is not None):
    out.append(f"segment_ids or key lengths with T={T} != S={S}")
  if inputs.is_causal and T > S:
    # Its causal loop runs to key block ceil((i + 1) * block_q / block_k)
    # for query block i, unclipped: past the last key when T > S.
    out.append(f"is_causal with more queries than keys (T={T} > S={S})")
  return out


def _gpu_blocks(T: int, S: int, floor: int):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  bq, bk = _largest_block(T, 128, floor), _largest_block(S, 128, floor)
  for b in (32, 16, 8, 4, 2, 1):
    if b < floor or T % b:
      continue
    nb = T // b
    if S % nb == 0 and S // nb >= floor and S // nb <= 128:
      bkv = S // nb
      if bq and bk:
        return gpu_attention.BlockSizes(
            block_q=bq, block_k=bk, block_q_dkv=b, block_kv_dkv=bkv,
            block_q_dq=b, block_kv_dq=bkv)
  return None


def gpu_attention_call(inputs: AttentionInputs, interpret: bool) -> Array:
  """Runs the Triton kernel; inputs already checked by gpu_unsupported.

  Traced lengths with ``query_seq_lengths > key_value_seq_lengths`` in some
  example cannot be expressed (one segment array serves queries and keys:
  a query past its key length would be given the padding's segment); such
  a call runs the chunked kernel instead, chosen at run time by a
  ``lax.cond`` on the lengths."""
  if (inputs.kv_lengths is not None
      and not _lengths_fit_one_segment_array(inputs)):
    return jax.lax.cond(
        jnp.any(inputs.q_lengths > inputs.kv_lengths),
        lambda: chunked.chunked_attention(inputs).astype(inputs.value.dtype),
        lambda: _gpu_kernel(inputs, interpret))
  return _gpu_kernel(inputs, interpret)


def _gpu_kernel(inputs: AttentionInputs, interpret: bool) -> Array:
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  B, T, S, N, K, _H, _Dv = inputs.shape
  floor = 2 if interpret else 16
  q, scale = _static_scale(inputs, inputs.query)
  k = _repeat_kv(inputs.key, N // K)
  v = _repeat_kv(inputs.value, N // K)
  seg = None
  if T == S:
    step = 128 if T >= 128 else floor * 8
    P = T if T % step == 0 else _round_up(T, step)
    need_seg = (P != T or inputs.q_segment_ids is not None
                or inputs.kv_lengths is not None)
    if need_seg:
      base = (jnp.zeros((B, T), jnp.int32) if inputs.q_segment_ids is None
              else inputs.q_segment_ids.astype(jnp.int32))
      base = jnp.pad(base, ((0, 0), (0, P - T)))
      limit = (jnp.full((B,), T, jnp.int32) if inputs.kv_lengths is None
               else jnp.minimum(inputs.kv_lengths, T))
      seg = jnp.where(jnp.arange(P)[None] < limit[:, None], base, SENTINEL)
    pad = ((0, 0), (0, P - T), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    Tp = Sp = P
  else:
    Tp, Sp = T, S
  blocks = _gpu_blocks(Tp, Sp, floor)
  if blocks is None:
    raise ValueError(
        f"implementation='pallas' on GPU cannot tile T={T}, S={S} (with "
        "T != S both must be multiples of 16 with equally many backward "
        "blocks); use implementation='chunked'")
  out = gpu_attention.mha(q, k, v, seg, sm_scale=scale,
                          causal=inputs.is_causal, block_sizes=blocks,
                          interpret=interpret)
  return out[:, :T].astype(inputs.value.dtype)


# ----------------------------------------------------------------------------
# TPU: splash attention, or flash_attention for an additive bias / dense mask.

def _tpu_uses_flash(inputs: AttentionInputs) -> bool:
  """Only flash_attention takes a traced ``[B, N, T, S]`` bias (its ``ab``);
  splash attention serves everything else."""
  return inputs.bias is not None or inputs.mask is not None


def tpu_unsupported(inputs: AttentionInputs) -> list[str]:
  """What the Pallas TPU kernels cannot express for these inputs."""
  _B, _T, _S, _N, _K, H, Dv = inputs.shape
  out = []
  if _tpu_uses_flash(inputs):
    # flash_attention: the only one taking a bias / dense mask.
    if Dv != H:
      out.append(f"value head_dim {Dv} != query head_dim {H} together with "
                 "a bias or dense mask")
    if inputs.window is not None:
      out.append("local_window_size together with a bias or dense mask")
    if inputs.logits_soft_cap is not None:
      out.append("logits_soft_cap together with a bias or dense mask")
    if H > 128 and H % 128:
      out.append(f"head_dim {H} with a bias or dense mask (> 128 must be a "
                 "multiple of 128)")
  return out


def _tpu_segment_ids(inputs: AttentionInputs, Tp: int, Sp: int):
  """``(q [B, Tp], kv [B, Sp])`` int32 segment ids expressing the user's
  segment ids, key lengths and the padding to ``Tp, Sp`` (``None`` when none
  of them is needed). Padding and keys past their length get ``SENTINEL``,
  which no query of the user's carries."""
  B, T, S, *_ = inputs.shape
  if (Tp == T and Sp == S and inputs.q_segment_ids is None
      and inputs.kv_lengths is None):
    return None
  qs = (jnp.zeros((B, T), jnp.int32) if inputs.q_segment_ids is None
        else inputs.q_segment_ids.astype(jnp.int32))
  ks = (jnp.zeros((B, S), jnp.int32) if inputs.kv_segment_ids is None
        else inputs.kv_segment_ids.astype(jnp.int32))
  if inputs.kv_lengths is not None:
    ks = jnp.where(jnp.arange(S)[None] < inputs.kv_lengths[:, None], ks,
                   SENTINEL)
  qs = jnp.pad(qs, ((0, 0), (0, Tp - T)), constant_values=SENTINEL)
  ks = jnp.pad(ks, ((0, 0), (0, Sp - S)), constant_values=SENTINEL)
  return qs, ks


def _pad_rows(x_BTNH: Array, P: int) -> Array:
  return jnp.pad(x_BTNH, ((0, 0), (0, P - x_BTNH.shape[1]), (0, 0), (0, 0)))


def _heads_major(q, k, v, Tp: int, Sp: int):
  """``q, k, v`` padded to ``Tp`` / ``Sp`` rows, in the TPU kernels' layout
  ``[B, heads, length, H]``."""
  return tuple(einops.rearrange(_pad_rows(x, P), "b t n h -> b n t h")
               for x, P in ((q, Tp), (k, Sp), (v, Sp)))


def _from_heads_major(out_BNTD: Array, inputs: AttentionInputs) -> Array:
  """A TPU kernel's output back to ``[B, T, N, Dv]``, unpadded, in the
  value dtype."""
  out = einops.rearrange(out_BNTD, "b n t h -> b t n h")
  return out[:, :inputs.shape[1]].astype(inputs.value.dtype)


def _splash_block(n: int) -> int:
  """The largest of 512, 256, 128 dividing ``n`` (a multiple of 128)."""
  return next(b for b in (512, 256, 128) if n % b == 0)


def _splash_mask(inputs: AttentionInputs, Tp: int, Sp: int):
  """The static (block-sparse) part of the mask: causal and the window."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  if inputs.window is not None:
    left, right = inputs.window
    return splash.LocalMask((Tp, Sp), (left, 0 if inputs.is_causal else right),
                            offset=0)
  if inputs.is_causal:
    return splash.CausalMask((Tp, Sp))
  return splash.FullMask((Tp, Sp))


def splash_attention_call(inputs: AttentionInputs, interpret: bool) -> Array:
  """jax's splash attention (``make_splash_mha``): GQA natively, causal and
  the window as its block-sparse mask, segment ids, lengths and padding as
  segment ids, ``logits_soft_cap`` as its ``attn_logits_soft_cap``."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  _B, T, S, N, _K, _H, _Dv = inputs.shape
  Tp, Sp = _round_up(T, 128), _round_up(S, 128)
  # Splash has no scale: the scores are (scale·q)·k, soft-capped, masked.
  q = (inputs.query * inputs.scale).astype(inputs.query.dtype)
  q, k, v = _heads_major(q, inputs.key, inputs.value, Tp, Sp)
  bq, bkv = _splash_block(Tp), _splash_block(Sp)
  blocks = splash.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
      block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
      block_kv_dq=bkv)
  kernel = splash.make_splash_mha(
      splash.MultiHeadMask([_splash_mask(inputs, Tp, Sp)] * N),
      block_sizes=blocks, head_shards=1, q_seq_shards=1,
      attn_logits_soft_cap=inputs.logits_soft_cap, interpret=interpret)
  segs = _tpu_segment_ids(inputs, Tp, Sp)

  def one(args):
    q, k, v, *seg = args
    return kernel(q, k, v, segment_ids=splash.SegmentIds(*seg) if seg else None)

  args = (q, k, v) + (() if segs is None else segs)
  # Mosaic lowers a vmapped kernel (a batch grid axis); Pallas' TPU
  # interpreter does not, so interpreted runs map over the batch instead.
  out = jax.lax.map(one, args) if interpret else jax.vmap(one)(args)
  return _from_heads_major(out, inputs)


def flash_attention_call(inputs: AttentionInputs) -> Array:
  """jax's TPU ``flash_attention`` with the bias and dense mask as its
  additive ``ab[B, N, T, S]``; key/value heads repeated for GQA."""
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
  B, T, S, N, K, _H, _Dv = inputs.shape
  # The kernel scales after adding `ab`: s = ((q k^T) + ab) * sm_scale, in
  # float32. With a static scale, ab = bias / scale keeps q unrounded (in
  # bf16, q * scale would round q itself); a traced scale is folded into q.
  q, scale = _static_scale(inputs, inputs.query)
  k = _repeat_kv(inputs.key, N // K)
  v = _repeat_kv(inputs.value, N // K)
  Tp, Sp = _round_up(T, 128), _round_up(S, 128)
  q, k, v = _heads_major(q, k, v, Tp, Sp)
  segs = _tpu_segment_ids(inputs, Tp, Sp)
  segment_ids = None if segs is None else tpu_flash.SegmentIds(*segs)
  ab = jnp.zeros((1, 1, 1, 1), jnp.float32)
  if inputs.bias is not None:
    ab = ab + inputs.bias.astype(jnp.float32) / scale
  if inputs.mask is not None:
    # Finite after the kernel's * sm_scale: a fully masked row stays NaN-free.
    ab = jnp.where(inputs.mask, ab, _MASK_VALUE / max(1.0, scale))
  ab = jnp.broadcast_to(ab, (B, N, T, S))
  ab = jnp.pad(ab, ((0, 0), (0, 0), (0, Tp - T), (0, Sp - S)))
  bt, bs = min(Tp, 128), min(Sp, 128)
  blocks = tpu_flash.BlockSizes(
      block_q=bt, block_k_major=bs, block_k=bs, block_b=1,
      block_q_major_dkv=bt, block_k_major_dkv=bs, block_k_dkv=bs,
      block_q_dkv=bt, block_k_major_dq=bs, block_k_dq=bs, block_q_dq=bt)
  out = tpu_flash.flash_attention(q, k, v, ab=ab, segment_ids=segment_ids,
                                  causal=inputs.is_causal, sm_scale=scale,
                                  block_sizes=blocks)
  return _from_heads_major(out, inputs)


def tpu_attention_call(inputs: AttentionInputs, interpret: bool) -> Array:
  """Runs a TPU kernel; inputs already checked by tpu_unsupported."""
  if _tpu_uses_flash(inputs):
    return flash_attention_call(inputs)  # interpret() sets jax's TPU mode
  return splash_attention_call(inputs, interpret)


# ----------------------------------------------------------------------------
# The entry dot_product_attention dispatches to.

def unsupported(inputs: AttentionInputs, *, dropout_rate: float = 0.0,
                return_weights: bool = False,
                platform: str | None = None) -> str | None:
  """Why ``implementation="pallas"`` cannot serve these inputs (``None`` if it
  can). ``platform`` defaults to :func:`target_platform`."""
  platform = platform or target_platform()
  if platform not in ("gpu", "tpu"):
    return (f"needs an NVIDIA GPU or a TPU; the default device here is "
            f"{platform!r} (attn.kernels.pallas.interpret() runs the kernels "
            "interpreted)")
  what = gpu_unsupported(inputs) if platform == "gpu" else tpu_unsupported(
      inputs)
  if platform == "gpu" and inputs.logits_soft_cap is not None:
    what.append("logits_soft_cap")
  if inputs.precision not in (None, jax.lax.Precision.DEFAULT, "default"):
    what.append(f"precision={inputs.precision!r} (the Pallas kernels pick "
                "their own matmul precision)")
  what += canonical.library_features_missing(
      dropout_rate=dropout_rate, return_weights=return_weights)
  if not what:
    return None
  rest = ("implementation='xla' supports all of them" if dropout_rate > 0
          or return_weights else
          "implementation='chunked' or 'xla' supports them")
  return (f"the Pallas {platform.upper()} kernel does not support: "
          + ", ".join(what) + f"; {rest}")


def _check_no_sentinel(inputs: AttentionInputs):
  """Concrete user segment ids must not use :data:`SENTINEL` (padding's id);
  traced ones cannot be checked."""
  for ids in (inputs.q_segment_ids, inputs.kv_segment_ids):
    ids = None if ids is None else _concrete(ids)
    if ids is not None and np.any(ids == SENTINEL):
      raise ValueError(
          f"segment id {SENTINEL} is reserved by implementation='pallas' for "
          "padding and lengths; renumber the segments (or use "
          "implementation='chunked' or 'xla')")


def pallas_attention(inputs: AttentionInputs, *, dropout_rate: float = 0.0,
                     return_weights: bool = False, return_residual=False,
                     einsums=None, einsum_dot_general=None, **_) -> Array:
  """``implementation="pallas"``: ``[B, T, N, Dv]`` or ``ValueError``."""
  canonical.check_library_call(
      "pallas", unsupported(inputs, dropout_rate=dropout_rate,
                            return_weights=return_weights),
      return_residual=return_residual, einsums=einsums,
      einsum_dot_general=einsum_dot_general)
  _check_no_sentinel(inputs)
  platform = target_platform()
  interp = INTERPRET is not None
  if platform == "gpu":
    out = gpu_attention_call(inputs, interp)
  else:
    out = tpu_attention_call(inputs, interp)
  return zero_invalid_rows(out, inputs)

