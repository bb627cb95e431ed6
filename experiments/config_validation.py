"""Config checks that run before anything is compiled.

A misspelled field, an unknown attention/positional/task/arch name, an arch
that builds no model for the task's kind, or an impossible value stops the
run with one :class:`ConfigError` that lists every problem found. The arch
values come from :data:`experiments.problems.ARCHS`, so every accepted value
builds a model.
"""

from __future__ import annotations

import ml_collections

from attn import positional
from attn import registry
from configs import base as base_config
from experiments import data as tasks_lib
from experiments import problems as problems_lib

ARCHS = tuple(problems_lib.ARCHS)
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
DTYPES = ("float32", "bfloat16")
# Fields whose contents are free-form (checked by the task / model instead).
_OPEN_FIELDS = ("task.options", "model.options")


class ConfigError(ValueError):
  """The experiment config is invalid; the message lists every problem."""


def _unknown_fields(config, reference, prefix="") -> list[str]:
  out = []
  for key in config.keys():
    path = f"{prefix}{key}"
    if path in _OPEN_FIELDS:
      continue
    if key not in reference:
      out.append(f"unknown field config.{path} (known at this level: "
                 f"{sorted(reference.keys())})")
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


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A validated copy of ``config``, shrunk when ``config.runlocal``."""
  config = ml_collections.ConfigDict(config.to_dict())
  validate(config)
  if config.get("runlocal", False):
    for k, v in RUNLOCAL.items():
      config[k] = v
    for k, v in RUNLOCAL_MODEL.items():
      if k in config.model:
        config.model[k] = v
    if config.model.num_heads > 2 and config.model.emb_dim % 4 == 0:
      config.model.num_heads = min(config.model.num_heads, 4)
      if config.model.num_kv_heads:
        config.model.num_kv_heads = min(config.model.num_kv_heads,
                                        config.model.num_heads)
  validate(config)
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` listing every problem in ``config``."""
  problems = _unknown_fields(config, base_config.get_base_config())
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
  _positive(config, ["num_train_steps", "batch_size", "learning_rate",
                     "log_every_steps", "eval_every_steps",
                     "checkpoint_every_steps", "keep_checkpoints",
                     "num_eval_examples", "eval_batch_size",
                     "model.num_layers", "model.num_heads", "model.emb_dim",
                     "model.mlp_dim"], problems)
  _positive(config, ["warmup_steps", "weight_decay", "grad_clip_norm",
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
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


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
    return [f"config.model.arch={arch!r}: {e}"]
  return []


def make_task(config):
  """The task named by ``config.task`` (seeded by ``config.seed``)."""
  return tasks_lib.get_task(config.task.name, seed=config.seed,
                            **config.task.options.to_dict())
