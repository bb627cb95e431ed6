"""``train_and_evaluate(config, workdir)``: the training loop every task uses.

One jit-compiled train step and eval step, optax AdamW with warmup + cosine
or inverse-sqrt schedule and gradient clipping, Orbax checkpoints (latest-N
and best), data generated from ``(seed, step)`` so that a resumed run sees
exactly the batches an uninterrupted one would, metrics to
``metrics.jsonl`` + TensorBoard, and pictures in ``workdir/figures/``.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from attn import parallel
from experiments import config_validation
from experiments import metrics_io
from experiments import problems
from experiments.checkpoints import Checkpointer, CheckpointError, set_aside
from experiments.config_validation import ConfigError

logging = metrics_io.get_logger()

__all__ = ["train_and_evaluate", "ConfigError", "CheckpointError",
           "NonFiniteLossError", "config_name"]


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


def config_name(path: str) -> str:
  """``configs/dates.py:tiny`` -> ``dates``."""
  base = os.path.basename(path.split(":")[0])
  return os.path.splitext(base)[0] or "run"


def make_schedule(config) -> optax.Schedule:
  """Linear warmup to ``learning_rate`` then cosine / inverse-sqrt / flat."""
  lr, warm = config.learning_rate, max(int(config.warmup_steps), 0)
  total = int(config.num_train_steps)
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warm, max(total, warm + 1), end_value=0.1 * lr)
  warmup = optax.linear_schedule(0.0, lr, max(warm, 1))
  if config.schedule == "inverse_sqrt":
    decay = lambda s: lr * jnp.sqrt(max(warm, 1) / jnp.maximum(
        s + max(warm, 1), 1.0))
  else:  # constant
    decay = optax.constant_schedule(lr)
  return optax.join_schedules([warmup, decay], [warm])


def make_optimizer(config) -> optax.GradientTransformation:
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(make_schedule(config),
                           weight_decay=config.weight_decay))
  return optax.chain(*parts)


def _train_step(problem, tx, base_rng, state, batch):
  """One optimizer step; dropout rng folded from the step (resumable)."""
  rng = jax.random.fold_in(base_rng, state["step"])
  (loss, metrics), grads = jax.value_and_grad(problem.loss, has_aux=True)(
      state["params"], batch, rng, True)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
  new_state = {"step": state["step"] + 1, "params": params,
               "opt_state": opt_state}
  return new_state, metrics


def evaluate(problem, params, task, split: str, config) -> dict:
  """Example-weighted means of ``problem.evaluate`` over a fixed eval set."""
  totals: dict[str, float] = {}
  count = 0
  for batch in task.eval_batches(split, config.eval_batch_size,
                                 config.num_eval_examples):
    n = len(next(iter(batch.values())))
    metrics = jax.device_get(problem.eval_step(params, batch))
    for k, v in metrics.items():
      totals[k] = totals.get(k, 0.0) + float(v) * n
    count += n
  return {k: v / max(count, 1) for k, v in totals.items()}


def _check_finite(step: int, metrics: dict, ckpt: Checkpointer):
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    last = ckpt.latest_step()
    raise NonFiniteLossError(
        f"training loss is {loss} at step {step}; stopping. The last good "
        f"checkpoint is step {last} in {ckpt.root}/latest" if last is not None
        else f"training loss is {loss} at step {step}; stopping (no "
        "checkpoint was written yet). Try a lower learning_rate, "
        "grad_clip_norm > 0, or dtype=float32.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict:
  """Trains, evaluates and draws; returns the best checkpoint's test metrics.

  Resumes from ``workdir/checkpoints/latest`` when present. Raises
  :class:`ConfigError` for a bad config (before any compilation),
  :class:`CheckpointError` for an unreadable checkpoint, and
  :class:`NonFiniteLossError` for a NaN/inf loss.
  """
  config = config_validation.prepare(config)
  os.makedirs(workdir, exist_ok=True)
  if config.fresh_start:
    if _is_main_process():
      moved = set_aside(workdir)
      if moved:
        logging.info("fresh_start: previous checkpoints moved to %s", moved)
    _sync_processes("fresh_start")
  task = config_validation.make_task(config)
  mesh = parallel.make_mesh(data=config.mesh.data, seq=config.mesh.seq,
                            model=config.mesh.model)
  if config.batch_size % mesh.shape["data"]:
    raise ConfigError(f"batch_size={config.batch_size} is not divisible by "
                      f"the data-parallel size {mesh.shape['data']}")
  problem = problems.make_problem(config, task)
  # Everything that runs the model happens under the mesh, so kernels that
  # need it (ring attention over the "seq" axis) find it.
  with jax.set_mesh(mesh):
    return _run(config, workdir, task, mesh, problem)


def _is_main_process() -> bool:
  """Process 0 alone writes metrics and figures in a multi-process run."""
  return jax.process_index() == 0


def _sync_processes(name: str) -> None:
  """Barrier across the processes of a multi-process run (no-op for one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _draw(problem, params, task, workdir, step):
  """``problem.draw`` on every process; only process 0's files are kept.

  Every process runs the drawing's model calls (they may be collective, e.g.
  ring attention over a multi-process mesh); the others draw into a scratch
  directory that is deleted.
  """
  if _is_main_process():
    return problem.draw(params, task, workdir, step=step)
  scratch = tempfile.mkdtemp(prefix="attn-figures-")
  try:
    problem.draw(params, task, scratch, step=step)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return []


def _host_batch(task, mesh, step, batch_size):
  """This host's rows of global batch ``step``, as global sharded arrays.

  The global batch is a pure function of (seed, step); each host keeps only
  the rows its devices hold (parallel.host_batch_slice), so hosts never train
  on the same examples.
  """
  start, size = parallel.host_batch_slice(batch_size, mesh)
  batch = task.batch("train", step, batch_size)
  rows = {k: v[start:start + size] for k, v in batch.items()}
  return parallel.shard_batch(rows, mesh)


def _run(config, workdir, task, mesh, problem):
  """The loop proper (called under ``jax.set_mesh(mesh)``)."""
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  first = task.batch("train", 0, config.batch_size)
  params = problem.init(init_rng, first)
  tx = make_optimizer(config)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": tx.init(params)}
  state = jax.device_put(state, parallel.replicated(mesh))
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints,
                      best_metric=problem.best_metric,
                      best_mode=problem.best_mode)
  start, state = ckpt.restore_latest(state)
  start = int(start or 0)
  if start:
    logging.info("resumed from checkpoint step %d in %s", start, ckpt.root)
    state = jax.device_put(state, parallel.replicated(mesh))
  if _is_main_process():
    metrics_io.truncate_metrics(workdir, start)
  writer = metrics_io.MetricWriter(workdir, enabled=_is_main_process())
  train_step = jax.jit(functools.partial(_train_step, problem, tx,
                                         dropout_rng), donate_argnums=(0,))
  progress = metrics_io.Progress(start, config.num_train_steps,
                                 config.log_every_steps)
  try:
    for step in range(start, config.num_train_steps):
      batch = _host_batch(task, mesh, step, config.batch_size)
      state, metrics = train_step(state, batch)
      metrics = jax.device_get(metrics)
      _check_finite(step + 1, metrics, ckpt)
      done = step + 1
      progress.update(done, float(metrics["loss"]))
      if done % config.log_every_steps == 0 or done == config.num_train_steps:
        writer.write(done, "train", metrics)
      is_eval = (done % config.eval_every_steps == 0
                 or done == config.num_train_steps)
      if is_eval:
        valid = evaluate(problem, state["params"], task, "valid", config)
        writer.write(done, "valid", valid)
        logging.info("step %d valid %s", done, _fmt(valid))
        ckpt.save(done, state, valid)
      elif done % config.checkpoint_every_steps == 0:
        ckpt.save(done, state)
      if (config.figures.every_steps and config.figures.enabled
          and done % config.figures.every_steps == 0):
        _draw(problem, state["params"], task, workdir, done)
    progress.close()
    result = _final_evaluation(problem, task, ckpt, state, config, workdir,
                               writer)
  finally:
    progress.close()
    writer.close()
    ckpt.close()
  return result


def _fmt(metrics: dict) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))


def _final_evaluation(problem, task, ckpt, state, config, workdir, writer):
  best_step, best = ckpt.restore_best(state)
  if best is None:
    best_step, best = int(state["step"]), state
  test = evaluate(problem, best["params"], task, "test", config)
  test["best_step"] = best_step
  writer.write(best_step, "test", test)
  logging.info("test metrics of the BEST checkpoint (step %d, by valid %s): "
               "%s", best_step, problem.best_metric, _fmt(test))
  if config.figures.enabled:
    paths = _draw(problem, best["params"], task, workdir, None)
    logging.info("figures written to %s", os.path.join(workdir, "figures"))
    test["figures"] = paths
  print(f"Finished. Best checkpoint: step {best_step}. Test metrics: "
        f"{_fmt({k: v for k, v in test.items() if isinstance(v, float)})}\n"
        f"Results: {os.path.join(workdir, 'metrics.jsonl')}\n"
        f"Figures: {os.path.join(workdir, 'figures')}")
  return test
