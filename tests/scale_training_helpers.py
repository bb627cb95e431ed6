"""The training loop on simulated devices and real processes, in subprocesses.

JAX fixes its device count when it initialises, so every training run that
needs N simulated CPU devices (``--xla_force_host_platform_device_count=N``)
runs in a fresh process: the pytest process calls :func:`run_jobs` or
:func:`run_main_processes` and reads what the children print and write.
Importing this module does not import JAX.

As a script (from the repo root)::

    python -m tests.scale_training_helpers '<JSON list of jobs>'

runs the jobs one after another in one process (with as many devices as
``XLA_FLAGS`` gives it) and prints ``{"device_count": n, "jobs": [...]}`` as
JSON on its last line. A job is a dict:

    workdir      run directory
    overrides    {"dotted.config.field": value} on top of :data:`TINY`
    copy_from    copy this finished/interrupted workdir to ``workdir`` first
    stop_at      raise :class:`Interrupted` when the train batch of this step
                 is requested (a killed run; its checkpoints stay)
    params_out   write the latest checkpoint's parameters here (``.npz``)
    params_only  skip training; only restore and write ``params_out``

and its result is ``{"records": metrics.jsonl, "train_steps_loaded": [...],
"interrupted": bool, "error": None or "Type: message" of an exception that
ended the run, "latest_step": int, "figures": [file names]}``.
"""
# JAX, attn and the experiments are imported inside the functions that run in
# the child processes. pylint: disable=g-import-not-at-top

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import IO, Any, Dict, List, Optional, Sequence

from tests.multidevice_helpers import REPO, _env as child_env, free_port

CONFIG = "associative_recall"
# A config small enough for several runs in a test: one-layer Transformer LM
# (causal self-attention over 18 tokens), 4 steps, evaluation and a
# checkpoint every 2 steps, dropout on so that the dropout masks must not
# depend on the device count either. Used as overrides of configs/<CONFIG>.py
# both in-process (:func:`make_config`) and as --config.* flags.
TINY: Dict[str, Any] = {
    "model.num_layers": 1, "model.emb_dim": 32, "model.mlp_dim": 64,
    "model.num_heads": 4, "model.dropout_rate": 0.1,
    "batch_size": 8, "num_train_steps": 4, "warmup_steps": 1,
    "eval_every_steps": 2, "checkpoint_every_steps": 2, "log_every_steps": 1,
    "num_eval_examples": 8, "eval_batch_size": 8, "figures.enabled": False,
}


def config_flags(overrides: Dict[str, Any]) -> List[str]:
  """``{"a.b": 1}`` -> ``["--config.a.b=1"]`` for experiments.main."""
  return [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]


def _child_env(devices: int, cache_dir: Optional[str]) -> Dict[str, str]:
  """Environment of a child with ``devices`` CPU devices.

  With ``cache_dir``, JAX's persistent compilation cache is shared by the
  children: runs of the same program on the same device count compile once.
  """
  env = child_env(devices)
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


@dataclasses.dataclass
class Child:
  """A started subprocess; its output goes to temporary files.

  (Files, not pipes: a process of a ``jax.distributed`` group blocked on a
  full pipe that nobody reads would stall the whole group.)
  """
  proc: subprocess.Popen
  stdout: IO[str]
  stderr: IO[str]

  def wait(self, timeout: float) -> str:
    """Its stdout once it exits; RuntimeError with its output if it fails."""
    self.proc.wait(timeout=timeout)
    out, err = (self._read(f) for f in (self.stdout, self.stderr))
    if self.proc.returncode:
      raise RuntimeError(f"{self.proc.args[:4]} failed "
                         f"(rc={self.proc.returncode}):\n{out[-3000:]}\n"
                         f"{err[-6000:]}")
    return out

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()

  @staticmethod
  def _read(f: IO[str]) -> str:
    f.seek(0)
    text = f.read()
    f.close()
    return text


def _start(command: List[str], env: Dict[str, str]) -> Child:
  out, err = (tempfile.TemporaryFile("w+") for _ in range(2))
  return Child(subprocess.Popen(command, env=env, cwd=REPO, stdout=out,
                                stderr=err, text=True), out, err)


def run_jobs(jobs: Sequence[dict], devices: int,
             cache_dir: Optional[str] = None) -> Child:
  """Starts this script on ``jobs`` with ``devices`` simulated CPU devices.

  Returns the running child; pass it to :func:`result`.
  """
  return _start([sys.executable, "-m", "tests.scale_training_helpers",
                 json.dumps(jobs)], _child_env(devices, cache_dir))


def result(child: Child, timeout: float) -> dict:
  """Waits for a :func:`run_jobs` child; the JSON it printed last."""
  return json.loads(child.wait(timeout).strip().splitlines()[-1])


def run_main_processes(workdir: str, overrides: Dict[str, Any],
                       num_processes: int = 2, devices_per_process: int = 1,
                       cache_dir: Optional[str] = None) -> List[Child]:
  """Starts ``python -m experiments.main`` as a ``jax.distributed`` group.

  One process per id on a loopback coordinator, each with
  ``devices_per_process`` simulated CPU devices and gloo CPU collectives,
  all training into the same ``workdir`` with :data:`TINY` + ``overrides``
  as ``--config.*`` flags. Returns the running children; pass them to
  :func:`finish`.
  """
  port = free_port()
  env = dict(_child_env(devices_per_process, cache_dir),
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  return [_start(
      [sys.executable, "-m", "experiments.main",
       f"--config={os.path.join(REPO, 'configs', CONFIG + '.py')}",
       f"--workdir={workdir}", *config_flags(overrides),
       f"--coordinator_address=127.0.0.1:{port}",
       f"--num_processes={num_processes}", f"--process_id={i}"], env)
          for i in range(num_processes)]


def finish(children: Sequence[Child], timeout: float) -> List[str]:
  """Waits for :func:`run_main_processes`; each one's stdout.

  If one fails or times out, the others are killed.
  """
  try:
    return [child.wait(timeout) for child in children]
  finally:
    for child in children:
      child.kill()


def load_params(path: str) -> Dict[str, Any]:
  """The ``{key path: array}`` a job wrote to ``params_out``."""
  import numpy as np
  with np.load(path) as f:
    return dict(f)


# ---------------------------------------------------------------------------
# Everything below runs inside the child processes.


class Interrupted(Exception):
  """Raised in place of a train batch: simulates a killed run."""


def make_config(overrides: Dict[str, Any]):
  """configs/<CONFIG>.py with :data:`TINY` and ``overrides``, validated."""
  import importlib
  from experiments import config_validation
  config = importlib.import_module(f"configs.{CONFIG}").get_config()
  for key, value in {**TINY, **overrides}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_validation.prepare(config)


def latest_params(config, workdir: str):
  """``(step, {key path: np.ndarray})`` of ``workdir``'s latest checkpoint.

  ``(None, {})`` when there is none.

  Restored replicated onto this process's mesh (``config.mesh``), as
  ``train_and_evaluate`` restores it, from an abstract target (nothing is
  initialised).
  """
  import jax
  import numpy as np
  from attn import parallel
  from experiments import checkpoints, config_validation, problems, train
  task = config_validation.make_task(config)
  problem = problems.make_problem(config, task)
  mesh = parallel.make_mesh(**config.mesh)

  def init_state(rng):
    return train.init_state(
        config, problem.init(rng, task.batch("train", 0, config.batch_size)))

  replicated = parallel.replicated(mesh)
  with jax.set_mesh(mesh):
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(init_state, jax.random.key(0)))
    step, state = checkpoints.restore_latest(workdir, target)
  if step is None:
    return None, {}
  flat, _ = jax.tree_util.tree_flatten_with_path(state["params"])
  return step, {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


def run_job(job: dict) -> dict:
  """Runs one job (see the module docstring) in this process."""
  import numpy as np
  from experiments import metrics_io, data as tasks, train
  config = make_config(job.get("overrides", {}))
  workdir = job["workdir"]
  if job.get("copy_from"):
    shutil.copytree(job["copy_from"], workdir)
  loaded, interrupted, error = [], False, None
  if not job.get("params_only"):
    cls = type(tasks.get_task(config.task.name))
    original = cls.batch

    def batch(self, split, step, batch_size):
      if split == "train":
        if step == job.get("stop_at"):
          raise Interrupted(f"simulated kill before step {step}")
        loaded.append(int(step))
      return original(self, split, step, batch_size)

    cls.batch = batch
    try:
      train.train_and_evaluate(config, workdir)
    except Interrupted:
      interrupted = True
    except Exception as e:  # pylint: disable=broad-except
      error = f"{type(e).__name__}: {e}"  # reported; the next job still runs
    finally:
      cls.batch = original
  step, params = latest_params(config, workdir)
  if job.get("params_out"):
    np.savez(job["params_out"], **params)
  figures = os.path.join(workdir, "figures")
  return {"records": metrics_io.read_metrics(workdir),
          "train_steps_loaded": loaded, "interrupted": interrupted,
          "error": error, "latest_step": step, "figures": sorted(
              os.listdir(figures)) if os.path.isdir(figures) else []}


def main(argv: Sequence[str]) -> None:
  import jax
  jobs = json.loads(argv[1])
  results = [run_job(job) for job in jobs]
  print(json.dumps({"device_count": jax.device_count(), "jobs": results}))


if __name__ == "__main__":
  main(sys.argv)
