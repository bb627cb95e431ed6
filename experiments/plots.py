"""Pictures every experiment writes: curves, attention maps, saliency.

All functions take NumPy arrays and a path, write a PNG and return the path.
matplotlib runs headless (Agg backend).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments import metrics_io


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=90, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_curves(workdir: str, path: str) -> Optional[str]:
  """Training loss and every validation metric against step."""
  records = metrics_io.read_metrics(workdir)
  train = [r for r in records if r["split"] == "train"]
  valid = [r for r in records if r["split"] == "valid"]
  if not train:
    return None
  keys = sorted(k for k in valid[0] if k not in ("step", "split")) if valid \
      else []
  fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3))
  axes = np.atleast_1d(axes)
  axes[0].plot([r["step"] for r in train], [r["loss"] for r in train],
               label="train")
  if valid and "loss" in valid[0]:
    axes[0].plot([r["step"] for r in valid], [r["loss"] for r in valid],
                 label="valid")
  axes[0].set(title="loss", xlabel="step")
  axes[0].set_yscale("log")
  axes[0].legend()
  for ax, k in zip(axes[1:], keys):
    ax.plot([r["step"] for r in valid], [r[k] for r in valid], marker=".")
    ax.set(title=f"valid {k}", xlabel="step")
  fig.tight_layout()
  return _save(fig, path)


def plot_attention_grid(weights_LNTS: np.ndarray, path: str, *,
                        x_labels: Optional[Sequence[str]] = None,
                        y_labels: Optional[Sequence[str]] = None,
                        title: str = "", row_names: Optional[Sequence[str]]
                        = None, xlabel: str = "key", ylabel: str = "query"
                        ) -> str:
  """One heat map per (layer, head): rows = layers, columns = heads."""
  w = np.asarray(weights_LNTS, np.float32)
  if w.ndim == 2:
    w = w[None, None]
  elif w.ndim == 3:
    w = w[None]
  L, N, T, S = w.shape
  cell = max(1.6, min(4.0, 0.22 * max(T, S)))
  fig, axes = plt.subplots(L, N, figsize=(cell * N + 0.6, cell * L + 0.6),
                           squeeze=False)
  for l in range(L):
    for n in range(N):
      ax = axes[l, n]
      ax.imshow(w[l, n], cmap="viridis", vmin=0.0, aspect="auto",
                interpolation="nearest")
      name = row_names[l] if row_names else f"layer {l}"
      ax.set_title(f"{name} head {n}", fontsize=8)
      small = max(T, S) <= 40
      if x_labels is not None and small:
        ax.set_xticks(range(S), list(x_labels)[:S], fontsize=6, rotation=90)
      else:
        ax.set_xticks([])
      if y_labels is not None and small:
        ax.set_yticks(range(T), list(y_labels)[:T], fontsize=6)
      else:
        ax.set_yticks([])
      if l == L - 1:
        ax.set_xlabel(xlabel, fontsize=7)
      if n == 0:
        ax.set_ylabel(ylabel, fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
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
