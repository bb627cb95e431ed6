"""Benchmark reports: log-log slopes, CSV, JSON, markdown and pictures.

:func:`write_outputs` writes, in ``config.output_dir``: ``results.csv``,
``results.json`` (cells, slopes and run metadata), ``summary.md`` (tables
and log-log slopes of time and temporary memory against T) and
``time_vs_T.png``, ``memory_vs_T.png``, ``roofline_fraction.png``.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax
import jax
import ml_collections
import numpy as np

from experiments.bench.sweep import (COLUMNS, MIN_CELL_SECONDS, MIN_MATMUL_N,
                                     SETTING_KEYS, meaningful, setting_key)
from experiments.bench.training import TRAINING_COLUMNS

_MIB = 2 ** 20


# --------------------------------------------------------------------------
# Slopes


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
  """Least-squares slope of ``log y`` against ``log x`` (``None`` if fewer
  than two distinct x or any y <= 0)."""
  if len(set(xs)) < 2 or any(y is None or y <= 0 for y in ys):
    return None
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def slopes(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """Per (variant, setting) with at least two T: log-log slope of median
  time and of temporary memory against T over the cells that ran (``ok``)
  long enough to time (:func:`~experiments.bench.sweep.meaningful`)."""
  groups: Dict[Tuple, List[Dict[str, Any]]] = {}
  for r in rows:
    if r["status"] == "ok" and meaningful(r):
      groups.setdefault((r["variant"],) + setting_key(r), []).append(r)
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
# attn against the kernels users would pick instead

ATTN_VARIANT = "softmax"      # attn's automatic choice of exact kernel
TORCH_VARIANT = "torch_sdpa"
TOKAMAX_VARIANTS = ("tokamax", "tokamax_xla_chunked")
FLOOR_VARIANT = "block_matmuls"  # the kernel's matmuls alone (bench.floor)


def _geomean(xs: Sequence[float]) -> Optional[float]:
  xs = [x for x in xs if x]
  return float(np.exp(np.mean(np.log(xs)))) if xs else None


def peer_ratios(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """One row per (setting, T) where ``softmax`` ran: how many times faster
  attn's automatic kernel is than ``jax_nn``, PyTorch's SDPA and the faster
  of the two tokamax cells (> 1: attn is faster; ``None`` where the peer
  did not run or either cell is too short to time,
  :func:`~experiments.bench.sweep.meaningful`), attn's and PyTorch's
  share of the matmul FLOP/s, and, where ``block_matmuls`` ran, its time
  over attn's (``vs_block_matmuls``: the part of attn's time its matmuls
  alone need) and PyTorch's time over its (``torch_vs_block_matmuls``: the
  most any kernel built from these block matmuls could be ahead of
  PyTorch)."""
  cells: Dict[Tuple, Dict[str, Dict[str, Any]]] = {}
  for r in rows:
    if r["status"] == "ok":
      cells.setdefault(setting_key(r) + (r["seq_len"],), {})[r["variant"]] = r
  out = []
  for key, by_name in cells.items():
    ours = by_name.get(ATTN_VARIANT)
    if ours is None:
      continue
    def times_faster(names):
      times = [by_name[n]["time_median_s"] for n in names
               if n in by_name and meaningful(by_name[n])]
      if not times or not meaningful(ours):
        return None
      return min(times) / ours["time_median_s"]
    torch_row = by_name.get(TORCH_VARIANT) or {}
    floor_row = by_name.get(FLOOR_VARIANT)
    torch_vs_floor = None
    if (floor_row and torch_row and meaningful(floor_row)
        and meaningful(torch_row)):
      torch_vs_floor = (torch_row["time_median_s"]
                        / floor_row["time_median_s"])
    out.append(dict(
        zip(SETTING_KEYS + ("seq_len",), key),
        vs_jax_nn=times_faster(["jax_nn"]),
        vs_torch_sdpa=times_faster([TORCH_VARIANT]),
        vs_tokamax=times_faster(TOKAMAX_VARIANTS),
        attn_matmul_share=ours.get("roofline_frac"),
        torch_matmul_share=torch_row.get("roofline_frac"),
        vs_block_matmuls=times_faster([FLOOR_VARIANT]),
        torch_vs_block_matmuls=torch_vs_floor))
  return out


def peer_summary(peer_rows: List[Dict[str, Any]]) -> List[str]:
  """Markdown lines: the :func:`peer_ratios` table and its geometric means
  (empty when ``softmax`` was not benchmarked); two more columns when
  ``block_matmuls`` ran."""
  if not peer_rows:
    return []
  ratio_keys = ["vs_jax_nn", "vs_torch_sdpa", "vs_tokamax"]
  share_keys = ["attn_matmul_share", "torch_matmul_share"]
  heads = ["× jax.nn", "÷ torch SDPA", "÷ tokamax", "attn share",
           "torch share"]
  floor = any(r.get("vs_block_matmuls") for r in peer_rows)
  if floor:
    ratio_keys += ["vs_block_matmuls", "torch_vs_block_matmuls"]
    heads += ["÷ matmuls alone", "torch ÷ matmuls alone"]
  lines = ["## attn against what users would pick instead", "",
           f"`{ATTN_VARIANT}` (attn's automatic exact kernel) against "
           "jax.nn, PyTorch's SDPA and the faster of tokamax's default and "
           "`xla_chunked`: each peer's median time over attn's (> 1 = attn "
           "is faster); share = FLOP/s over the same-run square matmul; "
           f"`—`: a cell under {MIN_CELL_SECONDS * 1e3:g} ms (or the peer "
           "did not run)."]
  if floor:
    lines[-1] += (f" `{FLOOR_VARIANT}` is the kernel's block matmuls alone "
                  "(no softmax): `÷ matmuls alone` is their time over "
                  "attn's, `torch ÷ matmuls alone` PyTorch's time over "
                  "theirs, the most a kernel made of these matmuls could "
                  "be ahead of PyTorch.")
  lines += ["", "| cell | T | " + " | ".join(heads) + " |",
            "|---|---|" + "---|" * len(heads)]
  cell = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
  order = ratio_keys[:3] + share_keys + ratio_keys[3:]
  for r in peer_rows:
    lines.append(f"| {_setting_title(r)} | {r['seq_len']} | " + " | ".join(
        cell(r.get(k)) for k in order) + " |")
  means = [cell(_geomean([r.get(k) for r in peer_rows])) for k in ratio_keys]
  lines += ["| geometric mean | | " + " | ".join(means[:3]) + " | | |"
            + "".join(f" {m} |" for m in means[3:]), ""]
  return lines


# --------------------------------------------------------------------------
# Outputs


def write_csv(rows: List[Dict[str, Any]], path: str,
              columns: Sequence[str] = COLUMNS) -> None:
  """One line per cell, ``columns`` (default :data:`COLUMNS`); ``None`` as
  empty."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: ("" if r[k] is None else r[k]) for k in columns})


def _status_cell(status: str) -> str:
  """A cell's status for a markdown table: at most 60 characters, pipes
  escaped."""
  if len(status) > 60:
    status = status[:57] + "..."
  return status.replace("|", "\\|")


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


def _roofline_cell(row: Dict[str, Any]) -> str:
  if row.get("roofline_frac") is not None:
    return _fmt(row["roofline_frac"], ".0f", 100)
  return "—" if row.get("time_median_s") else ""


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
      "memory; `% matmul` is FLOP/s over a same-run square matmul.",
      f"`% matmul` and slopes are left out (`—`) for cells faster than "
      f"{MIN_CELL_SECONDS * 1e3:g} ms or timed against a matmul smaller "
      f"than {MIN_MATMUL_N}²: their time is dispatch overhead and noise.",
      ""]
  settings_seen: Dict[Tuple, List[Dict[str, Any]]] = {}
  for r in rows:
    settings_seen.setdefault(setting_key(r), []).append(r)
  header = ("| variant | T | status | compile s | median ms | × jax.nn | "
            "GFLOP/s | % matmul | temp MiB | temp/jax.nn | max abs err |")
  for key, group in settings_seen.items():
    lines += [f"## {_setting_title(dict(zip(SETTING_KEYS, key)))}", "",
              header, "|" + "---|" * 11]
    for r in group:
      lines.append(
          f"| {r['variant']} | {r['seq_len']} | {_status_cell(r['status'])} | "
          f"{_fmt(r['compile_s'], '.2f')} | "
          f"{_fmt(r['time_median_s'], '.2f', 1e3)} | "
          f"{_fmt(r['speedup_vs_jax_nn'], '.2f')} | "
          f"{_fmt(r['flops_per_s'], '.1f', 1e-9)} | "
          f"{_roofline_cell(r)} | "
          f"{_fmt(r['temp_bytes'], '.1f', 1 / _MIB)} | "
          f"{_fmt(r['temp_ratio_vs_jax_nn'], '.3f')} | "
          f"{_fmt(r['max_abs_err'], '.1e')} |")
    lines.append("")
  lines += peer_summary(peer_ratios(rows))
  lines += ["## Log-log slopes against T", "",
            "Least-squares slope of log(median time) and log(XLA temporary "
            "bytes) against log T over the cells that ran; 1 = linear, "
            "2 = quadratic. Empty: zero temporary memory at some T. Only "
            f"cells of at least {MIN_CELL_SECONDS * 1e3:g} ms count; a "
            "variant with fewer than two such cells has no row.", "",
            "| variant | setting | T | time slope | temp memory slope |",
            "|---|---|---|---|---|"]
  for s in slope_rows:
    ts = s["seq_lens"]
    lines.append(
        f"| {s['variant']} | {_setting_title(s)} | {ts[0]}–{ts[-1]} "
        f"({len(ts)}) | {_fmt(s['time_slope'], '.2f')} | "
        f"{_fmt(s['temp_memory_slope'], '.2f')} |")
  return "\n".join(lines) + "\n"


def line_colors(n: int) -> List[Tuple[float, ...]]:
  """``n`` distinct RGBA colours: tab10's, then tab20's lighter shades,
  then evenly spaced hues, so no two lines of a plot share a colour."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  tab20 = matplotlib.colormaps["tab20"].colors
  base = list(tab20[0::2]) + list(tab20[1::2])
  if n <= len(base):
    return [tuple(c) + (1.0,) for c in base[:n]]
  hsv = matplotlib.colormaps["hsv"]
  return [tuple(c) + (1.0,) for c in base] + [
      hsv(i / (n - len(base))) for i in range(n - len(base))]


PLOT_COLUMNS = 4


def plot_vs_t(rows: List[Dict[str, Any]], path: str, *, value: str,
              ylabel: str, scale: float = 1.0, logy: bool = True) -> None:
  """One subplot per setting, one line per variant, ``value`` against T
  (log-log, or log-x when ``logy`` is False)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  groups: Dict[Tuple, List[Dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault(setting_key(r), []).append(r)
  # At most PLOT_COLUMNS panels a row: the peers preset has 8 settings, and
  # 8 panels side by side are too narrow to read.
  cols = max(1, min(PLOT_COLUMNS, len(groups)))
  rows_of_panels = max(1, -(-len(groups) // cols))
  fig, axes = plt.subplots(rows_of_panels, cols,
                           figsize=(4.6 * cols + 1.5, 3.6 * rows_of_panels),
                           squeeze=False, layout="constrained")
  for ax in axes.flat[len(groups):]:
    ax.set_visible(False)
  names = list(dict.fromkeys(r["variant"] for r in rows))
  colors = line_colors(len(names))
  styles = ("-", "--", ":", "-.")
  handles = {}
  for ax, (key, group) in zip(axes.flat, groups.items()):
    drawn = 0
    for i, name in enumerate(names):
      pts = sorted((r["seq_len"], r[value] * scale) for r in group
                   if r["variant"] == name and r[value] is not None
                   and (r[value] > 0 or not logy))
      if not pts:
        continue
      line, = ax.plot(*zip(*pts), marker="o", markersize=3,
                      color=colors[i], linestyle=styles[i // 10 % 4],
                      label=name)
      handles[name] = line
      drawn += 1
    if not drawn:
      ax.text(0.5, 0.5, "no cell long enough to measure this",
              transform=ax.transAxes, ha="center", va="center", fontsize=9)
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
    json.dump({"meta": meta, "cells": rows, "slopes": slope_rows,
               "peers": peer_ratios(rows)}, f, indent=1)
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
# Training benchmark (experiments.bench.training)


def training_markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any]
                      ) -> str:
  """Markdown table of a training benchmark, one line per (variant, T)."""
  t = meta["config"]["training"]
  lines = [
      "# TransformerLM training benchmark", "",
      f"Device: {meta['device']} ({meta['platform']}, {meta['cpu_count']} "
      f"CPUs); jax {meta['jax']}, flax {meta['flax']}; {meta['date']}.",
      f"Experiment `configs/{t['experiment']}.py`"
      + (f" with `{t['overrides']}`" if t["overrides"] else "")
      + f", batch = {t['tokens_per_step']} // T, medians of "
      f"{meta['config']['repeats']} interleaved timings of {t['steps']} "
      "steps. `step` is the bare jitted step on pre-made batches, `loop` "
      "the same step inside train_and_evaluate; tokens/s and MFU use the "
      "loop; MFU = model FLOPs / step time / same-run fp32 matmul FLOP/s "
      "(model FLOPs: 6 x dense weights x tokens, plus exact attention's "
      "matmuls, forward + backward; approximations: dense part only).", "",
      "| variant | T | batch | status | step ms | loop ms | loop overhead | "
      "tokens/s | GFLOP/step | matmul GFLOP/s | MFU |",
      "|" + "---|" * 11]
  for r in rows:
    lines.append(
        f"| {r['variant']} | {r['seq_len']} | "
        f"{'' if r['batch'] is None else r['batch']} | "
        f"{_status_cell(r['status'])} | "
        f"{_fmt(r['step_s'], '.1f', 1e3)} | "
        f"{_fmt(r['loop_step_s'], '.1f', 1e3)} | "
        f"{_fmt(r['loop_overhead'], '+.1f', 100)}{'%' if r['loop_overhead'] is not None else ''} | "
        f"{_fmt(r['tokens_per_s'], ',.0f')} | "
        f"{_fmt(r['model_flops'], '.1f', 1e-9)}"
        f"{'*' if r['model_flops'] and r['exact'] is False else ''} | "
        f"{_fmt(r['matmul_flops_per_s'], '.1f', 1e-9)} | "
        f"{_fmt(r['mfu'], '.2f')} |")
  lines += ["", "`*`: dense part only; the approximation's attention work "
            "is not counted, so its MFU is a lower bound.", ""]
  return "\n".join(lines)


def plot_training(rows: List[Dict[str, Any]], path: str) -> None:
  """Tokens/s and MFU against T, one line per variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(dict.fromkeys(r["variant"] for r in rows))
  colors = line_colors(len(names))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
  for ax, (value, label) in zip(axes, (("tokens_per_s", "tokens/s (loop)"),
                                       ("mfu", "MFU"))):
    for name, color in zip(names, colors):
      pts = sorted((r["seq_len"], r[value]) for r in rows
                   if r["variant"] == name and r[value] is not None)
      if pts:
        ax.plot(*zip(*pts), marker="o", markersize=3, color=color,
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_yscale("log")
  axes[0].set_title("TransformerLM training throughput", fontsize=9)
  axes[1].set_title("model FLOPs utilisation (* approximations: dense only)",
                    fontsize=9)
  axes[1].legend(fontsize=8)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def write_training_outputs(rows: List[Dict[str, Any]],
                           config: ml_collections.ConfigDict,
                           command: Sequence[str] = ()) -> Dict[str, str]:
  """``results.csv``, ``results.json``, ``summary.md`` and
  ``training.png`` of a training benchmark in ``config.output_dir``."""
  out_dir = config.output_dir
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, file) for name, file in (
      ("csv", "results.csv"), ("json", "results.json"),
      ("markdown", "summary.md"), ("plot", "training.png"))}
  meta = run_metadata(config, command)
  write_csv(rows, paths["csv"], TRAINING_COLUMNS)
  with open(paths["json"], "w") as f:
    json.dump({"meta": meta, "cells": rows}, f, indent=1)
  with open(paths["markdown"], "w") as f:
    f.write(training_markdown(rows, meta))
  plot_training(rows, paths["plot"])
  return paths
