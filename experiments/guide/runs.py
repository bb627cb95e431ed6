"""The short training runs behind the guide's model pictures.

A :class:`Run` is a config file's ``get_config()`` plus a few changes;
:func:`load_run` trains it with :func:`experiments.train.train_and_evaluate`
into its workdir unless that directory already holds a finished run, and
returns the *best* checkpoint's parameters. A reused run must come from the
same config file with the same model sizes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional

import jax
import ml_collections

from attn import scores as scores_lib
from configs import dates as dates_config
from configs import digits_vit as digits_vit_config
from configs import glimpse as glimpse_config
from configs import reverse as reverse_config
from experiments import checkpoints
from experiments import config_validation
from experiments import metrics_io
from experiments import problems
from experiments import train

DEFAULT_WORKDIR_ROOT = os.path.join("runs", "figures")


@dataclasses.dataclass(frozen=True)
class Run:
  """A short training run: a config file's ``get_config()`` plus changes.

  Attributes:
    get_config: the config file's ``get_config``.
    steps: training steps in the full mode, evaluated once at the end;
      ``None`` keeps the config's own schedule and evaluations.
    overrides: ``{"model.score": "cosine", ...}`` applied to the config.
  """
  get_config: Callable[[], ml_collections.ConfigDict]
  steps: Optional[int]
  overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)


RUNS: Dict[str, Run] = {
    "reverse": Run(reverse_config.get_config, 300),
    "dates": Run(dates_config.get_config, 800),
    "digits_vit": Run(digits_vit_config.get_config, 600),
    **{f"glimpse_{s}": Run(glimpse_config.get_config, None, {"model.score": s})
       for s in scores_lib.SCORES},
}
# Trained (for two steps) even with --fast, so CI runs train -> load.
FAST_TRAINED = ("glimpse_scaled_dot",)
_FAST_SIZES = dict(num_train_steps=2, eval_every_steps=2,
                   checkpoint_every_steps=2, log_every_steps=1,
                   num_eval_examples=8, eval_batch_size=8)


def _set(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  node = config
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def run_config(name: str, fast: bool) -> ml_collections.ConfigDict:
  """The validated config of run ``name`` (shrunk to a tiny model if fast)."""
  run = RUNS[name]
  config = run.get_config()
  for path, value in run.overrides.items():
    _set(config, path, value)
  config.figures.enabled = False
  if fast:
    config.runlocal = True
    config = config_validation.prepare(config)
    config.runlocal = False          # keep the even smaller sizes below
    config.update(_FAST_SIZES)
  elif run.steps is not None:
    config.num_train_steps = run.steps
    config.eval_every_steps = run.steps
    config.checkpoint_every_steps = run.steps
    config.warmup_steps = min(config.warmup_steps, run.steps // 10)
    config.num_eval_examples = 256
  return config_validation.prepare(config)


@dataclasses.dataclass
class Trained:
  """A model ready to draw: its problem (model + task) and parameters.

  Attributes:
    name: key of :data:`RUNS`.
    problem: :class:`experiments.problems.Problem` (``.model``, ``.task``).
    params: the best checkpoint's parameters (or fresh ones when not
      trained).
    init_params: freshly initialised parameters (same seed), for
      before/after comparisons.
    test: test metrics of the best checkpoint (``{}`` when not trained).
    config: the run's validated config.
    step: the best checkpoint's step (0 when not trained).
  """
  name: str
  problem: Any
  params: Any
  init_params: Any
  test: Dict[str, float]
  config: Any = None
  step: int = 0

  def describe(self) -> str:
    """``"<task> <arch>, attention <variant>, step <n>"`` for titles."""
    c = self.config
    return (f"{c.task.name} {c.model.get('arch', 'model')}, attention "
            f"{c.model.get('attention', 'softmax')}, step {self.step}")



def restore_best_params(config, problem, params, workdir: str):
  """``(step, parameters)`` of the best checkpoint in ``workdir``.

  ``params`` gives the structure; raises ``CheckpointError`` if the
  checkpoint does not match it and ``ValueError`` if there is none.
  """
  target = train.init_state(config, params)  # the checkpointed train state
  step, state = checkpoints.restore_best(workdir, target,
                                      best_metric=problem.best_metric,
                                      best_mode=problem.best_mode)
  if state is None:
    raise ValueError("no best checkpoint under "
                     f"{checkpoints.best_dir(workdir)}")
  return step, state["params"]


def load_run(name: str, *, fast: bool, workdir: str) -> Trained:
  """Run ``name`` of :data:`RUNS`: loaded from ``workdir`` if it finished
  there, trained into it otherwise (with ``fast``, only the runs in
  :data:`FAST_TRAINED` are trained; the others stay freshly initialised)."""
  config = run_config(name, fast)
  task = config_validation.make_task(config)
  problem = problems.make_problem(config, task)
  first = task.batch("train", 0, config.batch_size)
  init_params = jax.jit(problem.init)(jax.random.key(config.seed), first)
  if fast and name not in FAST_TRAINED:
    return Trained(name, problem, init_params, init_params, {}, config)
  test = metrics_io.final_test_metrics(workdir)
  if test is None:
    train.train_and_evaluate(config, workdir)
    test = metrics_io.final_test_metrics(workdir)
  step, params = restore_best_params(config, problem, init_params, workdir)
  return Trained(name, problem, params, init_params, test or {}, config,
                 int(step))
