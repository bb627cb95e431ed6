"""What made a run: its resolved config, command line, versions, devices.

``workdir/config.json`` holds the resolved config (written at the first
start, rewritten at each resume with the bookkeeping fields of the resuming
command). ``workdir/provenance.jsonl`` gets one record per start: the time,
the step it started from, the command line, package versions, the git
commit of the checkout (with a ``dirty`` flag) when run from one, and the
devices.

A resume whose config differs from ``config.json`` in a field that changes
results is refused (:func:`check_resume`). The fields that only change
bookkeeping, and may differ, are :data:`BOOKKEEPING`; ``num_train_steps``
may grow, unless the learning-rate schedule is ``cosine`` (whose decay is
stretched over ``num_train_steps``, so a longer run is a different run).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Dict, List, Mapping, Optional

from experiments import workdir as workdir_lib
from experiments.config_validation import ConfigError

CONFIG_NAME = "config.json"
PROVENANCE_NAME = "provenance.jsonl"
# Prefixes of config fields that change how a run is logged, evaluated,
# checkpointed, drawn or laid out on devices, never the numbers it produces
# (the mesh changes only the order of float32 reductions).
BOOKKEEPING = ("runlocal", "fresh_start", "log_every_steps",
               "eval_every_steps", "checkpoint_every_steps",
               "keep_checkpoints", "eval_batch_size", "figures", "mesh",
               "prefetch_batches")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
            "ml_collections", "numpy", "attn")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_NAME)


def provenance_path(workdir: str) -> str:
  return os.path.join(workdir, PROVENANCE_NAME)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (JSON-normalised values)."""
  out: Dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, name + "."))
    else:
      out[name] = json.loads(json.dumps(value, default=str))
  return out


def is_bookkeeping(field: str) -> bool:
  return any(field == b or field.startswith(b + ".") for b in BOOKKEEPING)


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
  """Results-changing fields that differ, as ``"name: old -> new"``."""
  a, b = flatten(old), flatten(new)
  out = []
  for field in sorted(set(a) | set(b)):
    if is_bookkeeping(field) or a.get(field, "<unset>") == b.get(field,
                                                                   "<unset>"):
      continue
    if field == "num_train_steps":
      grows = (isinstance(a.get(field), int) and isinstance(b.get(field), int)
               and b[field] > a[field])
      if grows and b.get("schedule") != "cosine":
        continue
    out.append(f"{field}: {a.get(field, '<unset>')!r} -> "
               f"{b.get(field, '<unset>')!r}")
  return out


def read_config(workdir: str) -> Optional[dict]:
  path = config_path(workdir)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON ({e}); move it away or use "
                      "--config.fresh_start=True") from e


def check_resume(workdir: str, config: Mapping[str, Any]) -> None:
  """Raises :class:`ConfigError` if ``workdir`` was made by another config."""
  old = read_config(workdir)
  if old is None:
    return
  diff = differences(old, config)
  if diff:
    raise ConfigError(
        f"{workdir} holds a run made by a different config ({'; '.join(diff)})"
        f". Use another --workdir, or --config.fresh_start=True to set the "
        "previous run aside (it is moved, not deleted)")


def _versions() -> Dict[str, Optional[str]]:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def _git() -> Optional[Dict[str, Any]]:
  if not os.path.exists(os.path.join(_REPO, ".git")):
    return None
  try:
    run = lambda *a: subprocess.run(  # noqa: E731
        ["git", "-C", _REPO, *a], capture_output=True, text=True, timeout=10,
        check=True).stdout.strip()
    return {"commit": run("rev-parse", "HEAD"),
            "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
  except (OSError, subprocess.SubprocessError):
    return None


def _devices() -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  return {"backend": jax.default_backend(),
          "process_count": jax.process_count(),
          "devices": [str(d) for d in jax.devices()]}


def record_start(workdir: str, config: Mapping[str, Any], step: int) -> None:
  """Writes ``config.json`` (atomically) and appends a provenance record."""
  workdir_lib.atomic_write_text(config_path(workdir),
                                json.dumps(config, indent=2, sort_keys=True,
                                           default=str) + "\n")
  record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "start_step": step,
            "argv": list(sys.argv), "cwd": os.getcwd(),
            "versions": _versions(), "git": _git(), **_devices()}
  with open(provenance_path(workdir), "a", encoding="utf-8") as f:
    f.write(json.dumps(record, default=str) + "\n")


def read_provenance(workdir: str) -> List[dict]:
  path = provenance_path(workdir)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def default_workdir(config_arg: str, overrides: Mapping[str, Any],
                    config: Optional[Mapping[str, Any]] = None) -> str:
  """``runs/<config>`` plus the results-changing overrides, if any.

  ``configs/dates.py:tiny`` with ``{"model.positional": "alibi"}`` ->
  ``runs/dates_tiny-model.positional=alibi``. Bookkeeping overrides
  (:data:`BOOKKEEPING`, and ``num_train_steps`` unless the schedule is
  cosine) do not change the name, so such a rerun resumes the same run; two
  configs that differ in anything else never share a default workdir.
  """
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] or "run"
  if arg:
    name += "_" + arg
  cosine = (config or {}).get("schedule") == "cosine"
  kept = {k: v for k, v in sorted(overrides.items())
          if not is_bookkeeping(k) and (k != "num_train_steps" or cosine)}
  if kept:
    text = ",".join(f"{k}={v}" for k, v in kept.items())
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if safe != text or len(safe) > 80:
      digest = hashlib.sha256(text.encode()).hexdigest()[:8]
      safe = f"{safe[:80]}-{digest}"
    name = f"{name}-{safe}"
  name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
  return os.path.join("runs", name)
