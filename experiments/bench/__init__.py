"""The kernel benchmark: time, memory, FLOP/s and accuracy of attention.

``variants``  what is benchmarked: the baselines and registry spec strings;
``measure``   one cell: FLOPs, the float32 reference, timing, XLA memory;
``sweep``     every cell of a ``configs/benchmark.py`` config, same-run ratios;
``report``    log-log slopes and the CSV, JSON, markdown and PNG outputs.

The command line is ``python -m experiments.benchmark`` (thin: flags ->
:func:`run_benchmark` -> :func:`write_outputs`).
"""

from experiments.bench.report import write_outputs
from experiments.bench.sweep import run_benchmark
from experiments.bench.variants import BASELINES, Variant

__all__ = ["BASELINES", "Variant", "run_benchmark", "write_outputs"]
