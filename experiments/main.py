r"""Runs an experiment: flags -> ``train_and_evaluate(config, workdir)``.

    python -m experiments.main                       # the default (reverse)
    python -m experiments.main --config=configs/dates.py --workdir=runs/dates \
        --config.model.attention=linear --config.num_train_steps=2000

A mistake on the command line (an unknown flag or config field, a value of
the wrong type, a missing config file, an invalid config) ends in one
``error: ...`` line on stderr (a second line with the fix where it helps)
and exit status 1, before anything is compiled.
"""

import functools
import os
import re
import sys
import traceback
from typing import List, NoReturn, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from attn import parallel
from experiments import config_validation
from experiments import metrics_io
from experiments import provenance
from experiments import train

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = os.path.join(_CONFIG_DIR, "default.py")


def define_flags(flag_values: flags.FlagValues, argv: List[str]) -> None:
  """Defines ``--config`` (with its ``--config.<field>`` overrides, read
  from ``argv``), ``--workdir`` and the multi-host flags.

  The config is not locked: an override naming a field the config file does
  not declare is accepted here and judged by config validation, which
  refuses unknown fields (suggesting the closest) and passes task options
  the config does not declare to the task, which knows its own.
  """
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (configs/<name>.py; default "
      "configs/default.py).", flag_values=flag_values, lock_config=False,
      accept_new_attributes=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None,
                      "Run directory (checkpoints, metrics, figures). Default: "
                      "runs/<config name>, plus the results-changing "
                      "--config.* overrides, e.g. "
                      "runs/default-model.positional=alibi.",
                      flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None,
                      "Multi-host: host:port of process 0.",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None,
                       "Multi-host: number of processes.",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.",
                       flag_values=flag_values)


def with_default_config(argv: Sequence[str]) -> List[str]:
  """``argv`` with its ``--config=<file>`` first (``configs/default.py`` when
  it names none), so the file is always read while flags are parsed and
  ``--config.*`` overrides may come before or after it."""
  argv = list(argv)
  while "--config" in argv[1:-1]:  # "--config <file>" -> "--config=<file>"
    i = argv.index("--config", 1)
    argv[i:i + 2] = [f"--config={argv[i + 1]}"]
  named = [a for a in argv[1:] if a.startswith("--config=")]
  rest = [a for a in argv[1:] if not a.startswith("--config=")]
  return argv[:1] + (named or [f"--config={DEFAULT_CONFIG}"]) + rest


def fail(message: str, fix: Optional[str] = None) -> NoReturn:
  """Prints ``error: message`` (and the fix) to stderr; exits with 1."""
  print(f"error: {message}" + (f"\n{fix}" if fix else ""), file=sys.stderr)
  sys.exit(1)


def _config_arg(argv: Sequence[str]) -> Optional[str]:
  """The value of ``--config`` in ``argv`` (``file`` or ``file:argument``)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _known_configs() -> str:
  names = sorted(f for f in os.listdir(_CONFIG_DIR)
                 if f.endswith(".py") and f not in ("__init__.py", "base.py",
                                                    "benchmark.py"))
  return "configs: " + ", ".join(f"configs/{n}" for n in names)


def flag_error(error: BaseException) -> str:
  """An exception raised while parsing flags, as one line: absl's
  ``flag --x=1: reason`` loses its ``flag`` prefix (and a reason given as
  several arguments is joined), and a multi-line message (a traceback of a
  broken config file) keeps its first and last lines."""
  text = str(error)
  cause = error.__context__
  if (isinstance(error, flags.IllegalFlagValueError) and cause is not None
      and len(cause.args) > 1):
    text = text.replace(str(cause), ": ".join(map(str, cause.args)))
  lines = [line.strip() for line in text.strip().splitlines()
           if line.strip()] or [type(error).__name__]
  text = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
  return text[len("flag "):] if text.startswith("flag --") else text


def _override_paths(argv: Sequence[str]) -> List[str]:
  """``model.attention`` for each ``--config.model.attention=...``."""
  return [re.sub(r"^-{1,2}(no)?config\.", "", a.split("=", 1)[0])
          for a in argv if re.match(r"^-{1,2}(no)?config\.", a)]


def bad_override(config, paths: Sequence[str]) -> Optional[str]:
  """The first of ``paths`` that cannot name a field of ``config``: a
  missing section (with the closest name) or a field inside a value."""
  for path in paths:
    node, walked = config, "config"
    parts = path.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict):
        return (f"{walked} is a {type(node).__name__}, not a section: it has "
                f"no field {part!r} (--config.{path})")
      if part not in node and i < len(parts) - 1:
        return config_validation.unknown_name(
            "field", f"{walked}.{part}", [f"{walked}.{k}" for k in node])
      node, walked = node.get(part), f"{walked}.{part}"
  return None


def _diagnose(flag_values: flags.FlagValues, argv: Sequence[str]
              ) -> Optional[str]:
  """Which ``--config.*`` override broke flag parsing, if one did."""
  try:
    config = flag_values["config"].parser.parse(_config_arg(argv))
  except Exception:  # pylint: disable=broad-except
    return None
  return bad_override(config, _override_paths(argv))


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str]
                ) -> List[str]:
  """Parses ``argv`` into ``flag_values``; returns the arguments left.

  A mistake exits through :func:`fail` (one line, no traceback).
  """
  path = (_config_arg(argv) or DEFAULT_CONFIG).split(":", 1)[0]
  if not os.path.isfile(path):
    fail(f"no config file {path!r}", _known_configs())
  try:
    rest = flag_values(list(argv))
    flag_values.config.to_dict()  # a config file that failed to load raises
  except flags.UnrecognizedFlagError as e:
    fail(flag_error(e), "--helpfull lists the flags; config fields are "
         "set as --config.<field>=<value>")
  except flags.Error as e:
    fail(flag_error(e))
  except Exception as e:  # pylint: disable=broad-except
    where = _where(e, path)
    if where:  # raised by the config file's own code
      fail(f"cannot load the config file {path}: {type(e).__name__}: "
           f"{flag_error(e)}{where}")
    fail(_diagnose(flag_values, argv) or flag_error(e))
  return rest


def _where(error: BaseException, path: str) -> str:
  """`` (line N)`` of the innermost frame of ``error`` in file ``path``."""
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(frame.filename) == os.path.abspath(path)]
  return f" (line {lines[-1]})" if lines else ""


def main(argv: Sequence[str],
         flag_values: Optional[flags.FlagValues] = None) -> None:
  """Trains the experiment the flags describe.

  Under ``app.run`` the parsed global flags come as ``flag_values``; called
  directly (tests, a notebook), ``argv`` is the whole command line, parsed
  on fresh flags, and JAX may already be running, so the multi-host runtime
  is only started when its flags are given (no cluster auto-detection).
  """
  direct = flag_values is None
  if direct:
    argv = with_default_config(argv)
    flag_values = flags.FlagValues()
    define_flags(flag_values, argv)
    argv = parse_flags(flag_values, argv)
  if len(argv) > 1:
    fail(f"unexpected arguments {list(argv[1:])}",
         "flags take the form --name=value (--config.<field>=<value> for "
         "config fields)")
  hosts = dict(coordinator_address=flag_values.coordinator_address,
               num_processes=flag_values.num_processes,
               process_id=flag_values.process_id)
  try:
    if not direct or any(v is not None for v in hosts.values()):
      parallel.initialize_distributed(**hosts)
  except (ValueError, RuntimeError) as e:
    fail(f"cannot start the multi-host run: {metrics_io.one_line(e)}",
         "pass --coordinator_address, --num_processes and --process_id "
         "together (or none: auto-detection)")
  overrides = config_flags.get_override_values(flag_values["config"])
  workdir = flag_values.workdir or provenance.default_workdir(
      flag_values["config"].config_filename, overrides, flag_values.config)
  logging.set_verbosity(logging.WARNING)
  try:
    train.train_and_evaluate(flag_values.config, workdir,
                             explicit=tuple(overrides))
  except train.Preempted as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print(f"interrupted; the latest checkpoint in {workdir} is kept. Rerun "
          "the same command to resume", file=sys.stderr)
    sys.exit(130)
  except (train.ConfigError, train.CheckpointError, train.WorkdirError,
          train.NonFiniteLossError) as e:
    fail(str(e))


if __name__ == "__main__":
  _ARGV = with_default_config(sys.argv)
  define_flags(flags.FLAGS, _ARGV)
  app.run(functools.partial(main, flag_values=flags.FLAGS), argv=_ARGV,
          flags_parser=functools.partial(parse_flags, flags.FLAGS))
