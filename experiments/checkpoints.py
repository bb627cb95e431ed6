"""Orbax checkpointing for training runs: latest-N plus best-by-metric.

Layout under ``workdir/checkpoints/`` (defined here alone: everything else
calls :func:`checkpoints_dir`, :func:`latest_dir`, :func:`best_dir`, the
:class:`Checkpointer` or :func:`restore_best`)::

    latest/<step>/   the newest ``keep`` checkpoints (resume from here)
    best/<step>/     the single checkpoint with the best eval metric

Every save is synchronous (a killed run never leaves a half-written "latest"
that it would resume from: Orbax writes to a temporary directory and renames
it on completion; leftover temporary directories are removed at the next
start). An evaluated step is saved to ``best`` (when it is the best) BEFORE
it is saved to ``latest``: a kill between the two leaves ``latest`` at the
previous checkpoint, the resumed run recomputes the step bit-identically and
finds it already in ``best``, so ``best`` is never behind ``latest``. A
checkpoint that exists but cannot be read raises :class:`CheckpointError`
naming it; nothing is silently restarted.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but is corrupt or incompatible with this run."""


def checkpoints_dir(workdir: str) -> str:
  """``workdir/checkpoints``: every checkpoint of a run."""
  return os.path.join(workdir, "checkpoints")


def latest_dir(workdir: str) -> str:
  """``workdir/checkpoints/latest``: the newest ``keep`` checkpoints."""
  return os.path.join(checkpoints_dir(workdir), "latest")


def best_dir(workdir: str) -> str:
  """``workdir/checkpoints/best``: the checkpoint with the best metric."""
  return os.path.join(checkpoints_dir(workdir), "best")


def _manager(directory: str, max_to_keep: int, best_metric: Optional[str],
             best_mode: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      best_fn=(lambda m: m[best_metric]) if best_metric else None,
      best_mode=best_mode,
      create=True,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpointer:
  """Saves/restores a train-state pytree: latest ``keep`` and the best one.

  Args:
    workdir: run directory; checkpoints go to ``workdir/checkpoints``.
    keep: how many of the latest checkpoints to keep.
    best_metric: eval-metric name that ranks checkpoints.
    best_mode: ``"max"`` or ``"min"``.
  """

  def __init__(self, workdir: str, *, keep: int, best_metric: str,
               best_mode: str = "max"):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.root = checkpoints_dir(workdir)
    self.best_metric = best_metric
    self._latest = _manager(latest_dir(workdir), keep, None, "max")
    self._best = _manager(best_dir(workdir), 1, best_metric, best_mode)

  def latest_step(self) -> Optional[int]:
    return self._latest.latest_step()

  def best_step(self) -> Optional[int]:
    return self._best.best_step()

  def save(self, step: int, state: Any, metrics: Optional[dict] = None):
    """Saves ``state`` as best if ``metrics`` beat it, then as the latest.

    A step already saved (by a run killed after saving it) is not saved
    again: the resumed run recomputed the same state.
    """
    if (metrics is not None and self.best_metric in metrics
        and step not in self._best.all_steps()):
      scalar = {k: float(v) for k, v in metrics.items()}
      self._best.save(step, args=ocp.args.StandardSave(state),
                      metrics=scalar, force=True)
      self._best.wait_until_finished()
    if step not in self._latest.all_steps():
      self._latest.save(step, args=ocp.args.StandardSave(state), force=True)
      self._latest.wait_until_finished()

  def restore_latest(self, target: Any):
    """``(step, state)`` of the latest checkpoint, or ``(None, target)``."""
    step = self.latest_step()
    if step is None:
      return None, target
    return step, _restore(self._latest, step, target, "latest")

  def restore_best(self, target: Any):
    """``(step, state)`` of the best checkpoint, or ``(None, None)``."""
    step = self.best_step()
    if step is None:
      return None, None
    return step, _restore(self._best, step, target, "best")

  def close(self):
    self._latest.close()
    self._best.close()


def restore_best(workdir: str, target: Any, *, best_metric: str,
                 best_mode: str = "max"):
  """``(step, state)`` of the best checkpoint of a finished run.

  Reads ``best_dir(workdir)`` only (the latest checkpoints are not opened).
  ``target`` is a train state of the run's structure (``train.py``'s
  ``{"step", "params", "opt_state"}``); ``best_metric``/``best_mode`` are the
  run's problem's. Returns ``(None, None)`` when there is none and raises
  :class:`CheckpointError` if it does not match ``target``.
  """
  manager = _manager(best_dir(workdir), 1, best_metric, best_mode)
  try:
    step = manager.best_step()
    if step is None:
      return None, None
    return step, _restore(manager, step, target, "best")
  finally:
    manager.close()


def restore_latest(workdir: str, target: Any):
  """``(step, state)`` of the latest checkpoint, or ``(None, None)``."""
  manager = _manager(latest_dir(workdir), 1 << 30, None, "max")
  try:
    step = manager.latest_step()
    if step is None:
      return None, None
    return step, _restore(manager, step, target, "latest")
  finally:
    manager.close()


# Orbax's coroutine that reads one array index of a checkpoint, and the
# warning Python gives when such a read, never started, is garbage-collected
# (a regular expression for ``warnings`` filters; tests/conftest.py uses it).
_ORBAX_READ = "_read_array_index_and_device_put"
ABANDONED_READ_WARNING = f"coroutine '{_ORBAX_READ}' was never awaited"


def _is_abandoned_read(unraisable) -> bool:
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  # A read left suspended is closed when it is garbage-collected: Orbax
  # turns the GeneratorExit into "Encountered error while reading array
  # index", which Python can only print.
  return (getattr(unraisable.object, "__name__", None) == _ORBAX_READ
          and isinstance(getattr(exc, "__cause__", None), GeneratorExit))


def _quiet_abandoned_reads() -> None:
  """Drops the errors of an abandoned restore's reads.

  When Orbax's restore fails (a corrupt or mismatched checkpoint) it closes
  its event loop while TensorStore reads are still in flight; each read
  that finishes later calls back into the closed loop ("Event loop is
  closed"), and each one left suspended raises when it is garbage-collected;
  Python prints either as a traceback, possibly much later. The restore has
  already failed with a :class:`CheckpointError` naming the checkpoint, so
  those tracebacks only bury the one line that matters. Every other
  unraisable exception still reaches the previous ``sys.unraisablehook``.
  """
  # A read never started only warns when it is garbage-collected.
  warnings.filterwarnings("ignore", message=ABANDONED_READ_WARNING,
                          category=RuntimeWarning)
  previous = sys.unraisablehook
  if getattr(previous, "_attn_quiet", False):
    return

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)
  hook._attn_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _restore(manager, step: int, target: Any, kind: str):
  path = os.path.join(str(manager.directory), str(step))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  _quiet_abandoned_reads()
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"cannot restore the {kind} checkpoint at {path}: "
        f"{type(e).__name__}: {str(e)[:300]}. It is corrupt or was written "
        "by a different model/config. Move it away, or rerun with "
        "--config.fresh_start=True to set the checkpoints aside (they are "
        "renamed, not deleted) and train from scratch.") from e
  _check_compatible(target, restored, path)
  return restored


def _check_compatible(target, restored, path):
  want = jax.tree.map(lambda x: (x.shape, str(x.dtype)), target)
  got = jax.tree.map(lambda x: (x.shape, str(x.dtype)), restored)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise CheckpointError(
        f"checkpoint at {path} does not match this model (different shapes, "
        "dtypes or structure). Use another --workdir, or rerun with "
        "--config.fresh_start=True to set it aside.")
