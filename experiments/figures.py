r"""Draws the pictures of the README's guide to attention (command line).

    python -m experiments.figures                          # docs/figures/guide_*.png
    python -m experiments.figures --only=masking,variants  # some of them
    python -m experiments.figures --reverse_workdir=runs/reverse
    python -m experiments.figures --fast --output_dir=/tmp/figures   # CI check

The pictures themselves are in :mod:`experiments.guide`. The model pictures
come from short training runs (:mod:`experiments.guide.runs`): a run is
trained into ``--workdir_root/<run>`` unless that directory (or the one
given with ``--<run>_workdir``) already holds a finished run, whose *best*
checkpoint is then loaded; it must come from the same config file with the
same model sizes. The benchmark picture runs :mod:`experiments.bench` in a
small configuration, or plots an existing ``results.json``
(``--benchmark_json``). The command prints, for each picture, the numbers it
shows.

``--fast`` checks the whole pipeline in seconds: tiny shapes and freshly
initialised models; its pictures show the layout, not learned behaviour.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

from experiments.guide import DEFAULT_OUTPUT_DIR
from experiments.guide import DEFAULT_WORKDIR_ROOT
from experiments.guide import FIGURES
from experiments.guide import make_figures


_RUN_FLAGS = ("reverse", "dates", "digits_vit")    # --<run>_workdir


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this command's flags on ``flag_values``."""
  fv = flag_values
  flags.DEFINE_bool("fast", False, "Tiny shapes and untrained models: checks "
                    "the pipeline in seconds (CI).", flag_values=fv)
  flags.DEFINE_string("output_dir", DEFAULT_OUTPUT_DIR,
                      "Where guide_<name>.png go.", flag_values=fv)
  flags.DEFINE_list("only", [], f"Figures to draw: {', '.join(FIGURES)} "
                    "(default all).", flag_values=fv)
  flags.DEFINE_string("workdir_root", None, "Where the training runs go "
                      f"(default {DEFAULT_WORKDIR_ROOT}; a temporary "
                      "directory with --fast).", flag_values=fv)
  for run in _RUN_FLAGS:
    flags.DEFINE_string(f"{run}_workdir", None, f"An existing {run} run "
                        f"(configs/{run}.py) to load instead of "
                        f"<workdir_root>/{run}.", flag_values=fv)
  flags.DEFINE_string("benchmark_json", None, "Plot this experiments."
                      "benchmark results.json instead of running a small "
                      "benchmark.", flag_values=fv)


def config_from_flags(fv: flags.FlagValues) -> ml_collections.ConfigDict:
  """The keyword arguments of :func:`make_figures` given by the flags."""
  return ml_collections.ConfigDict(dict(
      output_dir=fv.output_dir, fast=fv.fast, only=tuple(fv.only),
      workdir_root=fv.workdir_root, benchmark_json=fv.benchmark_json,
      workdirs={run: fv[f"{run}_workdir"].value for run in _RUN_FLAGS
                if fv[f"{run}_workdir"].value}))


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` for unknown figure names or a missing file."""
  unknown = sorted(set(config.only) - set(FIGURES))
  if unknown:
    raise ValueError(f"unknown figure(s) {unknown}; figures: {list(FIGURES)}")
  if config.benchmark_json and not os.path.exists(config.benchmark_json):
    raise ValueError(f"--benchmark_json={config.benchmark_json}: no such "
                     "file")


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS
         ) -> None:
  """Parses nothing itself: ``flag_values`` -> :func:`make_figures`."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  logging.set_verbosity(logging.WARNING)      # no Orbax INFO chatter
  config = config_from_flags(flag_values)
  validate_config(config)
  make_figures(**config.to_dict())


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  app.run(functools.partial(main, flag_values=flags.FLAGS))
