"""The benchmark sweep: every cell of a config, and same-run ratios.

:func:`run_benchmark` runs every (setting, T, variant) cell of a
``configs/benchmark.py`` config through :func:`measure.measure_cell` and
returns one dict per cell with the keys :data:`COLUMNS`. Cells that are
unsupported, run out of memory, would exceed ``max_memory_gib`` or fail are
recorded with their status and the sweep continues; with ``time_budget_s``
set, the sweep runs the shortest T first and records the cells it reaches
after the budget as ``skipped: time budget ...``. Speed and temporary
memory are set against ``jax_nn`` measured in the same run.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from experiments.bench.measure import (MODES, attention_flops, classify_error,
                                       make_roofline, make_step, matmul_size,
                                       measure_cell, reference_attention)
from experiments.bench.variants import Variant, resolve_variants

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
RATIO_BASELINE = "jax_nn"
_GIB = 2 ** 30
_clock = time.monotonic   # the time budget's clock (tests replace it)

COLUMNS = (
    "variant", "exact", "dtype", "mode", "causal", "batch", "heads",
    "kv_heads", "head_dim", "seq_len", "status", "compile_s",
    "time_median_s", "time_min_s", "time_max_s", "flops", "flops_source",
    "flops_per_s", "xla_flops", "matmul_n", "roofline_flops_per_s",
    "roofline_frac", "temp_bytes", "argument_bytes", "output_bytes",
    "max_abs_err", "rel_err", "speedup_vs_jax_nn", "temp_ratio_vs_jax_nn",
    "device")
# The keys that make a setting: cells of one setting differ only in
# variant and T.
SETTING_KEYS = ("dtype", "mode", "causal", "batch", "heads", "kv_heads",
                "head_dim")


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
  if config.time_budget_s < 0:
    raise ValueError(f"time_budget_s must be >= 0 (0 = no budget), got "
                     f"{config.time_budget_s}")
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
  budget = float(config.time_budget_s)
  if budget:
    # Shortest sequences first, so a spent budget costs the longest cells.
    groups.sort(key=lambda group: group[1])
  start = _clock()
  spent = lambda: budget and _clock() - start > budget  # noqa: E731
  rows = []
  bar = tqdm.tqdm(total=len(groups) * len(variants), unit="cell",
                  disable=not config.progress, desc="benchmark")

  def skip(setting, seq_len, variant):
    rows.append({c: None for c in COLUMNS} | dict(
        setting, variant=variant.name, exact=variant.exact, seq_len=seq_len,
        device=device, status=f"skipped: time budget of {budget:g} s spent"))
    bar.update()

  for setting, seq_len in groups:
    if spent():
      for variant in variants:
        skip(setting, seq_len, variant)
      continue
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
      if spent():
        skip(setting, seq_len, variant)
        continue
      row.update(measure_cell(
          variant, inputs, mode=setting["mode"], causal=setting["causal"],
          warmup=config.warmup, repeats=config.repeats,
          max_memory_bytes=config.max_memory_gib * _GIB,
          reference=reference, seed=config.seed, roofline=roofline))
      add_throughput(row, flops, analytic=variant.exact or variant.floor)
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


def add_throughput(row: Dict[str, Any], analytic_flops: float,
                   analytic: Optional[bool] = None) -> None:
  """FLOPs (``analytic_flops`` for exact variants and the matmul floor,
  XLA's otherwise; ``analytic`` defaults to ``row["exact"]``) and FLOP/s."""
  if row["exact"] if analytic is None else analytic:
    row["flops"], row["flops_source"] = analytic_flops, "analytic"
  else:
    row["flops"], row["flops_source"] = row.get("xla_flops"), "xla"
  median = row.get("time_median_s")
  if row["flops"] and median:
    row["flops_per_s"] = row["flops"] / median
    if row.get("roofline_flops_per_s") and meaningful(row):
      row["roofline_frac"] = (row["flops_per_s"]
                              / row["roofline_flops_per_s"])


# Below these a cell's time is dispatch overhead and timer noise, and a
# matmul this small is far from the machine's FLOP/s: such cells get no
# roofline fraction and take no part in slopes (the report says so).
MIN_CELL_SECONDS = 1e-3
MIN_MATMUL_N = 512


def meaningful(row: Dict[str, Any]) -> bool:
  """True when a cell ran long enough (and against a big enough matmul)
  for its roofline fraction and slope to mean anything."""
  median = row.get("time_median_s")
  n = row.get("matmul_n")
  return bool(median and median >= MIN_CELL_SECONDS
              and (n is None or n >= MIN_MATMUL_N))


def setting_key(row) -> Tuple:
  """The values of :data:`SETTING_KEYS` of a cell."""
  return tuple(row[k] for k in SETTING_KEYS)


def add_ratios(rows: List[Dict[str, Any]]) -> None:
  """Fills ``speedup_vs_jax_nn`` (jax_nn time / time) and
  ``temp_ratio_vs_jax_nn`` (temp bytes / jax_nn's) from same-run cells."""
  base = {(setting_key(r), r["seq_len"]): r for r in rows
          if r["variant"] == RATIO_BASELINE and r["status"] == "ok"}
  for row in rows:
    ref = base.get((setting_key(row), row["seq_len"]))
    if ref is None or row["status"] != "ok":
      continue
    row["speedup_vs_jax_nn"] = ref["time_median_s"] / row["time_median_s"]
    if ref["temp_bytes"] and row["temp_bytes"] is not None:
      row["temp_ratio_vs_jax_nn"] = row["temp_bytes"] / ref["temp_bytes"]

