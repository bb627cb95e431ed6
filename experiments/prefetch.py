"""Training batches made on a background thread, ahead of the device.

The training loop dispatches a step and immediately asks for the next batch;
while the device computes, this thread is already building (and placing on
the devices) the batches that follow, so the host's input pipeline is off
the critical path. Batches are a pure function of the step
(``task.batch("train", step, ...)``), so running ahead changes no number.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable


class Prefetcher:
  """``make(step)`` for ``step = start, start + 1, ... < stop``, ``depth``
  batches ahead on a daemon thread (``depth=0``: made on demand, no thread).

  :meth:`get` must be called with consecutive steps; an exception raised by
  ``make`` (a malformed data file, a ``KeyboardInterrupt`` from a test) is
  re-raised by the :meth:`get` of the step that raised it, so the loop stops
  at the same step as it would without prefetching. :meth:`close` stops the
  thread (also on errors).
  """

  def __init__(self, make: Callable[[int], Any], start: int, stop: int,
               depth: int = 2):
    self._make, self._next, self._depth = make, start, depth
    self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
    self._closed = threading.Event()
    self._thread = None
    if depth > 0 and start < stop:
      self._thread = threading.Thread(target=self._produce,
                                      args=(start, stop), daemon=True,
                                      name="attn-prefetch")
      self._thread.start()

  def _produce(self, start: int, stop: int) -> None:
    for step in range(start, stop):
      try:
        item = (step, self._make(step), None)
      except BaseException as e:  # pylint: disable=broad-except
        item = (step, None, e)    # handed to the consumer, raised there
      while not self._closed.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if self._closed.is_set() or item[2] is not None:
        return

  def get(self, step: int) -> Any:
    """The batch of ``step`` (the step after the previous call's)."""
    if step != self._next:
      raise ValueError(f"Prefetcher.get({step}): expected step {self._next}")
    self._next += 1
    if self._thread is None:
      return self._make(step)
    got, batch, error = self._queue.get()
    assert got == step, (got, step)
    if error is not None:
      self.close()
      raise error
    return batch

  def close(self) -> None:
    """Stops the thread; batches made ahead are dropped."""
    self._closed.set()
    if self._thread is not None:
      while True:  # unblock a producer waiting on a full queue
        try:
          self._queue.get_nowait()
        except queue.Empty:
          break
      self._thread.join(timeout=5.0)
      self._thread = None
