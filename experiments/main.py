r"""Runs an experiment: flags -> ``train_and_evaluate(config, workdir)``.

    python -m experiments.main                       # the default (reverse)
    python -m experiments.main --config=configs/dates.py --workdir=runs/dates \
        --config.model.attention=linear --config.num_train_steps=2000
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from attn import parallel
from experiments import provenance
from experiments import train

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs")
config_flags.DEFINE_config_file(
    "config", os.path.join(_CONFIG_DIR, "default.py"),
    "Experiment config file (configs/<name>.py).", lock_config=True)
flags.DEFINE_string("workdir", None,
                    "Run directory (checkpoints, metrics, figures). Default: "
                    "runs/<config name>, plus the results-changing "
                    "--config.* overrides, e.g. "
                    "runs/default-model.positional=alibi.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  parallel.initialize_distributed(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  workdir = FLAGS.workdir or provenance.default_workdir(
      FLAGS["config"].config_filename,
      config_flags.get_override_values(FLAGS["config"]), FLAGS.config)
  logging.set_verbosity(logging.WARNING)
  try:
    train.train_and_evaluate(FLAGS.config, workdir)
  except train.Preempted as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print(f"interrupted; the latest checkpoint in {workdir} is kept. Rerun "
          "the same command to resume", file=sys.stderr)
    sys.exit(130)
  except (train.ConfigError, train.CheckpointError, train.WorkdirError,
          train.NonFiniteLossError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
