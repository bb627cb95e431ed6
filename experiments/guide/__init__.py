"""The pictures of the README's guide to attention, from real code and runs.

``kernel_figures``   the library's functions, no training;
``model_figures``    short training runs (``runs``) and their best checkpoints;
``benchmark_figure`` a small :mod:`experiments.bench` run (or a results.json);
``context``          where pictures go, and the shared drawing helpers.

:func:`make_figures` draws them (:data:`FIGURES` names them); the command
line is ``python -m experiments.figures``.

Every picture is drawn from the library's own kernels, modules and models,
and returns the numbers it shows (variances, errors, accuracies, timings);
the README quotes them. ``fast=True`` checks the whole pipeline in seconds:
tiny shapes, freshly initialised models (only one glimpse network is
trained, for two steps, so that training and checkpoint loading run too)
and a two-length benchmark. Its pictures show the layout, not learned
behaviour.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Sequence

from experiments.guide import benchmark_figure as bench_fig
from experiments.guide import kernel_figures as kernel
from experiments.guide import model_figures as model
from experiments.guide.context import Context, DEFAULT_OUTPUT_DIR
from experiments.guide.runs import DEFAULT_WORKDIR_ROOT, RUNS

__all__ = ["FIGURES", "RUNS", "DEFAULT_OUTPUT_DIR", "DEFAULT_WORKDIR_ROOT",
           "make_figures"]

FIGURES: Dict[str, Callable[[Context], Dict[str, Any]]] = {
    "sinusoidal": kernel.sinusoidal_figure,
    "scaled_dot": kernel.scaled_dot_figure,
    "masking": kernel.masking_figure,
    "causal_vs_full": kernel.causal_vs_full_figure,
    "variants": kernel.variants_figure,
    "nadaraya_watson": kernel.nadaraya_watson_figure,
    "encoder_decoder": model.encoder_decoder_figure,
    "heads": model.heads_figure,
    "dates_alignment": model.dates_alignment_figure,
    "embeddings": model.embeddings_figure,
    "vit_saliency": model.vit_saliency_figure,
    "glimpse": model.glimpse_figure,
    "benchmark": bench_fig.benchmark_figure,
}


def _fmt(facts: Dict[str, Any]) -> str:
  parts = []
  for k, v in facts.items():
    if k == "path":
      continue
    parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
  return " ".join(parts)


def make_figures(output_dir: str = DEFAULT_OUTPUT_DIR, *, fast: bool = False,
                 only: Optional[Sequence[str]] = None,
                 workdir_root: Optional[str] = None,
                 workdirs: Optional[Dict[str, str]] = None,
                 benchmark_json: Optional[str] = None,
                 log: Callable[[str], None] = print
                 ) -> Dict[str, Dict[str, Any]]:
  """Draws the guide's pictures into ``output_dir/guide_<name>.png``.

  Args:
    output_dir: where the PNGs go.
    fast: tiny shapes and untrained models (CI); see the module docstring.
    only: names of :data:`FIGURES` to draw (default: all).
    workdir_root: where training runs live (default ``runs/figures``; with
      ``fast``, a temporary directory that is removed afterwards).
    workdirs: run name (a key of :data:`RUNS`) -> existing workdir to load.
    benchmark_json: plot this benchmark ``results.json`` instead of running.
    log: called with one line of numbers per picture.

  Returns:
    ``{name: facts}``; ``facts["path"]`` is the PNG, the other entries are
    the numbers the picture shows.

  Raises:
    ValueError: an unknown figure or run name.
  """
  names = list(only) if only else list(FIGURES)
  unknown = sorted(set(names) - set(FIGURES))
  if unknown:
    raise ValueError(f"unknown figure(s) {unknown}; figures: {list(FIGURES)}")
  bad_runs = sorted(set(workdirs or {}) - set(RUNS))
  if bad_runs:
    raise ValueError(f"unknown run(s) {bad_runs}; runs: {list(RUNS)}")
  with tempfile.TemporaryDirectory(prefix="attn_figures_") as tmp:
    root = workdir_root or (tmp if fast else DEFAULT_WORKDIR_ROOT)
    ctx = Context(output_dir=output_dir, fast=fast, workdir_root=root,
                  workdirs=dict(workdirs or {}),
                  benchmark_json=benchmark_json)
    results = {}
    for name in names:
      start = time.process_time()
      results[name] = FIGURES[name](ctx)
      log(f"{os.path.basename(results[name]['path'])} "
          f"({time.process_time() - start:.0f} s CPU): {_fmt(results[name])}")
  return results
