"""Where metrics go: ``workdir/metrics.jsonl``, TensorBoard, and the console.

Console output is a tqdm progress bar (steps/s, current loss) when stderr is
a terminal, periodic log lines otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, Mapping, Optional

import logging


def get_logger() -> logging.Logger:
  """The experiments' own INFO logger (stderr), independent of absl's level.

  absl is kept at WARNING so that library chatter (e.g. Orbax's INFO lines)
  does not drown the run's own messages.
  """
  log = logging.getLogger("attn.experiments")
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s",
                                           "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
  return log


def metrics_path(workdir: str) -> str:
  """``workdir/metrics.jsonl``: one JSON record per line."""
  return os.path.join(workdir, "metrics.jsonl")


def _scalar(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


class MetricWriter:
  """Appends ``{"step", "split", **metrics}`` records to metrics.jsonl and TB.

  With ``enabled=False`` (processes other than 0 of a multi-process run) it
  writes nothing, so that the run has one curve, written once.
  """

  def __init__(self, workdir: str, enable_tensorboard: bool = True,
               enabled: bool = True):
    self.path = metrics_path(workdir)
    self.enabled = enabled
    self._tb = None
    if enable_tensorboard and enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: Mapping[str, float]):
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")  # one write: torn only at the end
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, float):
          self._tb.add_scalar(f"{split}/{k}", v, int(step))
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All records of ``workdir/metrics.jsonl`` (empty list if none).

  A torn last line (a kill while it was being written) is dropped with a
  warning; an unreadable line before the last raises ``ValueError`` naming
  the file and line.
  """
  path = metrics_path(workdir)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().split("\n")
  records = []
  numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
  for n, (i, line) in enumerate(numbered):
    try:
      records.append(json.loads(line))
    except ValueError as e:
      if n == len(numbered) - 1:
        get_logger().warning("%s:%d: dropped a torn last line (%r)", path, i,
                             line[:60])
        break
      raise ValueError(f"{path}:{i} is not a JSON record ({e}); the file is "
                       "damaged before its last line") from e
  return records


def _rewrite(path: str, records: list[dict]) -> None:
  """Replaces ``path`` by ``records`` atomically (temporary file + rename)."""
  from experiments import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir_lib.atomic_write_text(
      path, "".join(json.dumps(r) + "\n" for r in records))


def truncate_metrics(workdir: str, after_step: int) -> None:
  """Keeps what a run resumed from checkpoint ``after_step`` must keep.

  Drops records past ``after_step`` (the resumed run writes them again), any
  ``test`` record (the final evaluation writes the one of the run) and a
  torn last line. The file is rewritten atomically, and only if it changes.
  """
  path = metrics_path(workdir)
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    before = f.read()
  kept = [r for r in read_metrics(workdir)
          if r.get("step", 0) <= after_step and r.get("split") != "test"]
  if "".join(json.dumps(r) + "\n" for r in kept).encode() != before:
    _rewrite(path, kept)


def final_test_metrics(workdir: str) -> Optional[Dict[str, Any]]:
  """The last ``split == "test"`` record of ``workdir/metrics.jsonl``.

  ``None`` when the file does not exist or holds no test record (the run
  has not finished).
  """
  tests = [r for r in read_metrics(workdir) if r.get("split") == "test"]
  return tests[-1] if tests else None


class Progress:
  """A progress bar on a terminal; log lines every ``log_every`` otherwise."""

  def __init__(self, start: int, total: int, log_every: int):
    self.total, self.log_every = total, max(1, log_every)
    self._bar = None
    self._t0, self._s0 = time.time(), start
    if sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=start, unit="step",
                       dynamic_ncols=True)

  def update(self, step: int, loss: float):
    """``step`` is the number of completed steps."""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{loss:.4f}")
    elif step % self.log_every == 0 or step == self.total:
      rate = (step - self._s0) / max(time.time() - self._t0, 1e-9)
      get_logger().info("step %d/%d  loss %.4f  %.2f steps/s", step, self.total,
                   loss, rate)

  def close(self):
    if self._bar is not None:
      self._bar.close()
