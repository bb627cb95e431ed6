"""What every guide picture shares: where it goes, the runs, drawing helpers."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments.guide import runs

DPI = 80
PREFIX = "guide_"
DEFAULT_OUTPUT_DIR = os.path.join("docs", "figures")


@dataclasses.dataclass
class Context:
  """Where pictures go, which runs to use, and the models loaded so far.

  Attributes:
    output_dir: directory of the PNGs.
    fast: tiny shapes, untrained models (see :mod:`experiments.figures`).
    workdir_root: where runs are trained (``<root>/<run name>``).
    workdirs: run name -> an existing workdir to load instead.
    benchmark_json: a benchmark ``results.json`` to plot instead of running.
  """
  output_dir: str
  fast: bool = False
  workdir_root: str = runs.DEFAULT_WORKDIR_ROOT
  workdirs: Dict[str, str] = dataclasses.field(default_factory=dict)
  benchmark_json: Optional[str] = None
  _models: Dict[str, runs.Trained] = dataclasses.field(default_factory=dict)

  def path(self, name: str) -> str:
    return os.path.join(self.output_dir, f"{PREFIX}{name}.png")

  def save(self, fig, name: str) -> str:
    """Writes ``fig`` as ``guide_<name>.png`` and closes it."""
    os.makedirs(self.output_dir, exist_ok=True)
    path = self.path(name)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path

  def model(self, name: str) -> runs.Trained:
    """Run ``name`` of :data:`runs.RUNS`, trained (or loaded) once per
    context."""
    if name not in self._models:
      workdir = self.workdirs.get(name) or os.path.join(self.workdir_root,
                                                        name)
      self._models[name] = runs.load_run(name, fast=self.fast,
                                         workdir=workdir)
    return self._models[name]


def heatmap(ax, w, title: str = "", x_labels=None, y_labels=None,
            vmax=None, cmap: str = "viridis", gamma: float = 1.0):
  """``w[rows, cols]`` as an image with optional tick labels.

  ``gamma < 1`` brightens small values (a power-law colour scale).
  """
  norm = matplotlib.colors.PowerNorm(gamma, vmin=0.0, vmax=vmax)
  ax.imshow(np.asarray(w, np.float32), cmap=cmap, norm=norm,
            aspect="auto", interpolation="nearest")
  ax.set_title(title, fontsize=8)
  for labels, set_ticks in ((x_labels, ax.set_xticks),
                            (y_labels, ax.set_yticks)):
    if labels is None:
      set_ticks([])
    else:
      kw = {"rotation": 90} if set_ticks == ax.set_xticks else {}
      set_ticks(range(len(labels)), list(labels), fontsize=6, **kw)


def token_labels(task, ids) -> List[str]:
  """One printable label per id (``·`` for padding, ``␣`` for a space)."""
  return [(task.decode([int(t)]) or "·").replace(" ", "␣") for t in ids]

