r"""Kernel benchmark: time, memory, FLOP/s and accuracy of attention variants.

Usage::

  python -m experiments.benchmark --quick                   # CI smoke test
  python -m experiments.benchmark --variants=xla,chunked \
      --seq_lens=1024,2048,4096 --causal=false,true --repeats=3
  python -m experiments.benchmark --config=configs/benchmark.py:quick \
      --config.head_dims=(32,64)

Every *cell* is one (variant, dtype, mode, causal, B, N, K, H, T) point. For
each cell the harness records, on the same inputs ``q[B, T, N, H]``,
``k, v[B, T, K, H]``:

* compile time (``lower`` + ``compile``), then the median/min/max wall time
  of ``repeats`` calls after ``warmup`` calls, each ``block_until_ready``;
* FLOPs: the analytic count of exact attention (:func:`attention_flops`) for
  exact variants and baselines, XLA's ``cost_analysis()`` otherwise (always
  recorded as ``xla_flops``; XLA counts a loop body once, so scan-based
  kernels are under-counted there), and FLOP/s as a fraction of the
  FLOP/s of a square matmul of comparable work (the roofline), timed
  interleaved with the cell's own calls so both see the same machine load;
* XLA's ``memory_analysis()``: temporary, argument and output bytes
  (``None`` where the backend does not report them);
* max abs and relative error against a float32 exact reference computed
  blockwise over queries (so it fits in memory at any T);
* speed and temporary memory relative to ``jax_nn`` in the same run.

Baselines are ``jax_nn`` (``jax.nn.dot_product_attention``, its default XLA
path), ``jax_nn_cudnn`` (its cuDNN path, GPU only) and ``flax_linen``
(``flax.linen.dot_product_attention``). Cells that are unsupported, run out
of memory, would exceed ``--max_memory_gib`` or fail are recorded with their
status and the sweep continues.

Outputs in ``--output_dir``: ``results.csv``, ``results.json`` (cells, slopes
and run metadata), ``summary.md`` (tables and log-log slopes of time and
temporary memory against T) and ``time_vs_T.png``, ``memory_vs_T.png``,
``roofline_fraction.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

from attn import registry
from configs import benchmark as benchmark_config

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
MODES = ("fwd", "fwd_bwd")
# FlashAttention's convention: the backward pass does 2.5x the forward's
# matmul FLOPs (5 matmuls against 2), so forward + backward is 3.5x.
FWD_BWD_FLOP_FACTOR = 3.5
RATIO_BASELINE = "jax_nn"
_GIB = 2 ** 30
_MIB = 2 ** 20

COLUMNS = (
    "variant", "exact", "dtype", "mode", "causal", "batch", "heads",
    "kv_heads", "head_dim", "seq_len", "status", "compile_s",
    "time_median_s", "time_min_s", "time_max_s", "flops", "flops_source",
    "flops_per_s", "xla_flops", "matmul_n", "roofline_flops_per_s",
    "roofline_frac", "temp_bytes", "argument_bytes", "output_bytes",
    "max_abs_err", "rel_err", "speedup_vs_jax_nn", "temp_ratio_vs_jax_nn",
    "device")
SETTING_KEYS = ("dtype", "mode", "causal", "batch", "heads", "kv_heads",
                "head_dim")


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
# Variants


@dataclasses.dataclass(frozen=True)
class Variant:
  """One benchmarked attention function.

  Attributes:
    name: label in the outputs (the spec string or baseline name).
    fn: ``fn(q[B,T,N,H], k[B,S,K,H], v[B,S,K,Dv], *, is_causal, rng, params)
      -> [B, T, N, Dv]``.
    exact: computes softmax attention exactly (FLOP/s uses the analytic
      count and the error should be float round-off).
    supports_causal: False makes causal cells "unsupported" without running.
    param_shapes: ``None`` or ``f(query_shape, key_shape) -> {name: (shape,
      initializer)}`` for variants whose parameters a module would own.
  """
  name: str
  fn: Callable[..., Any]
  exact: bool
  supports_causal: bool = True
  param_shapes: Optional[Callable[..., Dict[str, Any]]] = None


def _on_gpu() -> bool:
  return jax.devices()[0].platform == "gpu"


def _jax_nn(q, k, v, *, is_causal, rng, params):
  del rng, params
  return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)


def _jax_nn_cudnn(q, k, v, *, is_causal, rng, params):
  del rng, params
  if not _on_gpu():
    raise ValueError("jax.nn's cuDNN attention needs an NVIDIA GPU; the "
                     f"device here is {jax.devices()[0].platform!r}")
  return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                      implementation="cudnn")


def _flax_linen(q, k, v, *, is_causal, rng, params):
  del rng, params
  if k.shape[2] != q.shape[2]:
    raise ValueError("flax.linen.dot_product_attention needs as many key/"
                     f"value heads as query heads, got {k.shape[2]} and "
                     f"{q.shape[2]}")
  mask = None
  if is_causal:
    mask = nn.make_causal_mask(jnp.ones(q.shape[:2]))[:, :, :, :k.shape[1]]
  return nn.dot_product_attention(q, k, v, mask=mask, deterministic=True)


BASELINES = {
    "jax_nn": Variant("jax_nn", _jax_nn, exact=True),
    "jax_nn_cudnn": Variant("jax_nn_cudnn", _jax_nn_cudnn, exact=True),
    "flax_linen": Variant("flax_linen", _flax_linen, exact=True),
}


def split_specs(text: str) -> List[str]:
  """Splits ``"a,b(x=1, y=2),c"`` at top-level commas; strips blanks."""
  specs, depth, current = [], 0, []
  for ch in text:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      specs.append("".join(current).strip())
      current = []
    else:
      current.append(ch)
  specs.append("".join(current).strip())
  return [s for s in specs if s]


def registry_variant(spec: str) -> Variant:
  """A :class:`Variant` for a registry spec string such as ``performer(...)``.

  Kernels that name an ``rng`` argument get a fixed key; parameterised
  kernels get parameters made from their registered initialisers.
  """
  name, _ = registry.parse_spec(spec)
  entry = registry.get_entry(name)
  kernel = registry.get_attention(spec)
  takes_rng = "rng" in inspect.signature(entry.fn).parameters

  def fn(q, k, v, *, is_causal, rng, params):
    kwargs = {"is_causal": is_causal}
    if takes_rng:
      kwargs["rng"] = rng
    if params:
      kwargs["params"] = params
    return kernel(q, k, v, **kwargs)

  return Variant(
      name=spec, fn=fn, exact=entry.exact, supports_causal=entry.causal,
      param_shapes=functools.partial(registry.attention_param_shapes, spec))


def resolve_variants(variants: str, baselines: str) -> List[Variant]:
  """Baselines first, then the requested variants, without duplicates.

  ``variants`` is a comma-separated list of registry specs and baseline
  names, or ``all``. Raises ``ValueError`` naming what exists for unknown
  names.
  """
  specs = split_specs(baselines)
  for spec in split_specs(variants):
    if spec == "all":
      specs += list(BASELINES) + registry.list_attention()
    else:
      specs.append(spec)
  out, seen = [], set()
  for spec in specs:
    if spec in seen:
      continue
    seen.add(spec)
    if spec in BASELINES:
      out.append(BASELINES[spec])
      continue
    try:
      out.append(registry_variant(spec))
    except ValueError as e:
      raise ValueError(f"{e}; baselines: {', '.join(BASELINES)}; or 'all'"
                       ) from None
  return out


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
  B, T, N, H = q.shape
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

  q_blocks = q.reshape(B, T // block, block, N, H).swapaxes(0, 1)
  offsets = jnp.arange(T // block) * block
  out = jax.lax.map(one_block, (q_blocks, offsets))
  return out.swapaxes(0, 1).reshape(B, T, N, v.shape[-1])


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
      or "out of memory" in text.lower()):
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
  """Compiles the square matmul in ``dtype`` (float32 accumulation)."""
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
  (``ok``, ``unsupported: ...``, ``oom: ...``, ``skipped: ...`` or
  ``error: ...``) and whatever was measured before the failure.
  """
  row: Dict[str, Any] = {"status": "ok"}
  if causal and not variant.supports_causal:
    row["status"] = f"unsupported: {variant.name} does not support causal"
    return row
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
    paired = None if roofline is None else (roofline.compiled,
                                            roofline.args)
    output, times, matmul_times = time_calls(
        compiled, args, warmup=warmup, repeats=repeats, paired=paired)
    if reference is not None:
      row["max_abs_err"], row["rel_err"] = compare(output, reference)
    del output
  except Exception as e:  # pylint: disable=broad-except
    # Any failure of one kernel is data about that kernel, not a reason to
    # stop the sweep.
    row["status"] = classify_error(e)
    return row
  row["time_median_s"] = float(np.median(times))
  row["time_min_s"] = float(np.min(times))
  row["time_max_s"] = float(np.max(times))
  if roofline is not None:
    row["roofline_flops_per_s"] = roofline.flops / float(
        np.median(matmul_times))
  return row


def dense_estimate_bytes(q_shape, k_shape, mode: str) -> float:
  """Fallback footprint when XLA reports none: float32 scores and weights
  (plus their gradients for ``fwd_bwd``) of every head, ``[B, N, T, S]``."""
  B, T, N, _ = q_shape
  S = k_shape[1]
  return 4.0 * B * N * T * S * (2 if mode == "fwd" else 4)


# --------------------------------------------------------------------------
# The sweep


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming any bad field of the benchmark config."""
  for d in config.dtypes:
    if d not in DTYPES:
      raise ValueError(f"unknown dtype {d!r}; dtypes: {list(DTYPES)}")
  for m in config.modes:
    if m not in MODES:
      raise ValueError(f"unknown mode {m!r}; modes: {list(MODES)}")
  if not config.seq_lens or any(int(t) < 1 for t in config.seq_lens):
    raise ValueError(f"seq_lens must be positive, got {config.seq_lens}")
  if config.warmup < 1 or config.repeats < 1:
    raise ValueError("warmup and repeats must be >= 1, got "
                     f"{config.warmup} and {config.repeats}")
  kv = config.num_kv_heads or config.num_heads
  if config.num_heads % kv:
    raise ValueError(f"num_heads ({config.num_heads}) must be a multiple of "
                     f"num_kv_heads ({kv})")


def settings(config: ml_collections.ConfigDict) -> List[Dict[str, Any]]:
  """Every (dtype, mode, causal, B, N, K, H) combination, in sweep order."""
  return [dict(dtype=d, mode=m, causal=bool(c), batch=config.batch_size,
               heads=config.num_heads,
               kv_heads=config.num_kv_heads or config.num_heads,
               head_dim=int(h))
          for d in config.dtypes for m in config.modes
          for c in config.causal for h in config.head_dims]


def make_inputs(setting: Dict[str, Any], seq_len: int, seed: int):
  """Standard-normal ``q, k, v`` (and a float32 cotangent), fixed seed."""
  B, N, K, H = (setting[k] for k in ("batch", "heads", "kv_heads",
                                      "head_dim"))
  dtype = DTYPES[setting["dtype"]]
  keys = jax.random.split(jax.random.key(seed), 5)
  inputs = {
      "q": jax.random.normal(keys[0], (B, seq_len, N, H), dtype),
      "k": jax.random.normal(keys[1], (B, seq_len, K, H), dtype),
      "v": jax.random.normal(keys[2], (B, seq_len, K, H), dtype),
      "rng": keys[3],
  }
  if setting["mode"] == "fwd_bwd":
    inputs["cotangent"] = jax.random.normal(keys[4], (B, seq_len, N, H),
                                            jnp.float32)
  return inputs


def reference_for(inputs: Dict[str, Any], *, mode: str, causal: bool):
  """The float32 reference output (``fwd``) or ``(dq, dk, dv)``."""
  fn = lambda q, k, v, **_: reference_attention(q, k, v, causal=causal)
  step = make_step(fn, mode=mode, causal=causal)
  args = (inputs["q"], inputs["k"], inputs["v"], None, None)
  if mode == "fwd_bwd":
    args += (inputs["cotangent"],)
  return jax.block_until_ready(jax.jit(step)(*args))


def run_benchmark(config: ml_collections.ConfigDict,
                  variants: Optional[Sequence[Variant]] = None
                  ) -> List[Dict[str, Any]]:
  """Runs every cell of ``config``; returns one dict per cell (COLUMNS).

  Args:
    config: see ``configs/benchmark.py``.
    variants: overrides ``config.variants``/``config.baselines`` (e.g. to
      benchmark a kernel that is not registered).
  """
  validate_config(config)
  if variants is None:
    variants = resolve_variants(config.variants, config.baselines)
  device = jax.devices()[0].device_kind
  groups = [(s, int(t)) for s in settings(config) for t in config.seq_lens]
  rows = []
  bar = tqdm.tqdm(total=len(groups) * len(variants), unit="cell",
                  disable=not config.progress, desc="benchmark")
  for setting, seq_len in groups:
    flops = attention_flops(
        batch=setting["batch"], heads=setting["heads"], q_len=seq_len,
        kv_len=seq_len, head_dim=setting["head_dim"],
        value_dim=setting["head_dim"], causal=setting["causal"],
        mode=setting["mode"])
    roofline = make_roofline(matmul_size(flops, config.roofline_max_n),
                             DTYPES[setting["dtype"]])
    inputs = make_inputs(setting, seq_len, config.seed)
    reference = None
    if config.check_error:
      try:
        reference = reference_for(inputs, mode=setting["mode"],
                                  causal=setting["causal"])
      except Exception as e:  # pylint: disable=broad-except
        # Without a reference the cells still run; their error stays empty.
        logging.warning("no reference at T=%d: %s", seq_len,
                        classify_error(e))
    for variant in variants:
      bar.set_postfix_str(f"{variant.name} T={seq_len}")
      row = dict(setting, variant=variant.name, exact=variant.exact,
                 seq_len=seq_len, device=device, matmul_n=roofline.n)
      row.update(measure_cell(
          variant, inputs, mode=setting["mode"], causal=setting["causal"],
          warmup=config.warmup, repeats=config.repeats,
          max_memory_bytes=config.max_memory_gib * _GIB,
          reference=reference, seed=config.seed, roofline=roofline))
      add_throughput(row, flops)
      log = (logging.warning if row["status"].startswith(("oom", "error"))
             else logging.debug)
      log("%s T=%d %s: %s", variant.name, seq_len,
          {k: setting[k] for k in ("dtype", "mode", "causal")}, row["status"])
      rows.append({c: row.get(c) for c in COLUMNS})
      bar.update()
    del inputs, reference, roofline
  bar.close()
  add_ratios(rows)
  return rows


def add_throughput(row: Dict[str, Any], analytic_flops: float) -> None:
  """FLOPs (analytic for exact variants, XLA's otherwise) and FLOP/s."""
  if row["exact"]:
    row["flops"], row["flops_source"] = analytic_flops, "analytic"
  else:
    row["flops"], row["flops_source"] = row.get("xla_flops"), "xla"
  median = row.get("time_median_s")
  if row["flops"] and median:
    row["flops_per_s"] = row["flops"] / median
    if row.get("roofline_flops_per_s"):
      row["roofline_frac"] = (row["flops_per_s"]
                              / row["roofline_flops_per_s"])


def _setting_key(row) -> Tuple:
  return tuple(row[k] for k in SETTING_KEYS)


def add_ratios(rows: List[Dict[str, Any]]) -> None:
  """Fills ``speedup_vs_jax_nn`` (jax_nn time / time) and
  ``temp_ratio_vs_jax_nn`` (temp bytes / jax_nn's) from same-run cells."""
  base = {(_setting_key(r), r["seq_len"]): r for r in rows
          if r["variant"] == RATIO_BASELINE and r["status"] == "ok"}
  for row in rows:
    ref = base.get((_setting_key(row), row["seq_len"]))
    if ref is None or row["status"] != "ok":
      continue
    row["speedup_vs_jax_nn"] = ref["time_median_s"] / row["time_median_s"]
    if ref["temp_bytes"] and row["temp_bytes"] is not None:
      row["temp_ratio_vs_jax_nn"] = row["temp_bytes"] / ref["temp_bytes"]


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
  """Least-squares slope of ``log y`` against ``log x`` (``None`` if fewer
  than two distinct x or any y <= 0)."""
  if len(set(xs)) < 2 or any(y is None or y <= 0 for y in ys):
    return None
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def slopes(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """Per (variant, setting) with at least two T: log-log slope of median
  time and of temporary memory against T over the cells that ran (``ok``)."""
  groups: Dict[Tuple, List[Dict[str, Any]]] = {}
  for r in rows:
    if r["status"] == "ok":
      groups.setdefault((r["variant"],) + _setting_key(r), []).append(r)
  out = []
  for key, group in groups.items():
    group = sorted(group, key=lambda r: r["seq_len"])
    ts = [r["seq_len"] for r in group]
    if len(set(ts)) < 2:
      continue
    out.append(dict(
        zip(("variant",) + SETTING_KEYS, key),
        seq_lens=ts,
        time_slope=loglog_slope(ts, [r["time_median_s"] for r in group]),
        temp_memory_slope=loglog_slope(ts, [r["temp_bytes"] for r in group])))
  return out


# --------------------------------------------------------------------------
# Outputs


def write_csv(rows: List[Dict[str, Any]], path: str) -> None:
  """One line per cell, columns :data:`COLUMNS`; ``None`` as empty."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})


def run_metadata(config: ml_collections.ConfigDict,
                 command: Sequence[str]) -> Dict[str, Any]:
  """Device, versions, time, command line and config for ``results.json``."""
  return {
      "device": jax.devices()[0].device_kind,
      "platform": jax.devices()[0].platform,
      "jax": jax.__version__, "flax": flax.__version__,
      "python": platform.python_version(), "cpu_count": os.cpu_count(),
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": list(command),
      "config": config.to_dict(),
  }


def _fmt(x, spec: str, scale: float = 1.0) -> str:
  return "" if x is None else format(x * scale, spec)


def _setting_title(s: Dict[str, Any]) -> str:
  return (f"{s['dtype']}, {s['mode']}, "
          f"{'causal' if s['causal'] else 'non-causal'}, B={s['batch']}, "
          f"N={s['heads']}, K={s['kv_heads']}, H={s['head_dim']}")


def markdown_summary(rows: List[Dict[str, Any]],
                     slope_rows: List[Dict[str, Any]],
                     meta: Dict[str, Any]) -> str:
  """Markdown: one table per setting (ratios vs jax_nn in their own
  columns), then the log-log slopes of time and temporary memory vs T."""
  lines = [
      "# Attention kernel benchmark", "",
      f"Device: {meta['device']} ({meta['platform']}, {meta['cpu_count']} "
      f"CPUs); jax {meta['jax']}, flax {meta['flax']}; {meta['date']}.",
      "Times are medians; `× jax.nn` is jax_nn's time divided by the "
      "variant's (> 1 = faster); `temp/jax.nn` compares XLA temporary "
      "memory; `% matmul` is FLOP/s over a same-run square matmul.", ""]
  settings_seen: Dict[Tuple, List[Dict[str, Any]]] = {}
  for r in rows:
    settings_seen.setdefault(_setting_key(r), []).append(r)
  header = ("| variant | T | status | compile s | median ms | × jax.nn | "
            "GFLOP/s | % matmul | temp MiB | temp/jax.nn | max abs err |")
  for key, group in settings_seen.items():
    lines += [f"## {_setting_title(dict(zip(SETTING_KEYS, key)))}", "",
              header, "|" + "---|" * 11]
    for r in group:
      status = r["status"] if len(r["status"]) <= 60 else (
          r["status"][:57] + "...")
      status = status.replace("|", "\\|")
      lines.append(
          f"| {r['variant']} | {r['seq_len']} | {status} | "
          f"{_fmt(r['compile_s'], '.2f')} | "
          f"{_fmt(r['time_median_s'], '.2f', 1e3)} | "
          f"{_fmt(r['speedup_vs_jax_nn'], '.2f')} | "
          f"{_fmt(r['flops_per_s'], '.1f', 1e-9)} | "
          f"{_fmt(r['roofline_frac'], '.0f', 100)} | "
          f"{_fmt(r['temp_bytes'], '.1f', 1 / _MIB)} | "
          f"{_fmt(r['temp_ratio_vs_jax_nn'], '.3f')} | "
          f"{_fmt(r['max_abs_err'], '.1e')} |")
    lines.append("")
  lines += ["## Log-log slopes against T", "",
            "Least-squares slope of log(median time) and log(XLA temporary "
            "bytes) against log T over the cells that ran; 1 = linear, "
            "2 = quadratic. Empty: zero temporary memory at some T.", "",
            "| variant | setting | T | time slope | temp memory slope |",
            "|---|---|---|---|---|"]
  for s in slope_rows:
    ts = s["seq_lens"]
    lines.append(
        f"| {s['variant']} | {_setting_title(s)} | {ts[0]}–{ts[-1]} "
        f"({len(ts)}) | {_fmt(s['time_slope'], '.2f')} | "
        f"{_fmt(s['temp_memory_slope'], '.2f')} |")
  return "\n".join(lines) + "\n"


def plot_vs_t(rows: List[Dict[str, Any]], path: str, *, value: str,
              ylabel: str, scale: float = 1.0, logy: bool = True) -> None:
  """One subplot per setting, one line per variant, ``value`` against T
  (log-log, or log-x when ``logy`` is False)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  groups: Dict[Tuple, List[Dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault(_setting_key(r), []).append(r)
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups) + 1.5, 4),
                           squeeze=False, layout="constrained")
  names = list(dict.fromkeys(r["variant"] for r in rows))
  colors = plt.get_cmap("tab10")
  styles = ("-", "--", ":", "-.")
  handles = {}
  for ax, (key, group) in zip(axes[0], groups.items()):
    for i, name in enumerate(names):
      pts = sorted((r["seq_len"], r[value] * scale) for r in group
                   if r["variant"] == name and r[value] is not None
                   and (r[value] > 0 or not logy))
      if not pts:
        continue
      line, = ax.plot(*zip(*pts), marker="o", markersize=3,
                      color=colors(i % 10), linestyle=styles[i // 10 % 4],
                      label=name)
      handles[name] = line
    ax.set_xscale("log", base=2)
    if logy:
      ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(ylabel)
    ax.set_title(_setting_title(dict(zip(SETTING_KEYS, key))), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
  if handles:
    fig.legend(list(handles.values()), list(handles),
               loc="outside right center", fontsize=7)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def write_outputs(rows: List[Dict[str, Any]],
                  config: ml_collections.ConfigDict,
                  command: Sequence[str] = ()) -> Dict[str, str]:
  """Writes CSV, JSON, markdown and PNGs to ``config.output_dir``.

  ``command`` (the command line) is recorded in the JSON metadata.

  Returns ``{kind: path}`` for the files written.
  """
  out_dir = config.output_dir
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, file) for name, file in (
      ("csv", "results.csv"), ("json", "results.json"),
      ("markdown", "summary.md"), ("time_plot", "time_vs_T.png"),
      ("memory_plot", "memory_vs_T.png"),
      ("roofline_plot", "roofline_fraction.png"))}
  meta = run_metadata(config, command)
  slope_rows = slopes(rows)
  write_csv(rows, paths["csv"])
  with open(paths["json"], "w") as f:
    json.dump({"meta": meta, "cells": rows, "slopes": slope_rows}, f,
              indent=1)
  with open(paths["markdown"], "w") as f:
    f.write(markdown_summary(rows, slope_rows, meta))
  plot_vs_t(rows, paths["time_plot"], value="time_median_s",
            ylabel="median time (s)")
  plot_vs_t(rows, paths["memory_plot"], value="temp_bytes",
            ylabel="XLA temporary memory (MiB)", scale=1 / _MIB)
  plot_vs_t(rows, paths["roofline_plot"], value="roofline_frac",
            ylabel="FLOP/s / matmul FLOP/s", logy=False)
  return paths


# --------------------------------------------------------------------------
# Command line


def define_flags(flag_values: flags.FlagValues,
                 argv: Optional[List[str]] = None) -> None:
  """Defines the benchmark's flags on ``flag_values``.

  Plain flags default to ``None`` = "as in the config"; ``argv`` is the
  full command line that ``--config.field=...`` overrides are read from
  (``None``: ``sys.argv``).
  """
  fv = flag_values
  config_flags.DEFINE_config_file(
      "config", None, "ml_collections config file (default: the built-in "
      "configs/benchmark.py); ':quick' selects the quick preset.",
      flag_values=fv, sys_argv=argv)
  flags.DEFINE_bool("quick", None, "Apply the quick preset (CI smoke test).",
                    flag_values=fv)
  flags.DEFINE_string("variants", None, "Comma-separated spec strings, "
                      "baseline names or 'all'.", flag_values=fv)
  flags.DEFINE_string("baselines", None, "Comma-separated baselines, run "
                      f"first: {', '.join(BASELINES)}.", flag_values=fv)
  flags.DEFINE_list("seq_lens", None, "Sequence lengths T (= S).",
                    flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "Batch B.", flag_values=fv)
  flags.DEFINE_integer("num_heads", None, "Query heads N.", flag_values=fv)
  flags.DEFINE_integer("num_kv_heads", None, "Key/value heads K; 0 = N.",
                       flag_values=fv)
  flags.DEFINE_list("head_dims", None, "Head dims H.", flag_values=fv)
  flags.DEFINE_list("dtypes", None, f"Dtypes: {', '.join(DTYPES)}.",
                    flag_values=fv)
  flags.DEFINE_list("causal", None, "Causal settings, e.g. false,true.",
                    flag_values=fv)
  flags.DEFINE_list("modes", None, f"Modes: {', '.join(MODES)}.",
                    flag_values=fv)
  flags.DEFINE_integer("warmup", None, "Untimed calls per cell (>= 1).",
                       flag_values=fv)
  flags.DEFINE_integer("repeats", None, "Timed calls per cell.",
                       flag_values=fv)
  flags.DEFINE_float("max_memory_gib", None, "Skip cells whose XLA-estimated"
                     " footprint exceeds this.", flag_values=fv)
  flags.DEFINE_bool("check_error", None, "Compare with a float32 exact "
                    "reference.", flag_values=fv)
  flags.DEFINE_integer("roofline_max_n", None, "Largest roofline matmul.",
                       flag_values=fv)
  flags.DEFINE_integer("seed", None, "Seed for inputs and parameters.",
                       flag_values=fv)
  flags.DEFINE_string("output_dir", None, "Where outputs go.",
                      flag_values=fv)
  flags.DEFINE_bool("progress", None, "Show a progress bar.", flag_values=fv)


def _parse_bool(text: str) -> bool:
  lowered = text.strip().lower()
  if lowered in ("true", "1", "yes", "causal"):
    return True
  if lowered in ("false", "0", "no", "non-causal", "noncausal"):
    return False
  raise ValueError(f"--causal values must be true/false, got {text!r}")


_LIST_FLAGS = {"seq_lens": int, "head_dims": int, "dtypes": str,
               "causal": _parse_bool, "modes": str}
_SCALAR_FLAGS = ("variants", "baselines", "batch_size", "num_heads",
                 "num_kv_heads", "warmup", "repeats", "max_memory_gib",
                 "check_error", "roofline_max_n", "seed", "output_dir",
                 "progress")


def config_from_flags(fv: flags.FlagValues) -> ml_collections.ConfigDict:
  """Config file (or default) -> ``--quick`` preset -> explicit flags."""
  config = fv.config if fv.config is not None else (
      benchmark_config.get_config())
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  if fv.quick:
    config.update(benchmark_config.QUICK)
  for name, parse in _LIST_FLAGS.items():
    if fv[name].value is not None:
      config[name] = tuple(parse(x) for x in fv[name].value)
  for name in _SCALAR_FLAGS:
    if fv[name].value is not None:
      config[name] = fv[name].value
  return config


def main(argv: Sequence[str],
         flag_values: Optional[flags.FlagValues] = None) -> None:
  """Runs the benchmark and writes its outputs.

  Under ``app.run`` the parsed global flags are passed as ``flag_values``;
  called directly (tests), ``argv`` is parsed on fresh flags.
  """
  if flag_values is None:
    command = list(argv)
    flag_values = flags.FlagValues()
    define_flags(flag_values, command)
    flag_values(command)
  else:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    command = ["python", "-m", "experiments.benchmark"] + sys.argv[1:]
  config = config_from_flags(flag_values)
  rows = run_benchmark(config)
  paths = write_outputs(rows, config, command)
  counts: Dict[str, int] = {}
  for r in rows:
    status = r["status"].split(":")[0]
    counts[status] = counts.get(status, 0) + 1
  print(f"{len(rows)} cells ({counts}); summary: {paths['markdown']}")


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  app.run(functools.partial(main, flag_values=flags.FLAGS))
