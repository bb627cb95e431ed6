r"""What the training loop costs on top of the bare jitted step.

Two timings of the same compiled train step of a config, in one process:

* **bare**: ``steps`` steps on batches made and placed on the devices
  beforehand, dispatched back to back (asynchronous dispatch), one
  ``block_until_ready`` at the end;
* **loop**: ``experiments.train.train_and_evaluate`` itself, timed between
  two of its own synchronisation points (the log steps ``steps`` and
  ``2·steps``, where metrics leave the device), with no evaluation,
  checkpoint or figure in between: host batches, prefetching, metrics and
  the progress bar included.

``overhead = loop / bare - 1``. Usage::

  python -m experiments.bench.loop --config=configs/reverse.py \
      --steps=50 --repeats=3
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Dict, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from attn import parallel
from experiments import config_validation
from experiments import metrics_io
from experiments import train


def _loop_config(config: ml_collections.ConfigDict, steps: int):
  c = ml_collections.ConfigDict(config.to_dict())
  c.num_train_steps = 2 * steps
  c.log_every_steps = steps
  c.eval_every_steps = c.checkpoint_every_steps = 2 * steps
  c.warmup_steps = min(c.warmup_steps, steps)
  c.figures.enabled = False
  c.num_eval_examples = c.eval_batch_size = min(c.eval_batch_size, 8)
  return config_validation.prepare(c)


def bare_step_seconds(config, steps: int) -> float:
  """Seconds per step of the jitted train step on pre-made device batches."""
  task = config_validation.make_task(config)
  mesh = parallel.make_mesh(**config.mesh)
  with jax.set_mesh(mesh):
    _, train_step, state = train.start_training(config, task, mesh, "bare step")
    batches = [train.host_batch(task, mesh, s, config.batch_size)
               for s in range(steps)]
    state, _ = train_step(state, batches[0])          # compile, warm up
    jax.block_until_ready(state)
    begin = time.perf_counter()
    for batch in batches:
      state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - begin) / steps


def loop_step_seconds(config, steps: int) -> float:
  """Seconds per step inside ``train_and_evaluate``, between its log steps
  ``steps`` and ``2·steps``."""
  stamps: Dict[int, float] = {}
  original = metrics_io.Progress.update

  def update(progress, step, loss):
    original(progress, step, loss)
    stamps[step] = time.perf_counter()
  metrics_io.Progress.update = update
  try:
    with tempfile.TemporaryDirectory() as workdir:
      train.train_and_evaluate(config, workdir)
  finally:
    metrics_io.Progress.update = original
  return (stamps[2 * steps] - stamps[steps]) / steps


def measure(config, steps: int = 50, repeats: int = 3) -> Dict[str, float]:
  """Median seconds per step, bare and in the loop, and the overhead."""
  config = _loop_config(config, steps)
  bare, loop = [], []
  for _ in range(repeats):  # interleaved, so drift hits both alike
    bare.append(bare_step_seconds(config, steps))
    loop.append(loop_step_seconds(config, steps))
  b, l = statistics.median(bare), statistics.median(loop)
  return {"bare_ms": 1e3 * b, "loop_ms": 1e3 * l, "overhead": l / b - 1}


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax's INFO lines, as main
  config = ml_collections.ConfigDict(FLAGS.config.to_dict())
  result = measure(config, FLAGS.steps, FLAGS.repeats)
  print(f"{config.task.name}: bare step {result['bare_ms']:.2f} ms, in the "
        f"loop {result['loop_ms']:.2f} ms, overhead "
        f"{100 * result['overhead']:+.1f}% (median of {FLAGS.repeats}, "
        f"{FLAGS.steps} steps each)")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  flags.DEFINE_integer("steps", 50, "Steps per timing window.")
  flags.DEFINE_integer("repeats", 3, "Interleaved repeats (median).")
  flags.mark_flag_as_required("config")
  app.run(main)
