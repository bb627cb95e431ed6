"""``train_and_evaluate(config, workdir)``: the training loop every task uses.

One jit-compiled train step and eval step, optax AdamW with warmup + cosine
or inverse-sqrt schedule and gradient clipping, Orbax checkpoints (latest-N
and best), data generated from ``(seed, step)`` so that a resumed run sees
exactly the batches an uninterrupted one would, metrics to
``metrics.jsonl`` + TensorBoard, and pictures in ``workdir/figures/``.

Run integrity (README "The training loop"): the workdir is locked for the
run's life (:mod:`experiments.workdir`), records the config and provenance
that made it and refuses a resume with a different config
(:mod:`experiments.provenance`); SIGTERM/SIGINT stop at the next step
boundary after saving a checkpoint of that step (:class:`Preempted`); a full
or read-only disk is one :class:`WorkdirError` naming the path.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import shutil
import signal
import tempfile
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from attn import parallel
from experiments import checkpoints
from experiments import config_validation
from experiments import metrics_io
from experiments import pictures
from experiments import prefetch
from experiments import problems
from experiments import report
from experiments import provenance
from experiments import workdir as workdir_lib
from experiments.checkpoints import Checkpointer, CheckpointError
from experiments.config_validation import ConfigError
from experiments.workdir import WorkdirError

logging = metrics_io.get_logger()

__all__ = ["train_and_evaluate", "init_state", "ConfigError",
           "CheckpointError", "NonFiniteLossError", "WorkdirError",
           "Preempted", "config_name"]


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class Preempted(Exception):
  """SIGTERM / SIGINT stopped the run at a step boundary, checkpoint saved.

  ``exit_code`` is 128 + the signal number (143 SIGTERM, 130 SIGINT).
  """

  def __init__(self, signum: int, step: int, path: str):
    self.signum, self.step, self.path = signum, step, path
    self.exit_code = 128 + signum
    super().__init__(
        f"stopped by {signal.Signals(signum).name} at step {step}; "
        f"checkpoint saved in {path}. Rerun the same command to resume")


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


def init_state(config, params) -> dict:
  """The train state ``{"step", "params", "opt_state"}`` for ``params``.

  Its structure is the one the checkpoints hold: pass it as the target of
  :func:`experiments.checkpoints.restore_best` / ``restore_latest``.
  """
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": make_optimizer(config).init(params)}


def _check_finite(step: int, metrics: dict, ckpt: Checkpointer, workdir):
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    last = ckpt.latest_step()
    raise NonFiniteLossError(
        f"training loss is {loss} at step {step}; stopping. The last good "
        f"checkpoint is step {last} in {checkpoints.latest_dir(workdir)}"
        if last is not None
        else f"training loss is {loss} at step {step}; stopping (no "
        "checkpoint was written yet). Try a lower learning_rate, "
        "grad_clip_norm > 0, or dtype=float32.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       explicit: Sequence[str] = ()) -> dict:
  """Trains, evaluates and draws; returns the best checkpoint's test metrics.

  Resumes from ``workdir/checkpoints/latest`` when present, after checking
  that ``workdir/config.json`` records the same experiment. ``explicit``:
  config field paths the user set (the command line's overrides), which
  ``config.runlocal`` does not shrink. Raises :class:`ConfigError` for a bad
  config (before any compilation: :func:`config_validation.prepare` and
  :func:`config_validation.check_runnable`) or one that differs from the
  workdir's, :class:`CheckpointError` for an unreadable checkpoint,
  :class:`NonFiniteLossError` for a NaN/inf loss, :class:`WorkdirError`
  when another run holds the workdir or it cannot be created or written,
  and :class:`Preempted` after SIGTERM/SIGINT.
  """
  config = config_validation.prepare(config, explicit)
  config_validation.check_runnable(config)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise workdir_lib.creation_error(e, workdir) from e
  lock = workdir_lib.RunLock(workdir)
  stop = _StopRequest()
  with workdir_lib.disk_errors(workdir):
    try:
      if _is_main_process():  # one lock per run: process 0 holds it
        lock.acquire()
        if lock.took_over is not None:
          logging.warning("took over the lock of a process that no longer "
                          "exists (%s)", lock.took_over)
      _sync_processes("lock")
      stop.install()
      if config.fresh_start:
        if _is_main_process():
          moved = workdir_lib.set_aside(workdir)
          if moved:
            logging.info("fresh_start: the previous run was moved to %s",
                         moved)
        _sync_processes("fresh_start")
      provenance.check_resume(workdir, config.to_dict())
      task = config_validation.make_task(config)
      mesh = parallel.make_mesh(data=config.mesh.data, seq=config.mesh.seq,
                                model=config.mesh.model)
      if config.batch_size % mesh.shape["data"]:
        raise ConfigError(f"batch_size={config.batch_size} is not divisible "
                          f"by the data-parallel size {mesh.shape['data']}")
      # Everything that runs the model happens under the mesh, so kernels
      # that need it (ring attention over the "seq" axis) find it.
      with jax.set_mesh(mesh):
        return _run(config, workdir, task, mesh, stop)
    finally:
      stop.restore()
      lock.release()


class _StopRequest:
  """SIGTERM / SIGINT handlers that ask the loop to stop at a step boundary.

  A second SIGINT raises KeyboardInterrupt at once. Installed only in the
  main thread (Python delivers signals there alone).
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning("%s received: stopping after this step",
                    signal.Signals(signum).name)

  def requested(self) -> int:
    """The signal number (agreed by all processes), or 0."""
    signum = self.signum or 0
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      signum = int(np.max(multihost_utils.process_allgather(
          np.int32(signum))))
    return signum

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def _is_main_process() -> bool:
  """Process 0 alone writes metrics and figures in a multi-process run."""
  return jax.process_index() == 0


def _sync_processes(name: str) -> None:
  """Barrier across the processes of a multi-process run (no-op for one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _draw(problem, params, task, workdir, step, writer=None,
          record_step=None):
  """``problem.draw`` on every process; only process 0's files are kept.

  Every process runs the drawing's model calls (they may be collective, e.g.
  ring attention over a multi-process mesh); the others draw into a scratch
  directory that is deleted. Process 0 records the attention summary as
  split ``attention`` through ``writer`` and the pictures as TensorBoard
  images, at ``record_step`` (default ``step``).
  """
  if _is_main_process():
    paths = problem.draw(params, task, workdir, step=step,
                         best_step=record_step)
    if writer is not None:
      at = step if record_step is None else record_step
      summary = getattr(problem, "attention_summary", None)
      if summary:
        writer.write(at, "attention", summary)
      pictures.log_images(workdir, paths, at)
    return paths
  scratch = tempfile.mkdtemp(prefix="attn-figures-")
  try:
    problem.draw(params, task, scratch, step=step, best_step=record_step)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return []


def host_batch(task, mesh, step, batch_size):
  """This host's rows of global batch ``step``, as global sharded arrays.

  The global batch is a pure function of (seed, step); each host keeps only
  the rows its devices hold (parallel.host_batch_slice), so hosts never train
  on the same examples.
  """
  start, size = parallel.host_batch_slice(batch_size, mesh)
  batch = task.batch("train", step, batch_size)
  rows = {k: v[start:start + size] for k, v in batch.items()}
  return parallel.shard_batch(rows, mesh)


# Fields that change neither the model, the data nor the optimizer: runs
# differing only in these share compiled functions (_compiled).
_NOT_COMPILED = ("log_every_steps", "eval_every_steps",
                 "checkpoint_every_steps", "keep_checkpoints", "figures",
                 "fresh_start", "runlocal", "prefetch_batches")
_COMPILED: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()


def _compiled(config, task, mesh):
  """``(problem, tx, train_step, init)``, reused by later runs of the same
  config in this process (a notebook, the guide, the tests), so they compile
  once (``init``: the jitted ``problem.init``; a fresh ``jax.jit`` of the
  bound method would compile again on every run)."""
  fields = {k: v for k, v in provenance.flatten(config.to_dict()).items()
            if not any(k == p or k.startswith(p + ".") for p in _NOT_COMPILED)}
  key = json.dumps([fields, [d.id for d in mesh.devices.flat],
                    list(mesh.shape.items())], sort_keys=True, default=str)
  if key not in _COMPILED:
    problem = problems.make_problem(config, task)
    _, dropout_rng = jax.random.split(jax.random.key(config.seed))
    tx = make_optimizer(config)
    train_step = jax.jit(functools.partial(_train_step, problem, tx,
                                           dropout_rng), donate_argnums=(0,))
    _COMPILED[key] = (problem, tx, train_step, jax.jit(problem.init))
    while len(_COMPILED) > 2:
      _COMPILED.popitem(last=False)
  _COMPILED.move_to_end(key)
  return _COMPILED[key]


def start_training(config, task, mesh, name: str = "run"):
  """``(problem, train_step, state)``: the (shared) jitted train step of
  ``config`` and its freshly initialised train state, replicated on
  ``mesh``. Call under ``jax.set_mesh(mesh)``; ``name`` labels the log."""
  problem, _, train_step, init = _compiled(config, task, mesh)
  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  first = task.batch("train", 0, config.batch_size)
  logging.info("%s: initialising %s for task %s ...", name,
               type(problem.model).__name__, task.name)
  # Jitted: one compilation instead of hundreds of op-by-op ones; the
  # models' initialisers give the same numbers either way
  # (attn.modules.embeddings.normal_init).
  state = init_state(config, init(init_rng, first))
  return problem, train_step, jax.device_put(state,
                                             parallel.replicated(mesh))


def _run(config, workdir, task, mesh, stop):
  """The loop proper (called under ``jax.set_mesh(mesh)``)."""
  problem, train_step, state = start_training(config, task, mesh, workdir)
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints,
                      best_metric=problem.best_metric,
                      best_mode=problem.best_mode)
  writer = progress = batches = None
  try:
    start, state = ckpt.restore_latest(state)
    start = int(start or 0)
    if start:
      logging.info("resumed from checkpoint step %d in %s", start,
                   checkpoints.latest_dir(workdir))
      state = jax.device_put(state, parallel.replicated(mesh))
    if _is_main_process():
      provenance.record_start(workdir, config.to_dict(), start)
      metrics_io.truncate_metrics(workdir, start)
    writer = metrics_io.MetricWriter(workdir, enabled=_is_main_process())
    progress = metrics_io.Progress(start, config.num_train_steps,
                                   config.log_every_steps)
    evaluated = False
    batches = prefetch.Prefetcher(
        lambda step: host_batch(task, mesh, step, config.batch_size),
        start, config.num_train_steps, depth=config.prefetch_batches)
    pending = []   # (step, metrics on the device) not yet fetched
    for step in range(start, config.num_train_steps):
      state, metrics = train_step(state, batches.get(step))
      done = step + 1
      pending.append((done, metrics))
      is_log = (done % config.log_every_steps == 0
                or done == config.num_train_steps)
      is_eval = (done % config.eval_every_steps == 0
                 or done == config.num_train_steps)
      draw = bool(config.figures.every_steps and config.figures.enabled
                  and done % config.figures.every_steps == 0)
      saves = is_eval or done % config.checkpoint_every_steps == 0
      signum = stop.requested()
      # Metrics leave the device only here, so the host never waits for a
      # step it has just dispatched; every step is checked for a finite loss
      # before anything is saved, logged or drawn.
      if done == start + 1 or is_log or saves or draw or signum:
        fetched, pending = jax.device_get(pending), []
        for s, m in fetched:
          _check_finite(s, m, ckpt, workdir)
        metrics = fetched[-1][1]
        progress.update(done, float(metrics["loss"]))
        if is_log:
          writer.write(done, "train", metrics)
      else:
        progress.update(done, None)
      if is_eval:
        progress.phase("validating", None if evaluated else
                       f"step {done}: first validation (compiles the eval "
                       "step)")
        valid = evaluate(problem, state["params"], task, "valid", config)
        evaluated = True
        writer.write(done, "valid", valid)
        logging.info("step %d valid %s", done, _fmt(valid))
        ckpt.save(done, state, valid)
        progress.phase(None)
      elif saves:
        ckpt.save(done, state)
      if draw:
        progress.phase("drawing figures",
                       f"step {done}: drawing figures into "
                       f"{os.path.join(workdir, 'figures', f'step_{done}')}")
        _draw(problem, state["params"], task, workdir, done, writer)
        progress.phase(None)
      if signum:
        ckpt.save(done, state)  # a no-op when this step was just saved
        raise Preempted(signum, done, checkpoints.latest_dir(workdir))
    progress.close()
    result = _final_evaluation(problem, task, ckpt, state, config, workdir,
                               writer, stop)
  finally:
    for close in (batches and batches.close, progress and progress.close,
                  writer and writer.close, ckpt.close):
      if close is not None:
        try:
          close()
        except Exception as e:  # pylint: disable=broad-except
          logging.warning("while closing: %s: %s", type(e).__name__, e)
  return result


def _fmt(metrics: dict) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))


def _final_evaluation(problem, task, ckpt, state, config, workdir, writer,
                      stop):
  step = int(state["step"])
  if stop.requested():  # the last step is saved (it is an eval step)
    raise Preempted(stop.requested(), step, checkpoints.latest_dir(workdir))
  best_step = ckpt.best_step()
  logging.info("final evaluation on the best checkpoint (step %s, by valid "
               "%s) ...", step if best_step is None else best_step,
               problem.best_metric)
  best_step, best = ckpt.restore_best(state)
  if best is None:
    best_step, best = int(state["step"]), state
  test = evaluate(problem, best["params"], task, "test", config)
  test["best_step"] = best_step
  if stop.requested():  # before the record: a rerun evaluates again
    raise Preempted(stop.requested(), step, checkpoints.latest_dir(workdir))
  writer.write(best_step, "test", test)
  logging.info("test metrics of the BEST checkpoint (step %d, by valid %s): "
               "%s", best_step, problem.best_metric, _fmt(test))
  if config.figures.enabled:
    logging.info("drawing figures of the best checkpoint into %s ...",
                 os.path.join(workdir, "figures"))
    paths = _draw(problem, best["params"], task, workdir, None, writer,
                  best_step)
    logging.info("figures written to %s", os.path.join(workdir, "figures"))
    test["figures"] = paths
  print(f"Finished. Best checkpoint: step {best_step}. Test metrics: "
        f"{_fmt({k: v for k, v in test.items() if isinstance(v, float)})}\n"
        f"Results: {metrics_io.metrics_path(workdir)}\n"
        f"Figures: {os.path.join(workdir, 'figures')}"
        + (f"\nReport: {report.write_report(workdir, config)}"
           if config.figures.enabled and _is_main_process() else ""))
  return test
