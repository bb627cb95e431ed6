"""Pictures every experiment writes: curves, attention maps, saliency.

All functions take NumPy arrays and a path, write a PNG and return the path.
matplotlib runs headless (Agg backend).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments import metrics_io


def bbox_inches(fig):
  """``savefig``'s ``bbox_inches`` for ``fig``: a figure with a layout
  engine is laid out already (``"tight"`` would draw it twice)."""
  return None if fig.get_layout_engine() else "tight"


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=90, bbox_inches=bbox_inches(fig))
  plt.close(fig)
  return path


def plot_curves(workdir: str, path: str) -> str | None:
  """Loss (train and valid, log scale) and every other validation metric
  against step, one panel each; accuracies on a fixed [0, 1] axis."""
  records = metrics_io.read_metrics(workdir)
  train = [r for r in records if r["split"] == "train"]
  valid = [r for r in records if r["split"] == "valid"]
  if not train:
    return None
  keys = sorted({k for r in valid for k in r
                 if k not in ("step", "split", "loss")
                 and isinstance(r[k], (int, float))})
  fig, axes = plt.subplots(1, 1 + len(keys),
                           figsize=(3.6 * (1 + len(keys)), 3.0),
                           squeeze=False)
  axes = axes[0]
  axes[0].plot([r["step"] for r in train], [r["loss"] for r in train],
               label="train")
  vl = [r for r in valid if "loss" in r]
  if vl:
    axes[0].plot([r["step"] for r in vl], [r["loss"] for r in vl],
                 marker=".", label="valid")
  axes[0].set(title="loss", xlabel="step", ylabel="loss (log scale)")
  axes[0].set_yscale("log")
  axes[0].legend(fontsize=8)
  for ax, k in zip(axes[1:], keys):
    rs = [r for r in valid if k in r]
    ax.plot([r["step"] for r in rs], [r[k] for r in rs], marker=".")
    ax.set(title=f"valid {k}", xlabel="step", ylabel=k)
    if "accuracy" in k:
      ax.set_ylim(0.0, 1.02)
  for ax in axes:
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)


def wrap_path(text: str, width: int) -> str:
  """``text`` broken after ``/`` or ``, `` into lines of at most ``width``
  characters where it can be (panel titles that fit their panel)."""
  parts = re.split(r"(?<=/)|(?<=, )", text)
  lines = [""]
  for part in parts:
    if lines[-1] and len(lines[-1]) + len(part) > width:
      lines.append("")
    lines[-1] += part
  return "\n".join(line.rstrip() for line in lines)


def tick_step(n: int, most: int = 10) -> int:
  """The smallest of 1, 2, 5, 10, 20, 50, ... that puts at most ``most``
  position labels on an axis of ``n`` cells (so labels never overlap)."""
  decade = 1
  while True:
    for step in (decade, 2 * decade, 5 * decade):
      if -(-n // step) <= most:
        return step
    decade *= 10


def position_ticks(ax, n: int, labels: Sequence[str] | None, axis: str, *,
                   numbers: bool = True, tokens: bool = True):
  """Position indices on the main axis, tokens (if any) on the other side.

  ``numbers=False`` keeps the ticks but hides their labels and ``tokens=False``
  draws no token axis: inner panels of a grid whose outer panels carry them.
  """
  idx = list(range(0, n, tick_step(n)))
  if axis == "x":
    ax.set_xticks(idx, [str(i) for i in idx], fontsize=8)
    ax.tick_params(axis="x", labelbottom=numbers)
  else:
    ax.set_yticks(idx, [str(i) for i in idx], fontsize=8)
    ax.tick_params(axis="y", labelleft=numbers)
  if not (tokens and labels is not None and n <= 48):
    return
  labels = [str(x) for x in list(labels)[:n]]
  if axis == "x":
    ax.secondary_xaxis("top").set_xticks(
        range(len(labels)), labels, fontsize=8,
        rotation=90 if max(map(len, labels)) > 1 else 0)
  else:
    ax.secondary_yaxis("right").set_yticks(range(len(labels)), labels,
                                           fontsize=8)


def plot_attention_grid(weights_LNTS: np.ndarray, path: str, *,
                        x_labels: Sequence[str] | None = None,
                        y_labels: Sequence[str] | None = None,
                        title: str = "", row_names: Sequence[str] | None
                        = None, xlabel: str = "key position",
                        ylabel: str = "query position", note: str = ""
                        ) -> str:
  """One heat map per (layer, head): rows = layers, columns = heads.

  One colour scale for the whole figure (0 to the largest weight, with a
  colour bar), so a flat head looks flat next to a sharp one. Position
  indices label the bottom row and left column; ``x_labels``/``y_labels``
  (tokens) go on the top row and right column when the sequence is short
  enough to read them. ``note`` is printed
  under the title (e.g. "implied weights").
  """
  w = np.asarray(weights_LNTS, np.float32)
  if w.ndim == 2:
    w = w[None, None]
  elif w.ndim == 3:
    w = w[None]
  L, N, T, S = w.shape
  vmax = max(float(np.nanmax(w)) if w.size else 1.0, 1e-6)
  vmin = min(0.0, float(np.nanmin(w)) if w.size else 0.0)
  cell = max(2.2, min(4.5, 0.2 * max(T, S)))
  # Constrained layout keeps the token axes (top, right) and the colour
  # bar clear of the neighbouring panels.
  fig, axes = plt.subplots(L, N, figsize=(cell * N + 1.6, cell * L + 1.4),
                           squeeze=False, layout="constrained")
  image = None
  for l in range(L):
    for n in range(N):
      ax = axes[l, n]
      image = ax.imshow(w[l, n], cmap="viridis", vmin=vmin, vmax=vmax,
                        aspect="auto", interpolation="nearest")
      name = row_names[l] if row_names else f"layer {l}"
      ax.set_title(wrap_path(f"{name}, head {n}", int(cell / 0.075)),
                   fontsize=8)
      # Every panel has the same axes: positions and axis names on the
      # bottom row and left column, tokens on the top row and right column
      # (inner panels' labels only repeat them, and cost most of the time
      # the figure takes to draw).
      position_ticks(ax, S, x_labels, "x", numbers=l == L - 1, tokens=l == 0)
      position_ticks(ax, T, y_labels, "y", numbers=n == 0, tokens=n == N - 1)
      if l == L - 1:
        ax.set_xlabel(xlabel, fontsize=8)
      if n == 0:
        ax.set_ylabel(ylabel, fontsize=8)
  heading = title + (f"\n{note}" if note else "")
  if heading:
    fig.suptitle(heading, fontsize=9)
  bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
  bar.set_label("attention weight", fontsize=8)
  bar.ax.tick_params(labelsize=8)
  return _save(fig, path)


def plot_attention_summary(summaries, path: str, title: str = "",
                           note: str = "") -> str:
  """The batch summary: one panel per statistic (entropy, distance or
  input distance, aligned mass), rows = attention modules, columns = heads, values
  written in the cells."""
  paths = list(summaries)
  stats = [s for s in ("entropy", "distance", "input_distance",
                        "aligned_mass")
           if any(s in summaries[p] for p in paths)]
  nheads = max(len(next(iter(summaries[p].values()))) for p in paths)
  units = {"entropy": "mean entropy (nats)",
           "distance": "mean distance |t - s|",
           "input_distance": "mean input distance |x_t - x_s|",
           "aligned_mass": "mean weight on the correct source"}
  fig, axes = plt.subplots(1, len(stats), squeeze=False, figsize=(
      (1.3 + 0.7 * nheads) * len(stats) + 3.0, 1.2 + 0.45 * len(paths)))
  for ax, stat in zip(axes[0], stats):
    grid = np.full((len(paths), nheads), np.nan)
    for i, p in enumerate(paths):
      if stat in summaries[p]:         # no alignment: left blank
        v = np.asarray(summaries[p][stat])
        grid[i, :len(v)] = v
    kw = {"vmin": 0.0, "vmax": 1.0} if stat == "aligned_mass" else {}
    im = ax.imshow(grid, cmap="magma", aspect="auto", **kw)
    for i in range(len(paths)):
      for n in range(nheads):
        if not np.isfinite(grid[i, n]):
          ax.text(n, i, "n/a", ha="center", va="center", fontsize=8)
        else:
          lo, hi = im.get_clim()  # pylint: disable=unpacking-non-sequence
          light = (grid[i, n] - lo) / max(hi - lo, 1e-9) < 0.5
          ax.text(n, i, f"{grid[i, n]:.2f}", ha="center", va="center",
                  fontsize=8, color="white" if light else "black")
    ax.set_xticks(range(nheads), [f"head {n}" for n in range(nheads)],
                  fontsize=8)
    ax.set_yticks(range(len(paths)), paths if ax is axes[0, 0] else
                  [""] * len(paths), fontsize=8)
    ax.set_title(units[stat], fontsize=9)
  heading = title + (f"\n{note}" if note else "")
  if heading:
    fig.suptitle(heading, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def plot_saliency(image_HW: np.ndarray, saliency_HW: np.ndarray, path: str,
                  title: str = "") -> str:
  """The image, the saliency map, and the overlay, side by side."""
  image = np.asarray(image_HW, np.float32)
  sal = np.asarray(saliency_HW, np.float32)
  sal = (sal - sal.min()) / max(float(sal.max() - sal.min()), 1e-9)
  fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
  axes[0].imshow(image, cmap="gray_r")
  axes[0].set_title("input", fontsize=8)
  axes[1].imshow(sal, cmap="inferno")
  axes[1].set_title("attention rollout", fontsize=8)
  axes[2].imshow(image, cmap="gray_r")
  axes[2].imshow(sal, cmap="inferno", alpha=0.55,
                 extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5,
                         -0.5))
  axes[2].set_title("overlay", fontsize=8)
  for ax in axes:
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def plot_regression(x_train, y_train, x_test, curves: dict, path: str,
                    title: str = "") -> str:
  """Nadaraya–Watson fits: training points and one line per curve."""
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot(x_train, y_train, "o", alpha=0.4, markersize=3, label="train")
  for name, y in curves.items():
    ax.plot(x_test, y, label=name)
  ax.set(xlabel="x", ylabel="y", title=title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)
