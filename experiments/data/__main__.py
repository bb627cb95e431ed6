"""Print what each built-in task's data looks like.

    python -m experiments.data                 # every task, default options
    python -m experiments.data dates glimpse   # some of them
    python -m experiments.data reverse --count 3

For each task: its kind, ``spec()`` and ``--count`` training examples
(split "train", step 0, seed 0) rendered with ``decode``.
"""

from __future__ import annotations

import argparse
from typing import Dict, List

import numpy as np

from experiments.data import get_task, list_tasks
from experiments.data.base import Task

_MAX_CHARS = 100


def _short(text: str) -> str:
  return text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS - 3] + "..."


def render_example(task: Task, batch: Dict[str, np.ndarray], i: int) -> str:
  """One example of ``batch`` as a line of text."""
  if task.kind == "seq2seq":
    return (f"{task.decode(batch['inputs'][i])!r} -> "
            f"{task.decode(batch['targets'][i])!r}")
  if task.kind == "lm":
    return repr(_short(task.decode(batch["inputs"][i])))
  if task.kind == "classification":
    if batch["inputs"].dtype == np.int32:
      length = int((batch["inputs"][i] > 0).sum())
      return (f"{_short(task.decode(batch['inputs'][i]))} ({length} tokens) "
              f"-> {batch['labels'][i]}")
    return (f"image {batch['inputs'][i].shape} -> digit "
            f"{batch['labels'][i]}")
  if task.kind == "glimpse":
    key = task.key_names[batch["context"][i]]
    item = task.item_names[batch["labels"][i]]
    return (f"{task.decode(batch['inputs'][i])} | context {key} -> {item} "
            f"(position {batch['target_position'][i]})")
  if task.kind == "regression":
    pairs = ", ".join(f"({x:.2f}, {y:.2f})" for x, y in
                      zip(batch["keys"][i][:3], batch["values"][i][:3]))
    return (f"keys/values {pairs}, ...; query {batch['queries'][i][0]:.2f} "
            f"-> target {batch['targets'][i][0]:.2f}")
  return (f"set of {batch['inputs'].shape[1]} images "
          f"{batch['inputs'].shape[2:]} -> odd one at {batch['labels'][i]}")


def main(argv: List[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="*", help=f"tasks ({list_tasks()})")
  parser.add_argument("--count", type=int, default=1,
                      help="examples per task")
  args = parser.parse_args(argv)
  for name in args.names or list_tasks():
    task = get_task(name)
    batch = task.batch("train", 0, args.count)
    print(f"{name} [{task.kind}] {task.spec()}")
    for i in range(args.count):
      print(f"  {render_example(task, batch, i)}")


if __name__ == "__main__":
  main()
