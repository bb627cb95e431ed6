"""What every guide picture shares: where it goes, the runs, drawing helpers."""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image

from experiments import plots
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
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, bbox_inches=plots.bbox_inches(fig))
    plt.close(fig)
    # A 256-colour palette: the committed PNGs stay small (a third of the
    # bytes) and look the same.
    image = Image.open(buffer).convert("RGB")
    image.quantize(256).save(path, optimize=True)
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
            vmax=None, cmap: str = "viridis", gamma: float = 1.0,
            vmin: float = 0.0):
  """``w[rows, cols]`` as an image; returns it (for :func:`colorbar`).

  Position indices on the axes, tokens (``x_labels``/``y_labels``) on the
  top/right axes, as in the pictures every run draws
  (:func:`experiments.plots.position_ticks`). Pass the same ``vmax`` to
  every panel of a figure so that one colour bar reads them all; ``gamma <
  1`` brightens small values (a power-law colour scale).
  """
  w = np.asarray(w, np.float32)
  norm = matplotlib.colors.PowerNorm(gamma, vmin=vmin, vmax=vmax)
  image = ax.imshow(w, cmap=cmap, norm=norm, aspect="auto",
                    interpolation="nearest")
  ax.set_title(title, fontsize=8)
  plots.position_ticks(ax, w.shape[1], x_labels, "x")
  plots.position_ticks(ax, w.shape[0], y_labels, "y")
  return image


def colorbar(fig, axes, image, label: str = "attention weight"):
  """One colour bar for ``axes`` (the panels drawn on ``image``'s scale)."""
  bar = fig.colorbar(image, ax=list(np.ravel(axes)), shrink=0.85)
  bar.set_label(label, fontsize=8)
  bar.ax.tick_params(labelsize=8)
  return bar


def token_labels(task, ids) -> List[str]:
  """One printable label per id (``·`` for padding, ``␣`` for a space)."""
  return [(task.decode([int(t)]) or "·").replace(" ", "␣") for t in ids]

