"""The workdir as a record of one run: its lock, and setting a run aside.

Layout (with :mod:`experiments.checkpoints`, :mod:`experiments.metrics_io`
and :mod:`experiments.provenance`)::

    workdir/lock              {"pid", "host", "started"} of the running process
    workdir/config.json       the resolved config that made the run
    workdir/provenance.jsonl  one record per start: command line, versions...
    workdir/checkpoints/      latest/ and best/
    workdir/metrics.jsonl     train / valid / test records
    workdir/tensorboard/      event files
    workdir/figures/          pictures
    workdir/set_aside/<time>/ a previous run moved away by fresh_start

Every error here is a :class:`WorkdirError` whose message is one line naming
the path and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from typing import Iterator, Optional

LOCK_NAME = "lock"
SET_ASIDE = "set_aside"
# What a previous run consists of (fresh_start moves all of it together).
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "figures",
             "config.json", "provenance.jsonl")


class WorkdirError(RuntimeError):
  """The workdir is locked by another run, unwritable, or full."""


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_NAME)


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename.

  A reader (or a kill at any instant) sees the old content or the new one,
  never a mixture; the temporary file is removed if the write fails.
  """
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _read_lock(path: str) -> Optional[dict]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


class RunLock:
  """An exclusive lock on a workdir for the life of one run.

  ``acquire`` creates ``workdir/lock`` atomically (``O_CREAT | O_EXCL``). A
  lock held by a live process raises :class:`WorkdirError` naming its pid and
  host; one left by a process that no longer exists on this host is taken
  over (with a log line). A lock written on another host cannot be checked
  and is respected: the message says how to remove it if that run is dead.
  """

  def __init__(self, workdir: str):
    self.path = lock_path(workdir)
    self.held = False
    self.took_over: Optional[dict] = None

  def acquire(self) -> "RunLock":
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = _read_lock(self.path)
        if holder is None:  # torn or being written: look again shortly
          time.sleep(0.2)
          holder = _read_lock(self.path)
        if holder is not None and not self._stale(holder, me["host"]):
          raise WorkdirError(
              f"{os.path.dirname(self.path) or '.'} is in use by another run "
              f"(pid {holder.get('pid')} on host {holder.get('host')}, "
              f"started {holder.get('started')}); wait for it, use another "
              f"--workdir, or remove {self.path} if that process is gone")
        self.took_over = holder or {}
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.path)
        continue
      except OSError as e:
        raise disk_error(e, self.path) from e
      try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
          json.dump(me, f)
      except OSError as e:
        with contextlib.suppress(OSError):
          os.remove(self.path)
        raise disk_error(e, self.path) from e
      self.held = True
      return self
    raise WorkdirError(f"could not take the lock {self.path}; another run "
                       "keeps taking it")

  @staticmethod
  def _stale(holder: dict, host: str) -> bool:
    pid = holder.get("pid")
    return (holder.get("host") == host and isinstance(pid, int)
            and pid != os.getpid() and not _pid_alive(pid))

  def release(self) -> None:
    if self.held:
      self.held = False
      holder = _read_lock(self.path)
      if holder is None or holder.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
          os.remove(self.path)


def set_aside(workdir: str) -> Optional[str]:
  """Moves the previous run (:data:`RUN_FILES`) to ``set_aside/<time>/``.

  Everything of it moves together, by renames on the same file system:
  nothing is copied, truncated or deleted. Returns the new folder, or
  ``None`` when there was nothing to move.
  """
  present = [n for n in RUN_FILES if os.path.lexists(os.path.join(workdir, n))]
  present += [n for n in os.listdir(workdir)
              if n.startswith("checkpoints.set_aside.")] if os.path.isdir(
                  workdir) else []
  if not present:
    return None
  stamp = time.strftime("%Y%m%d-%H%M%S")
  dest = os.path.join(workdir, SET_ASIDE, stamp)
  n = 1
  while os.path.exists(dest):
    n += 1
    dest = os.path.join(workdir, SET_ASIDE, f"{stamp}-{n}")
  try:
    os.makedirs(dest)
    for name in present:
      os.rename(os.path.join(workdir, name), os.path.join(dest, name))
  except OSError as e:
    raise disk_error(e, dest) from e
  return dest


_DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.EDQUOT, errno.EIO)


def find_disk_error(e: BaseException) -> Optional[OSError]:
  """The OSError (full disk, read-only, no permission) behind ``e``, if any.

  Follows ``__cause__`` / ``__context__`` (Orbax wraps the original error).
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
      return e
    e = e.__cause__ or e.__context__
  return None


def disk_error(e: OSError, path: str) -> WorkdirError:
  """One-line :class:`WorkdirError` for an OSError while writing ``path``."""
  where = e.filename or path
  reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota "
            "is exceeded", errno.EROFS: "the file system is read-only"}.get(
                e.errno, e.strerror or str(e))
  return WorkdirError(
      f"cannot write {where}: {reason} ({errno.errorcode.get(e.errno, '?')}). "
      "Checkpoints already written are untouched; free space (or make the "
      "workdir writable) and rerun the same command to resume")


def creation_error(e: OSError, workdir: str) -> WorkdirError:
  """One-line :class:`WorkdirError`: ``workdir`` cannot be created."""
  reason = e.strerror or str(e)
  return WorkdirError(
      f"cannot create the workdir {workdir}: {reason} "
      f"({errno.errorcode.get(e.errno, '?')}); choose a --workdir in a "
      "writable place")


@contextlib.contextmanager
def disk_errors(workdir: str) -> Iterator[None]:
  """Turns a full-disk / read-only OSError raised inside into WorkdirError."""
  try:
    yield
  except WorkdirError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    found = find_disk_error(e)
    if found is None:
      raise
    raise disk_error(found, workdir) from e
