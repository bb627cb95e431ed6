"""Config checks that run before anything is compiled.

A misspelled field, an unknown attention/positional/task/arch name, an arch
that builds no model for the task's kind, or an impossible value stops the
run with one :class:`ConfigError` that lists every problem found. The arch
values come from :data:`experiments.problems.ARCHS`, so every accepted value
builds a model.

:func:`validate` needs nothing but the config; :func:`check_runnable` then
checks it against this machine and the task's data: the mesh fits the
devices, every split can be drawn, and the model traces (``jax.eval_shape``
of init and a training loss: shapes only, nothing compiled) with the task's
shapes, so a bad option of any attention variant is reported before a step
runs.
"""

from __future__ import annotations

import difflib
import json
from typing import Iterable

import jax
import ml_collections

from attn import parallel
from attn import positional
from attn import registry
from configs import base as base_config
from experiments import config_warnings
from experiments import data as tasks_lib
from experiments import metrics_io
from experiments import problems as problems_lib

ARCHS = tuple(problems_lib.ARCHS)
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
DTYPES = ("float32", "bfloat16")
# Fields whose contents are free-form (checked by the task / model instead).
_OPEN_FIELDS = ("task.options", "model.options")


class ConfigError(ValueError):
  """The experiment config is invalid; the message lists every problem."""


def config_error(problems: list[str]) -> ConfigError:
  """One problem on one line; several as an indented list."""
  if len(problems) == 1:
    return ConfigError(f"invalid config: {problems[0]}")
  return ConfigError(f"invalid config ({len(problems)} problems):\n  "
                     + "\n  ".join(problems))


def unknown_name(what: str, name: str, known: Iterable[str]) -> str:
  """``unknown field config.x; did you mean config.y?`` (or the known list
  when nothing is close)."""
  known = sorted(known)
  close = difflib.get_close_matches(name, known, n=1)
  if close:
    return f"unknown {what} {name}; did you mean {close[0]}?"
  return f"unknown {what} {name} (known: {', '.join(known) or 'none'})"


def _unknown_fields(config, reference, prefix="") -> list[str]:
  out = []
  for key in config.keys():
    path = f"{prefix}{key}"
    if path in _OPEN_FIELDS:
      continue
    if key not in reference:
      known = [f"config.{prefix}{k}" for k in reference.keys()]
      out.append(unknown_name("field", f"config.{path}", known))
    elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(
        reference[key], ml_collections.ConfigDict):
      out.extend(_unknown_fields(config[key], reference[key], path + "."))
  return out


def _positive(config, names, problems, allow_zero=False):
  for name in names:
    value = config
    for part in name.split("."):
      value = value[part]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
      problems.append(f"config.{name}={value!r} must be "
                      f"{'>= 0' if allow_zero else '> 0'}")


RUNLOCAL = dict(num_train_steps=20, batch_size=8, eval_every_steps=10,
                checkpoint_every_steps=10, log_every_steps=5,
                num_eval_examples=16, eval_batch_size=8, warmup_steps=2)
RUNLOCAL_MODEL = dict(num_layers=1, emb_dim=32, mlp_dim=64)


def _is_explicit(path: str, explicit: Iterable[str]) -> bool:
  return any(path == e or path.startswith(e + ".") for e in explicit)


def runlocal_changes(config: ml_collections.ConfigDict,
                     explicit: Iterable[str] = ()) -> dict:
  """``{field path: value}`` that ``runlocal`` sets: a tiny model, few steps.

  Fields in ``explicit`` (paths such as ``"num_train_steps"``, e.g. the
  command line's ``--config.*`` overrides) are left out: an explicit value
  wins over ``runlocal``.
  """
  explicit = tuple(explicit)
  changes = dict(RUNLOCAL)
  changes.update({f"model.{k}": v for k, v in RUNLOCAL_MODEL.items()
                  if k in config.model})
  changes = {k: v for k, v in changes.items()
             if not _is_explicit(k, explicit)}
  m = config.model
  emb_dim = changes.get("model.emb_dim", m.emb_dim)
  if m.num_heads > 2 and emb_dim % 4 == 0:
    heads = (m.num_heads if _is_explicit("model.num_heads", explicit)
             else min(m.num_heads, 4))
    changes["model.num_heads"] = heads
    if m.num_kv_heads:
      changes["model.num_kv_heads"] = min(m.num_kv_heads, heads)
  return {k: v for k, v in changes.items() if not _is_explicit(k, explicit)}


def set_field(config: ml_collections.ConfigDict, path: str, value) -> None:
  """Sets the field at dotted ``path`` (``"model.num_layers"``) of
  ``config``; ``KeyError``/``AttributeError`` when a parent is missing."""
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def prepare(config: ml_collections.ConfigDict,
            explicit: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """A validated copy of ``config``, shrunk when ``config.runlocal``.

  ``explicit``: field paths the user set explicitly (the command line's
  overrides); ``runlocal`` leaves them as they are.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  validate(config)
  if config.get("runlocal", False):
    for path, value in runlocal_changes(config, explicit).items():
      set_field(config, path, value)
  validate(config)
  for warning in config_warnings.positional_warnings(config):
    metrics_io.get_logger().warning("warning: %s", warning)
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` listing every problem in ``config``."""
  problems = _unknown_fields(config, base_config.get_base_config())
  if problems:
    raise config_error(problems)
  _positive(config, ["num_train_steps", "batch_size", "learning_rate",
                     "log_every_steps", "eval_every_steps",
                     "checkpoint_every_steps", "keep_checkpoints",
                     "num_eval_examples", "eval_batch_size",
                     "model.num_layers", "model.num_heads", "model.emb_dim",
                     "model.mlp_dim"], problems)
  _positive(config, ["warmup_steps", "weight_decay", "grad_clip_norm",
                     "prefetch_batches",
                     "model.num_kv_heads", "figures.every_steps",
                     "figures.num_examples"], problems, allow_zero=True)
  for name in ("model.dropout_rate", "model.attention_dropout_rate"):
    group, field = name.split(".")
    v = config[group][field]
    if not (isinstance(v, (int, float)) and 0 <= v < 1):
      problems.append(f"config.{name}={v!r} must be in [0, 1)")
  if config.schedule not in SCHEDULES:
    problems.append(f"config.schedule={config.schedule!r}; choose from "
                    f"{SCHEDULES}")
  if config.dtype not in DTYPES:
    problems.append(f"config.dtype={config.dtype!r}; choose from {DTYPES}")
  m = config.model
  if m.arch not in ARCHS:
    problems.append(f"config.model.arch={m.arch!r}; choose from {ARCHS}")
  if not problems:
    if m.emb_dim % m.num_heads:
      problems.append(f"config.model.num_heads={m.num_heads} does not divide "
                      f"config.model.emb_dim={m.emb_dim}")
    if m.num_kv_heads and m.num_heads % m.num_kv_heads:
      problems.append(f"config.model.num_kv_heads={m.num_kv_heads} does not "
                      f"divide config.model.num_heads={m.num_heads}")
  try:
    registry.get_attention(m.attention)
  except ValueError as e:
    problems.append(f"config.model.attention={m.attention!r}: {e}")
  if m.positional not in positional.POSITIONAL_ENCODINGS:
    problems.append(f"config.model.positional={m.positional!r}; choose from "
                    f"{positional.POSITIONAL_ENCODINGS}")
  if config.task.name not in tasks_lib.list_tasks():
    problems.append(f"config.task.name={config.task.name!r}; choose from "
                    f"{tasks_lib.list_tasks()}")
  else:
    bad_options = _task_option_problems(config)
    problems.extend(bad_options)
    if not bad_options:
      try:
        task = make_task(config)
      except ValueError as e:
        problems.append(f"config.task.options: {e}")
      else:
        problems.extend(_model_problems(config, task))
  for axis in ("data", "seq", "model"):
    v = config.mesh[axis]
    if not isinstance(v, int) or (v < 1 and v != -1):
      problems.append(f"config.mesh.{axis}={v!r} must be a positive int or -1")
  if problems:
    raise config_error(problems)


def task_options(name: str) -> list[str]:
  """The options ``config.task.options`` may set for task ``name`` (its
  keyword parameters; the seed is ``config.seed``)."""
  return sorted(set(tasks_lib.TASKS[name].options()) - {"seed"})


def _task_option_problems(config) -> list[str]:
  """Options the task does not take, whether or not the config file
  declares them (undeclared ones come from the command line)."""
  name = config.task.name
  known = task_options(name)
  return [("config.task.options.seed: the task's seed is config.seed"
           if option == "seed" else f"config.task.options: task {name!r}: "
           + unknown_name("option", option, known))
          for option in sorted(config.task.options.keys())
          if option not in known]


def _model_problems(config, task) -> list[str]:
  """Whether the task's kind has a problem and ``config.model.arch`` builds a
  model for it (building a module is cheap: no parameters yet)."""
  if task is None:  # the task reads a user's data file that is not here
    return []
  if task.kind not in problems_lib.PROBLEMS:
    return [f"task {task.name!r} has kind {task.kind!r}, which no problem "
            f"handles; kinds: {sorted(problems_lib.PROBLEMS)}"]
  arch = config.model.arch
  if arch not in ARCHS:
    return []  # reported above
  try:
    problems_lib.build_model(config, task.spec())
  except ValueError as e:
    return [f"config.model: {e}"]
  return []


def make_task(config):
  """The task named by ``config.task`` (seeded by ``config.seed``)."""
  return tasks_lib.get_task(config.task.name, seed=config.seed,
                            **config.task.options.to_dict())


# Configs that passed check_runnable in this process (keyed with the
# devices), so repeated runs of one config (a resume, the tests) trace once.
_RUNNABLE: set = set()


def check_runnable(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` if a valid ``config`` cannot run here.

  Checks, in order, and stops at the first failure: the mesh fits this
  machine's devices and divides the batch; every split of the task can be
  drawn (files the user points to are read); the model traces with the
  task's shapes (``jax.eval_shape`` of init and a training loss, inside the
  mesh, so kernel options that only fail on real shapes are found). Nothing
  is compiled or written.
  """
  key = json.dumps([config.to_dict(), [str(d) for d in jax.devices()]],
                   sort_keys=True, default=str)
  if key in _RUNNABLE:
    return
  problem = runtime_problem(config)
  if problem:
    raise config_error([problem])
  _RUNNABLE.add(key)


def runtime_problem(config: ml_collections.ConfigDict) -> str | None:
  """What stops a valid ``config`` from running here (see
  :func:`check_runnable`), or ``None``."""
  try:
    mesh = parallel.make_mesh(data=config.mesh.data, seq=config.mesh.seq,
                              model=config.mesh.model)
  except ValueError as e:
    return f"config.mesh: {metrics_io.one_line(e)}"
  if config.batch_size % mesh.shape["data"]:
    return (f"config.batch_size={config.batch_size} is not divisible by the "
            f"data-parallel size {mesh.shape['data']} (config.mesh)")
  try:
    task = make_task(config)
    first = {split: task.batch(split, 0, 1) for split in tasks_lib.SPLITS}
  except (ValueError, OSError) as e:
    return f"config.task.options: {metrics_io.one_line(e)}"
  try:
    with jax.set_mesh(mesh):
      trace_training(config, task, first["train"])
  except (ValueError, TypeError, NotImplementedError) as e:
    return f"config.model: {metrics_io.one_line(e)}"
  return None


def trace_training(config, task, example) -> None:
  """``jax.eval_shape`` of init + training loss on a batch shaped like a
  training batch of ``config.batch_size`` (``example``: one example)."""
  problem = problems_lib.make_problem(config, task)
  batch = {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:],
                                   v.dtype) for k, v in example.items()}

  def init_and_loss(rng, batch):
    params = problem.init(rng, batch)
    return problem.loss(params, batch, rng, True)

  jax.eval_shape(init_and_loss, jax.random.key(config.seed), batch)
