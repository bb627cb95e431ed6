"""Measuring one benchmark cell: FLOPs, the reference, time and memory.

A *cell* is one (variant, dtype, mode, causal, B, N, K, H, T) point. On the
inputs ``q[B, T, N, H]``, ``k, v[B, T, K, H]`` :func:`measure_cell` records

* compile time (``lower`` + ``compile``), then the median/min/max wall time
  of ``repeats`` calls after ``warmup`` calls, each ``block_until_ready``;
* XLA's ``memory_analysis()``: temporary, argument and output bytes
  (``None`` where the backend does not report them), and XLA's
  ``cost_analysis()`` FLOPs (``xla_flops``; XLA counts a loop body once, so
  scan-based kernels are under-counted there);
* the FLOP/s of a square matmul of comparable work (the roofline), timed
  interleaved with the cell's own calls so both see the same machine load;
* max abs and relative error against a float32 exact reference computed
  blockwise over queries (:func:`reference_attention`, so it fits in memory
  at any T).

A failing kernel never raises here: the cell's ``status`` says what happened.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import einops
import jax
import jax.numpy as jnp
import numpy as np

from attn.kernels import chunked
from experiments.bench.variants import Variant

MODES = ("fwd", "fwd_bwd")
# FlashAttention's convention: the backward pass does 2.5x the forward's
# matmul FLOPs (5 matmuls against 2), so forward + backward is 3.5x.
FWD_BWD_FLOP_FACTOR = 3.5
_GIB = 2 ** 30


# --------------------------------------------------------------------------
# FLOP counts


def causal_pairs(q_len: int, kv_len: int) -> int:
  """Number of (t, s) pairs with ``s <= t`` for ``t < q_len, s < kv_len``."""
  full_rows = min(q_len, kv_len)          # rows t < kv_len see t + 1 keys
  return full_rows * (full_rows + 1) // 2 + (q_len - full_rows) * kv_len


def attention_flops(*, batch: int, heads: int, q_len: int, kv_len: int,
                    head_dim: int, value_dim: int, causal: bool,
                    mode: str) -> float:
  """Analytic FLOPs of exact attention (matmuls only, 2 per multiply-add).

  Forward: ``2·B·N·P·H`` for ``q·kᵀ`` plus ``2·B·N·P·Dv`` for ``p·v``, where
  ``P`` is the number of unmasked (query, key) pairs: ``T·S``, or exactly
  the lower triangle when causal. ``fwd_bwd`` is 3.5x the forward
  (FlashAttention's convention: the backward is 2.5x).
  """
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; modes: {MODES}")
  pairs = causal_pairs(q_len, kv_len) if causal else q_len * kv_len
  forward = 2 * batch * heads * pairs * (head_dim + value_dim)
  return float(forward) if mode == "fwd" else FWD_BWD_FLOP_FACTOR * forward


def matmul_size(flops: float, max_n: int) -> int:
  """Side ``n`` (a multiple of 64 in ``[64, max_n]``) with ``2n³ ≈ flops``."""
  n = int(round((flops / 2.0) ** (1.0 / 3.0) / 64.0)) * 64
  return max(64, min(n, max(64, max_n)))



# --------------------------------------------------------------------------
# Reference


def _reference_one_head(q_TH, k_SH, v_SD, q_offset, *, causal: bool):
  """float32 softmax attention of one head for a block of queries."""
  scores_TS = jnp.einsum("th,sh->ts", q_TH, k_SH,
                         precision=jax.lax.Precision.HIGHEST)
  scores_TS = scores_TS / jnp.sqrt(jnp.float32(q_TH.shape[-1]))
  if causal:
    t = q_offset + jnp.arange(q_TH.shape[0])
    s = jnp.arange(k_SH.shape[0])
    scores_TS = jnp.where(s[None, :] <= t[:, None], scores_TS, -jnp.inf)
  weights_TS = jax.nn.softmax(scores_TS, axis=-1)
  return jnp.einsum("ts,sd->td", weights_TS, v_SD,
                    precision=jax.lax.Precision.HIGHEST)


def reference_attention(q, k, v, *, causal: bool, block: int = 512):
  """Exact float32 attention ``[B,T,N,H] -> [B,T,N,Dv]``, O(T) memory.

  Independent of :mod:`attn`: one head written with einsum, vmapped over
  heads and batch, and mapped over blocks of ``gcd(T, block)`` queries under
  ``jax.checkpoint`` so neither the forward nor its gradient holds more than
  one ``[N, block, S]`` score block. Key/value heads are shared by
  ``N // K`` consecutive query heads (GQA).
  """
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  _, T, N, _ = q.shape
  group = N // k.shape[2]
  k = jnp.repeat(k, group, axis=2)
  v = jnp.repeat(v, group, axis=2)
  block = math.gcd(T, block)
  one = functools.partial(_reference_one_head, causal=causal)
  over_heads = jax.vmap(one, in_axes=(1, 1, 1, None), out_axes=1)
  over_batch = jax.vmap(over_heads, in_axes=(0, 0, 0, None))

  @jax.checkpoint
  def one_block(args):
    q_blk, offset = args                       # [B, block, N, H]
    return over_batch(q_blk, k, v, offset)

  q_blocks = einops.rearrange(q, "b (nb blk) n h -> nb b blk n h", blk=block)
  offsets = jnp.arange(T // block) * block
  out = jax.lax.map(one_block, (q_blocks, offsets))
  return einops.rearrange(out, "nb b blk n d -> b (nb blk) n d")


# --------------------------------------------------------------------------
# Measuring one cell


def make_step(fn: Callable[..., Any], *, mode: str, causal: bool):
  """The function a cell times.

  ``fwd``: ``step(q, k, v, rng, params) -> out``. ``fwd_bwd``:
  ``step(q, k, v, rng, params, cotangent) -> (dq, dk, dv)``, the gradient
  of ``sum(out · cotangent)`` (parameters are held fixed).
  """
  def forward(q, k, v, rng, params):
    return fn(q, k, v, is_causal=causal, rng=rng, params=params)

  if mode == "fwd":
    return forward

  def fwd_bwd(q, k, v, rng, params, cotangent):
    def loss(q, k, v):
      out = forward(q, k, v, rng, params)
      return jnp.sum(out.astype(jnp.float32) * cotangent)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return fwd_bwd


def memory_stats(compiled) -> Dict[str, Optional[int]]:
  """``temp/argument/output_bytes`` from XLA (``None`` if not reported)."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError, AttributeError):
    stats = None
  names = {"temp_bytes": "temp_size_in_bytes",
           "argument_bytes": "argument_size_in_bytes",
           "output_bytes": "output_size_in_bytes"}
  return {k: (None if stats is None else int(getattr(stats, v)))
          for k, v in names.items()}


def xla_flops(compiled) -> Optional[float]:
  """FLOPs from XLA's ``cost_analysis()``, ``None`` if unavailable."""
  try:
    cost = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError, AttributeError):
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or cost.get("flops") is None:
    return None
  return float(cost["flops"])


def _timed_call(compiled, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - start


def time_calls(compiled, args, *, warmup: int, repeats: int,
               paired=None) -> Tuple[Any, List[float], List[float]]:
  """Runs ``warmup`` untimed then ``repeats`` timed calls.

  ``paired=(compiled2, args2)``, if given, is warmed up too and one call of
  it is timed right after each timed call, so both see the same load.

  Returns the first call's output (for the error check), the wall times in
  seconds, each measured to ``jax.block_until_ready``, and the paired times.
  """
  first = jax.block_until_ready(compiled(*args))
  for _ in range(warmup - 1):
    jax.block_until_ready(compiled(*args))
  for _ in range(warmup if paired else 0):
    jax.block_until_ready(paired[0](*paired[1]))
  times, paired_times = [], []
  for _ in range(repeats):
    times.append(_timed_call(compiled, args))
    if paired:
      paired_times.append(_timed_call(*paired))
  return first, times, paired_times


def compare(output, reference) -> Tuple[float, float]:
  """``(max abs error, max relative Frobenius error)`` over matching leaves."""
  max_abs, rel = 0.0, 0.0
  for a, b in zip(jax.tree.leaves(output), jax.tree.leaves(reference)):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(b, np.float64)
    diff = a - b
    max_abs = max(max_abs, float(np.max(np.abs(diff))))
    rel = max(rel, float(np.linalg.norm(diff) / max(np.linalg.norm(b),
                                                    1e-30)))
  return max_abs, rel


def classify_error(e: BaseException) -> str:
  """Status string for a failed cell: ``oom``, ``unsupported`` or ``error``."""
  text = str(e)
  first = (text.strip().splitlines() or [""])[0][:240]
  if (isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text
      or "out of memory" in text.lower()
      or "can't allocate memory" in text):   # PyTorch's CPU allocator
    return f"oom: {first}"
  if isinstance(e, (ValueError, NotImplementedError)):
    return f"unsupported: {first}"
  return f"error: {type(e).__name__}: {first}"


def make_params(variant: Variant, q_shape, k_shape, seed: int):
  """Parameters a module would own for ``variant`` (float32, fixed key)."""
  if variant.param_shapes is None:
    return {}
  shapes = variant.param_shapes(q_shape, k_shape)
  key = jax.random.key(seed)
  return {name: init(jax.random.fold_in(key, i), shape, jnp.float32)
          for i, (name, (shape, init)) in enumerate(sorted(shapes.items()))}


@dataclasses.dataclass(frozen=True)
class Roofline:
  """A compiled ``[n, n] @ [n, n]`` matmul (``flops = 2n³``) and its args."""
  n: int
  flops: float
  compiled: Any
  args: Tuple[Any, Any]


def make_roofline(n: int, dtype) -> Roofline:
  """Compiles the square matmul for inputs of ``dtype`` (float32 accumulation).

  The matmul runs in :func:`attn.kernels.chunked.block_dtype` of ``dtype``:
  on a CPU without bf16/fp16 instructions a half-precision matmul is
  float32 work plus conversions, so the machine's rate for such inputs is
  its float32 rate (the kernel's blocks run in float32 there too).
  """
  dtype = chunked.block_dtype(dtype)
  a = jax.random.normal(jax.random.key(1), (n, n), dtype)
  b = jax.random.normal(jax.random.key(2), (n, n), dtype)
  matmul = jax.jit(functools.partial(jnp.matmul,
                                     preferred_element_type=jnp.float32))
  return Roofline(n=n, flops=2.0 * n ** 3,
                  compiled=matmul.lower(a, b).compile(), args=(a, b))


def measure_cell(variant: Variant, inputs: Dict[str, Any], *, mode: str,
                 causal: bool, warmup: int, repeats: int,
                 max_memory_bytes: float, reference, seed: int,
                 roofline: Optional[Roofline] = None) -> Dict[str, Any]:
  """Compiles, gates on memory, times and checks one cell.

  ``roofline``'s matmul is timed interleaved with the cell's calls and gives
  ``roofline_flops_per_s``.

  Never raises for a failing kernel: the returned dict carries ``status``
  (``ok``, ``unsupported: ...``, ``not installed: ...``, ``oom: ...``,
  ``skipped: ...`` or ``error: ...``) and whatever was measured before the failure.
  """
  row: Dict[str, Any] = {"status": "ok"}
  if causal and not variant.supports_causal:
    row["status"] = f"unsupported: {variant.name} does not support causal"
    return row
  why_missing = variant.missing() if variant.missing else None
  if why_missing:
    row["status"] = f"not installed: {why_missing}"
    return row
  paired = None if roofline is None else (roofline.compiled, roofline.args)
  if variant.host is not None:
    return _measure_host(variant, inputs, row, mode=mode, causal=causal,
                         warmup=warmup, repeats=repeats, reference=reference,
                         paired=paired, roofline=roofline)
  q, k, v = inputs["q"], inputs["k"], inputs["v"]
  try:
    params = make_params(variant, q.shape, k.shape, seed)
    args = (q, k, v, inputs["rng"], params)
    if mode == "fwd_bwd":
      args += (inputs["cotangent"],)
    step = make_step(variant.fn, mode=mode, causal=causal)
    start = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    row["compile_s"] = time.perf_counter() - start
    row.update(memory_stats(compiled))
    row["xla_flops"] = xla_flops(compiled)
    need = (None if row["temp_bytes"] is None else
            row["temp_bytes"] + row["argument_bytes"] + row["output_bytes"])
    if need is None:
      need = dense_estimate_bytes(q.shape, k.shape, mode)
    if need > max_memory_bytes:
      row["status"] = (f"skipped: too large (needs {need / _GIB:.1f} GiB > "
                       f"max_memory_gib={max_memory_bytes / _GIB:g})")
      return row
    output, times, matmul_times = time_calls(
        compiled, args, warmup=warmup, repeats=repeats, paired=paired)
    if reference is not None and not variant.floor:
      row["max_abs_err"], row["rel_err"] = compare(output, reference)
    del output
  except Exception as e:  # pylint: disable=broad-except
    # Any failure of one kernel is data about that kernel, not a reason to
    # stop the sweep.
    row["status"] = classify_error(e)
    return row
  _record_times(row, times, matmul_times, roofline)
  return row


def _record_times(row, times, matmul_times, roofline) -> None:
  row["time_median_s"] = float(np.median(times))
  row["time_min_s"] = float(np.min(times))
  row["time_max_s"] = float(np.max(times))
  if roofline is not None:
    row["roofline_flops_per_s"] = roofline.flops / float(
        np.median(matmul_times))


def _measure_host(variant: Variant, inputs, row, *, mode, causal, warmup,
                  repeats, reference, paired, roofline) -> Dict[str, Any]:
  """:func:`measure_cell` for a kernel outside JAX (``variant.host``): no
  compile time, no XLA memory figures and no memory gate (the framework
  allocates for itself; running out of memory is recorded as ``oom``)."""
  try:
    call, to_numpy = variant.host(inputs, mode=mode, causal=causal)
    output, times, matmul_times = time_calls(
        call, (), warmup=warmup, repeats=repeats, paired=paired)
    if reference is not None:
      row["max_abs_err"], row["rel_err"] = compare(to_numpy(output),
                                                   reference)
    del output
  except Exception as e:  # pylint: disable=broad-except
    row["status"] = classify_error(e)
    return row
  _record_times(row, times, matmul_times, roofline)
  return row


def dense_estimate_bytes(q_shape, k_shape, mode: str) -> float:
  """Fallback footprint when XLA reports none: float32 scores and weights
  (plus their gradients for ``fwd_bwd``) of every head, ``[B, N, T, S]``."""
  B, T, N, _ = q_shape
  S = k_shape[1]
  return 4.0 * B * N * T * S * (2 if mode == "fwd" else 4)

