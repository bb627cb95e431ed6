"""Where metrics go: ``workdir/metrics.jsonl``, TensorBoard, and the console.

Console output (:class:`Progress`) is a tqdm progress bar (phase, steps/s,
current loss) when stderr is a terminal, log lines otherwise; the run's log
lines (:func:`get_logger`) go through the bar's writer while it is open.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, Mapping, Optional

import logging


class _ConsoleHandler(logging.Handler):
  """Writes each record to the ``sys.stderr`` of the moment (not the one at
  import, so a redirected or captured stderr gets the lines too), flushed
  at once whether or not it is a terminal; while a :class:`Progress` bar is
  open, through the bar's own writer (``tqdm.write``), so that a line never
  lands on the bar."""

  def emit(self, record):
    try:
      message = self.format(record)
      bar = _open_bars[-1] if _open_bars else None
      if bar is not None:
        bar.write(message)
      else:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def one_line(error) -> str:
  """An exception (or message) as one line: whitespace and line breaks
  collapsed, the exception's type name if it has no message. Every
  ``error: ...`` line the commands print goes through this."""
  return " ".join(str(error).split()) or type(error).__name__


def get_logger() -> logging.Logger:
  """The experiments' own INFO logger ``attn.experiments`` (stderr).

  Independent of absl's level (absl is kept at WARNING so that library
  chatter such as Orbax's INFO lines does not drown the run's own
  messages), does not propagate to absl's root handler (no double lines),
  and prints whether or not stderr is a terminal.
  """
  log = logging.getLogger("attn.experiments")
  if not log.handlers:
    handler = _ConsoleHandler()
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


# Open Progress bars, newest last: the logger writes through the newest.
_open_bars: list["Progress"] = []


class Progress:
  """What the run is doing, from its first second.

  On a terminal (or ``bar=True``): a tqdm bar with steps/s, the current
  loss and the phase in front ("compiling" until the first step is done,
  "validating", "drawing figures"); every log line of the run goes through
  the bar's writer (:meth:`write`) while it is open. Otherwise: a line when
  compilation starts, one when the first step is done, then a line every
  ``log_every`` steps.

  Args:
    start: completed steps when the loop starts (a resumed run's step).
    total: the run's ``num_train_steps``.
    log_every: steps between lines when there is no bar.
    stream: where the bar goes (default ``sys.stderr``).
    bar: force the bar on/off (default: whether ``stream`` is a terminal).
  """

  def __init__(self, start: int, total: int, log_every: int, *,
               stream=None, bar: Optional[bool] = None):
    self.total, self.log_every = total, max(1, log_every)
    self.stream = sys.stderr if stream is None else stream
    self._bar = None
    self._start = start
    self._t0 = time.time()
    self._first_done = None  # (time, step) once the first step has run
    if bar is None:
      bar = bool(getattr(self.stream, "isatty", lambda: False)())
    if bar:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=start, unit="step",
                       file=self.stream, dynamic_ncols=True,
                       desc="compiling")
      _open_bars.append(self)
    if start < total:
      self.phase("compiling", f"step {start}/{total}: compiling the train "
                 "step (the first step includes compilation)")

  @property
  def bar(self):
    """The tqdm bar, or None."""
    return self._bar

  def write(self, message: str) -> None:
    """One line above the bar (``tqdm.write``), or on the stream."""
    if self._bar is not None:
      self._bar.write(message, file=self.stream)
    else:
      self.stream.write(message + "\n")
      self.stream.flush()

  def phase(self, name: Optional[str], line: Optional[str] = None) -> None:
    """Shows ``name`` in front of the bar (None: nothing); without a bar,
    logs ``line + " ..."`` if given."""
    if self._bar is not None:
      self._bar.set_description_str(name or "", refresh=True)
    elif line:
      get_logger().info("%s ...", line)

  def update(self, step: int, loss: Optional[float]):
    """``step`` is the number of completed steps; ``loss`` is None on steps
    whose metrics stay on the device (the bar counts them; lines and the
    loss shown wait for a step with a loss)."""
    now = time.time()
    if self._first_done is None:
      self._first_done = (now, step)
      get_logger().info("step %d done in %.1f s (compilation included)",
                        step, now - self._t0)
      self.phase(None)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if loss is not None:
        self._bar.set_postfix(loss=f"{loss:.4f}")
    elif loss is not None and (step % self.log_every == 0
                               or step == self.total):
      t, s = self._first_done
      rate = (step - s) / (now - t) if step > s and now > t else None
      get_logger().info("step %d/%d  loss %.4f%s", step, self.total, loss,
                        f"  {rate:.2f} steps/s" if rate else "")

  def close(self):
    if self._bar is not None:
      self._bar.close()
      if self in _open_bars:
        _open_bars.remove(self)
      self._bar = None
