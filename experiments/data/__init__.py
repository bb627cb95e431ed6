"""Built-in tasks: deterministic data (examples) for the experiments.

This package makes examples only. What is learned from them (model, loss,
metrics, pictures) is :mod:`experiments.problems`, chosen by ``task.kind``:
the kinds are the keys of :data:`experiments.problems.PROBLEMS`.

``get_task("reverse", seed=0, length=24)`` returns a :class:`Task`;
``task.batch(split, step, batch_size)`` gives the same arrays for the same
arguments (no hidden state), ``task.eval_batches(split, batch_size, n)`` a
fixed evaluation set, ``task.spec()`` the static facts a model needs. See
:mod:`experiments.data.base` for the conventions (token ids, randomness,
splits) and each module for its batch format.
"""

from __future__ import annotations

from typing import Any, Dict, List

from experiments.data.algorithmic import AssociativeRecall, Copy, Reverse, Sort
from experiments.data.base import SPLITS, Task, Vocabulary
from experiments.data.dates import Dates
from experiments.data.digits import DigitsSetAnomaly, DigitsViT
from experiments.data.glimpse import Glimpse
from experiments.data.listops import ListOps, read_lra_tsv, write_lra_tsv
from experiments.data.regression import NadarayaWatson
from experiments.data.text import TextLM

TASKS: Dict[str, type] = {cls.name: cls for cls in (
    Reverse, Copy, Sort, AssociativeRecall, ListOps, Dates, Glimpse,
    NadarayaWatson, DigitsViT, DigitsSetAnomaly, TextLM)}


def list_tasks() -> List[str]:
  """Names of the built-in tasks, sorted."""
  return sorted(TASKS)


def get_task(name: str, **options: Any) -> Task:
  """The task ``name`` built with ``options`` (``seed`` included).

  Raises:
    ValueError: for an unknown name (listing the tasks), unknown option names
      (listing the valid ones) or bad option values (naming the option).
  """
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; available tasks: "
                     f"{list_tasks()}")
  cls = TASKS[name]
  valid = cls.options()
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f"task {name!r}: unknown option(s) {unknown}; valid "
                     f"options: {sorted(valid)}")
  return cls(**options)


__all__ = ["SPLITS", "TASKS", "Task", "Vocabulary", "get_task",
           "list_tasks", "read_lra_tsv", "write_lra_tsv"]
