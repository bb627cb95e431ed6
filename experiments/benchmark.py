r"""Kernel benchmark: time, memory, FLOP/s and accuracy of attention variants.

Usage (one convention: a config file, optionally with a preset, and
``--config.<field>`` overrides)::

  python -m experiments.benchmark --config=configs/benchmark.py:quick  # CI
  python -m experiments.benchmark --config=configs/benchmark.py:peers
  python -m experiments.benchmark --config=configs/benchmark.py:training \
      --config.variants=softmax,linear --config.seq_lens='(512,2048)'
  python -m experiments.benchmark --config=configs/benchmark.py \
      --config.variants=xla,chunked --config.seq_lens='(1024,2048,4096)' \
      --config.causal='(False,True)' --config.repeats=3

Without ``--config`` the defaults of ``configs/benchmark.py`` (the README's
CPU sweep) are used; ``--config.<field>`` overrides still apply. What is
measured, and how, is described in :mod:`experiments.bench`; the outputs
(``results.csv``, ``results.json``, ``summary.md`` and three PNGs) go to
``config.output_dir``. ``config.kind="training"`` (the ``training``
preset) times TransformerLM training steps instead
(:mod:`experiments.bench.training`).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from configs import benchmark as benchmark_config
from experiments import metrics_io
from experiments.bench.report import write_outputs
from experiments.bench.report import write_training_outputs
from experiments.bench.training import run_training_benchmark
from experiments.bench.training import validate_training
from experiments.bench.variants import resolve_variants
from experiments.bench.sweep import run_benchmark
from experiments.bench.sweep import validate_config

__all__ = ["define_flags", "config_from_flags", "validate_config", "check",
           "main"]

DEFAULT_CONFIG = os.path.abspath(benchmark_config.__file__)


def define_flags(flag_values: flags.FlagValues,
                 argv: Optional[List[str]] = None) -> None:
  """Defines ``--config`` (and its ``--config.<field>`` overrides).

  ``argv`` is the full command line the overrides are read from (``None``:
  ``sys.argv``).
  """
  config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "Benchmark config file (default "
      "configs/benchmark.py); 'configs/benchmark.py:quick' selects the "
      "quick preset. Fields are overridden with --config.<field>=...",
      flag_values=flag_values, sys_argv=argv)


def config_from_flags(fv: flags.FlagValues) -> ml_collections.ConfigDict:
  """The parsed ``--config`` (overrides applied), as an unlocked copy."""
  return ml_collections.ConfigDict(fv.config.to_dict())


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming what is wrong with a benchmark config
  (bad field values, unknown variants, an experiment that cannot be
  benchmarked), before anything is measured."""
  if config.kind == "training":
    validate_training(config)
  elif config.kind == "kernels":
    validate_config(config)
    resolve_variants(config.variants, config.baselines)
  else:
    raise ValueError(f"unknown kind {config.kind!r}; kinds: 'kernels', "
                     "'training'")


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
  try:
    check(config)
  except ValueError as e:
    # A mistake in the command line: one line, no traceback.
    print(f"error: invalid benchmark config: {metrics_io.one_line(e)}",
          file=sys.stderr)
    sys.exit(1)
  if config.kind == "training":
    logging.set_verbosity(logging.WARNING)   # the training loop's INFO lines
    rows = run_training_benchmark(config)
    paths = write_training_outputs(rows, config, command)
  else:
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
