"""The guide's benchmark picture: time and XLA temporary memory against T.

It runs :func:`experiments.bench.run_benchmark` in a small configuration
(``configs/benchmark.py`` plus the changes below), or plots the cells of an
existing ``results.json``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import matplotlib.pyplot as plt

from configs import benchmark as benchmark_config
from experiments import bench
from experiments.bench.sweep import SETTING_KEYS
from experiments.guide.context import Context


BENCHMARK_VARIANTS = ("xla,chunked,linear,performer(num_features=64),"
                      "local(window=128)")


def benchmark_rows(ctx: Context) -> List[Dict[str, Any]]:
  """Benchmark cells: read from ``ctx.benchmark_json``, or run in a small
  config."""
  if ctx.benchmark_json:
    with open(ctx.benchmark_json, encoding="utf-8") as f:
      return json.load(f)["cells"]
  config = benchmark_config.get_config()
  config.update(variants=BENCHMARK_VARIANTS, baselines="jax_nn",
                seq_lens=(256, 512, 1024, 2048, 4096), batch_size=1,
                num_heads=4, head_dims=(64,), causal=(False,),
                modes=("fwd",), repeats=3, check_error=False,
                roofline_max_n=512, progress=False)
  if ctx.fast:
    config.update(variants="xla,linear", seq_lens=(32, 64), num_heads=1,
                  head_dims=(8,), repeats=1, roofline_max_n=64)
  return bench.run_benchmark(config)


def _device_name(rows) -> str:
  return str(rows[0].get("device") or "unknown device")


def benchmark_figure(ctx: Context) -> Dict[str, Any]:
  """Time and XLA temporary memory against sequence length, one setting."""
  rows = [r for r in benchmark_rows(ctx) if r["status"] == "ok"]
  if not rows:
    raise ValueError("the benchmark produced no successful cells")
  setting = tuple(rows[0][k] for k in SETTING_KEYS)
  rows = [r for r in rows
          if tuple(r[k] for k in SETTING_KEYS) == setting]
  names = list(dict.fromkeys(r["variant"] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  facts: Dict[str, Any] = {}
  longest = max(r["seq_len"] for r in rows)
  for name in names:
    mine = sorted((r for r in rows if r["variant"] == name),
                  key=lambda r: r["seq_len"])
    ts = [r["seq_len"] for r in mine]
    axes[0].loglog(ts, [r["time_median_s"] * 1e3 for r in mine], "o-",
                   base=2, label=name, markersize=3)
    mem = [(r["seq_len"], r["temp_bytes"] / 2 ** 20) for r in mine
           if r.get("temp_bytes")]
    if mem:
      axes[1].loglog(*zip(*mem), "o-", base=2, label=name, markersize=3)
    last = mine[-1]
    if last["seq_len"] == longest:
      facts[f"ms_at_T{longest}[{name}]"] = last["time_median_s"] * 1e3
      if last.get("temp_bytes") is not None:
        facts[f"temp_MiB_at_T{longest}[{name}]"] = last["temp_bytes"] / 2**20
  s = dict(zip(SETTING_KEYS, setting))
  axes[0].set(xlabel="sequence length T", ylabel="median time (ms)",
              title=f"time: {s['dtype']} {s['mode']}, B={s['batch']} "
              f"N={s['heads']} H={s['head_dim']}, {_device_name(rows)}")
  axes[1].set(xlabel="sequence length T",
              ylabel="XLA temporary memory (MiB)",
              title="memory (memory_analysis of the compiled call)")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
    ax.title.set_fontsize(8)
  axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  facts["device"] = _device_name(rows)
  fig.tight_layout()
  facts["path"] = ctx.save(fig, "benchmark")
  return facts
