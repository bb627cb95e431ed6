"""Run integrity: kills at any instant, provenance, metrics.jsonl, fresh_start,
the workdir lock, SIGTERM/SIGINT and full / read-only disks.

Every in-process run here uses one tiny config, so the train and eval steps
compile once for the module (train.py reuses compiled functions of the same
config). Kills are simulated in-process by raising at a chosen instant (a
train batch, inside Orbax's final rename of a checkpoint, right after either
checkpoint save, halfway through a metrics line, during the final
evaluation); one real SIGTERM goes to a subprocess.
"""

import errno
import glob
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import atomicity

from experiments import checkpoints
from experiments import config_validation
from experiments import metrics_io
from experiments import problems
from experiments import provenance
from experiments import train
from experiments import workdir as workdir_lib
from experiments import data as tasks_lib
from tests.test_experiments import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"num_train_steps": 8, "checkpoint_every_steps": 2,
        "eval_every_steps": 4, "log_every_steps": 1, "figures.enabled": False,
        "model.dropout_rate": 0.1, "model.emb_dim": 16, "model.mlp_dim": 32,
        "model.num_heads": 2, "model.num_layers": 1, "batch_size": 4,
        "num_eval_examples": 8, "eval_batch_size": 8}
TASK_CLS = tasks_lib.algorithmic.Copy


def config(**overrides):
  return tiny("copy", **{**TINY, **overrides})


class SimulatedKill(KeyboardInterrupt):
  """Raised at the instant a test kills the run: a ``BaseException``, as
  a Ctrl-C is, so no ``except Exception`` on the way can swallow it."""


def final_state(workdir, cfg):
  """(latest step, latest params, best step) of a workdir."""
  task = config_validation.make_task(cfg)
  problem = problems.make_problem(cfg, task)
  # Shapes only: restoring needs the structure, not initialised numbers.
  target = jax.eval_shape(lambda: train.init_state(
      cfg, problem.init(jax.random.key(0), task.batch("train", 0, 2))))
  step, state = checkpoints.restore_latest(workdir, target)
  best_step, _ = checkpoints.restore_best(
      workdir, target, best_metric=problem.best_metric,
      best_mode=problem.best_mode)
  return step, state["params"], best_step


def assert_same_run(got, want, cfg):
  assert metrics_io.read_metrics(got) == metrics_io.read_metrics(want)
  tests = [r for r in metrics_io.read_metrics(got) if r["split"] == "test"]
  assert len(tests) == 1
  step_a, params_a, best_a = final_state(got, cfg)
  step_b, params_b, best_b = final_state(want, cfg)
  assert (step_a, best_a) == (step_b, best_b)
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  leftovers = [p for p in glob.glob(os.path.join(got, "**"), recursive=True)
               if "tmp" in os.path.basename(p)]
  assert not leftovers
  assert not os.path.exists(workdir_lib.lock_path(got))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """One uninterrupted run: the reference every other run must equal."""
  path = str(tmp_path_factory.mktemp("straight"))
  result = train.train_and_evaluate(config(), path)
  return path, result


class Killer:
  """Patches one instant of a run to raise :class:`SimulatedKill`."""

  def __init__(self, monkeypatch, kind, n):
    self.kind, self.n, self.calls = kind, n, 0
    mp = monkeypatch
    if kind == "batch":
      original = TASK_CLS.batch

      def batch(task, split, step, batch_size):
        if split == "train" and step == n:
          raise SimulatedKill(f"before train batch {step}")
        return original(task, split, step, batch_size)
      mp.setattr(TASK_CLS, "batch", batch)
    elif kind == "during_write":  # data written, not yet renamed into place
      original = atomicity.AtomicRenameTemporaryPath.finalize

      async def finalize(path, *args, **kwargs):
        if self._hit():
          raise SimulatedKill("inside a checkpoint write")
        return await original(path, *args, **kwargs)
      mp.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    elif kind == "after_save":  # between best and latest, or after latest
      original = ocp.CheckpointManager.save

      def save(manager, *args, **kwargs):
        out = original(manager, *args, **kwargs)
        manager.wait_until_finished()
        if self._hit():
          raise SimulatedKill(f"right after saving into {manager.directory}")
        return out
      mp.setattr(ocp.CheckpointManager, "save", save)
    elif kind in ("torn_metrics", "after_test_record"):
      original = metrics_io.MetricWriter.write

      def write(writer, step, split, metrics):
        if kind == "torn_metrics" and self._hit():
          with open(writer.path, "a", encoding="utf-8") as f:
            f.write('{"step": %d, "split": "%s", "lo' % (step, split))
          raise SimulatedKill("halfway through a metrics line")
        original(writer, step, split, metrics)
        if kind == "after_test_record" and split == "test":
          raise SimulatedKill("after the test record, before figures")
      mp.setattr(metrics_io.MetricWriter, "write", write)
    elif kind == "final_eval":
      original = train.evaluate

      def evaluate(problem, params, task, split, cfg):
        if split == "test":
          raise SimulatedKill("during the final evaluation")
        return original(problem, params, task, split, cfg)
      mp.setattr(train, "evaluate", evaluate)
    else:
      raise ValueError(kind)

  def _hit(self):
    self.calls += 1
    return self.calls == self.n


KINDS = ("batch", "during_write", "after_save", "torn_metrics", "final_eval",
         "after_test_record")


@pytest.mark.parametrize("seed", range(4))
def test_kills_at_random_instants_resume_like_an_uninterrupted_run(
    seed, straight, tmp_path, monkeypatch):
  """Two kills at random instants (one of KINDS each, at a random call),
  then a resume: same metrics.jsonl (one test record), same latest and best
  checkpoints, same parameters, no temporary files."""
  rng = random.Random(seed)
  kinds = [KINDS[(seed + i) % len(KINDS)] for i in (0, 3)]
  workdir = str(tmp_path / "run")
  cfg = config()
  for kind in kinds:
    n = rng.randint(1, 7) if kind != "after_save" else rng.randint(1, 6)
    with monkeypatch.context() as mp:
      Killer(mp, kind, n)
      try:
        train.train_and_evaluate(cfg, workdir)
      except SimulatedKill:
        pass
  train.train_and_evaluate(cfg, workdir)
  assert_same_run(workdir, straight[0], cfg)


def test_kill_between_best_and_latest_keeps_best_current(straight, tmp_path,
                                                          monkeypatch):
  """The issue's case: step 4 is evaluated, saved as best, killed before it
  is saved as latest; the resumed run's best step and test metrics are the
  uninterrupted run's."""
  workdir = str(tmp_path / "run")
  cfg = config()
  original = ocp.CheckpointManager.save
  seen = []

  def save(manager, step, *args, **kwargs):
    out = original(manager, step, *args, **kwargs)
    manager.wait_until_finished()
    seen.append((os.path.basename(str(manager.directory)), step))
    if seen[-1] == ("best", 4):
      raise SimulatedKill("between the two saves")
    return out

  with monkeypatch.context() as mp:
    mp.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(SimulatedKill):
      train.train_and_evaluate(cfg, workdir)
  assert seen[-1] == ("best", 4) and ("latest", 4) not in seen
  result = train.train_and_evaluate(cfg, workdir)
  assert result == straight[1]
  assert_same_run(workdir, straight[0], cfg)


# ---------------------------------------------------------------- provenance

def test_workdir_records_config_and_provenance(straight):
  path = straight[0]
  with open(provenance.config_path(path), encoding="utf-8") as f:
    recorded = json.load(f)
  assert recorded == json.loads(json.dumps(config().to_dict()))
  (record,) = provenance.read_provenance(path)
  assert record["start_step"] == 0 and record["argv"] == sys.argv
  assert {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "attn"} <= set(
      record["versions"])
  assert record["versions"]["jax"] == jax.__version__
  assert record["devices"] == [str(d) for d in jax.devices()]
  if os.path.exists(os.path.join(REPO, ".git")):
    assert len(record["git"]["commit"]) == 40


def test_resume_with_a_results_changing_config_is_refused(straight, tmp_path):
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(straight[0], workdir)
  before = metrics_io.read_metrics(workdir)
  cfg = config(**{"model.positional": "alibi", "learning_rate": 0.5})
  with pytest.raises(train.ConfigError) as e:
    train.train_and_evaluate(cfg, workdir)
  message = str(e.value)
  assert "\n" not in message
  assert "model.positional: 'sinusoidal' -> 'alibi'" in message
  assert "learning_rate" in message and "--workdir" in message
  assert "--config.fresh_start=True" in message
  assert metrics_io.read_metrics(workdir) == before  # nothing touched
  # Bookkeeping fields may differ: the run resumes (and trains 0 steps).
  cfg = config(eval_every_steps=2, log_every_steps=4, keep_checkpoints=3,
               **{"figures.num_examples": 1, "mesh.data": 1})
  assert train.train_and_evaluate(cfg, workdir) == straight[1]


def test_num_train_steps_may_grow_unless_the_schedule_is_cosine():
  old = config(schedule="constant").to_dict()
  new = config(schedule="constant", num_train_steps=20).to_dict()
  assert provenance.differences(old, new) == []
  assert provenance.differences(new, old) == ["num_train_steps: 20 -> 8"]
  cos_old, cos_new = config().to_dict(), config(num_train_steps=20).to_dict()
  assert provenance.differences(cos_old, cos_new) == [
      "num_train_steps: 8 -> 20"]


def test_default_workdir_differs_for_different_experiments():
  d = provenance.default_workdir
  assert d("configs/default.py", {}) == os.path.join("runs", "default")
  alibi = d("configs/default.py", {"model.positional": "alibi"})
  assert alibi == os.path.join("runs", "default-model.positional=alibi")
  assert d("configs/default.py", {"model.positional": "rope"}) != alibi
  # Bookkeeping overrides keep the experiment (and so its workdir).
  assert d("configs/default.py", {"eval_every_steps": 5, "mesh.data": 2,
                                  "model.positional": "alibi"}) == alibi
  assert d("configs/dates.py:tiny", {}) == os.path.join("runs", "dates_tiny")
  cosine = {"schedule": "cosine"}
  assert d("c.py", {"num_train_steps": 9}, cosine) != d("c.py", {}, cosine)
  assert d("c.py", {"num_train_steps": 9}, {"schedule": "constant"}) == d(
      "c.py", {})
  odd = d("c.py", {"model.attention": "chunked(block_size=8)"})
  assert "(" not in odd and odd != d("c.py", {"model.attention": "chunked"})


# ------------------------------------------------------------- metrics.jsonl

def test_reruns_keep_one_test_record_and_drop_a_torn_line(straight, tmp_path,
                                                          caplog):
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(straight[0], workdir)
  want = metrics_io.read_metrics(straight[0])
  train.train_and_evaluate(config(), workdir)
  with open(metrics_io.metrics_path(workdir), "a", encoding="utf-8") as f:
    f.write('{"step": 9, "spl')  # a torn last line
  assert metrics_io.read_metrics(workdir) == want  # dropped, with a warning
  train.train_and_evaluate(config(), workdir)
  assert metrics_io.read_metrics(workdir) == want
  with open(metrics_io.metrics_path(workdir), encoding="utf-8") as f:
    assert f.read().endswith("}\n")


def test_damaged_metrics_line_before_the_last_is_named(tmp_path):
  path = metrics_io.metrics_path(str(tmp_path))
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"step": 1}\n{oops\n{"step": 2}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    metrics_io.read_metrics(str(tmp_path))


def test_metrics_rewrite_is_atomic(tmp_path, monkeypatch):
  path = metrics_io.metrics_path(str(tmp_path))
  lines = [json.dumps({"step": s, "split": "train"}) + "\n" for s in (1, 2)]
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(lines)

  def dying_replace(src, dst):
    raise SimulatedKill("before the rename")
  monkeypatch.setattr(os, "replace", dying_replace)
  with pytest.raises(SimulatedKill):
    metrics_io.truncate_metrics(str(tmp_path), 1)
  with open(path, encoding="utf-8") as f:
    assert f.read() == "".join(lines)  # old content, whole
  assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file
  monkeypatch.undo()
  metrics_io.truncate_metrics(str(tmp_path), 1)
  assert metrics_io.read_metrics(str(tmp_path)) == [{"step": 1,
                                                     "split": "train"}]


# ---------------------------------------------------------------- fresh_start

def _digest(folder):
  out = {}
  for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(
            f.read()).hexdigest()
  return out


def test_fresh_start_sets_the_whole_previous_run_aside(straight, tmp_path):
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(straight[0], workdir)
  os.makedirs(os.path.join(workdir, "figures"))
  with open(os.path.join(workdir, "figures", "old.png"), "wb") as f:
    f.write(b"old picture")
  before = _digest(workdir)
  cfg = config(fresh_start=True)
  train.train_and_evaluate(cfg, workdir)
  (aside,) = glob.glob(os.path.join(workdir, workdir_lib.SET_ASIDE, "*"))
  assert _digest(aside) == before  # everything, byte for byte
  assert {"checkpoints", "metrics.jsonl", "tensorboard", "figures",
          "config.json", "provenance.jsonl"} <= set(os.listdir(aside))
  assert not os.path.exists(os.path.join(workdir, "figures", "old.png"))
  assert len([r for r in metrics_io.read_metrics(workdir)
              if r["split"] == "test"]) == 1


# ----------------------------------------------------------------------- lock

def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_lock_of_a_live_process_is_refused_and_a_dead_ones_taken_over(
    tmp_path, straight):
  workdir = str(tmp_path)
  lock = workdir_lib.lock_path(workdir)
  holder = {"pid": os.getppid(), "host": socket.gethostname(),
            "started": "2030-01-01T00:00:00"}
  with open(lock, "w", encoding="utf-8") as f:
    json.dump(holder, f)
  with pytest.raises(train.WorkdirError) as e:
    train.train_and_evaluate(config(), workdir)
  message = str(e.value)
  assert f"pid {os.getppid()} on host {socket.gethostname()}" in message
  assert "\n" not in message and os.path.exists(lock)
  with open(lock, "w", encoding="utf-8") as f:
    json.dump(dict(holder, host="another-host"), f)  # cannot be checked
  with pytest.raises(train.WorkdirError, match="another-host"):
    train.train_and_evaluate(config(), workdir)
  with open(lock, "w", encoding="utf-8") as f:
    json.dump(dict(holder, pid=_dead_pid()), f)
  assert train.train_and_evaluate(config(), workdir) == straight[1]
  assert not os.path.exists(lock)  # released when the run ends


# -------------------------------------------------------------- preemption

def test_sigint_stops_at_a_step_boundary_and_resumes_bit_identically(
    straight, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  cfg = config()
  original = metrics_io.Progress.update
  # Whatever the process had before (SIG_IGN when pytest was started in the
  # background by a non-interactive shell) is what the run must put back.
  before = signal.getsignal(signal.SIGINT)

  def update(progress, step, loss):
    original(progress, step, loss)
    if step == 2:  # the signal arrives while step 3 is being dispatched
      os.kill(os.getpid(), signal.SIGINT)

  with monkeypatch.context() as mp:
    mp.setattr(metrics_io.Progress, "update", update)
    with pytest.raises(train.Preempted) as e:
      train.train_and_evaluate(cfg, workdir)
  assert (e.value.step, e.value.exit_code) == (3, 130)
  assert "SIGINT at step 3" in str(e.value)
  assert sorted(os.listdir(checkpoints.latest_dir(workdir))) == ["2", "3"]
  assert signal.getsignal(signal.SIGINT) is before
  train.train_and_evaluate(cfg, workdir)
  assert_same_run(workdir, straight[0], cfg)


def test_sigterm_to_main_saves_prints_one_line_and_exits_143(straight,
                                                             tmp_path):
  """A real SIGTERM to ``experiments.main`` while it trains; meanwhile a
  second ``python -m experiments.main`` on the same workdir is refused by
  the lock.

  The first process runs ``experiments.main`` as ``__main__`` with its
  train batches from step 3 on held until the test has sent the signal
  (:data:`_GATED_MAIN`), so the signal always lands mid-training however
  fast the machine: ungated, a fast machine finished all 8 steps before the
  second process had even started.
  """
  workdir = str(tmp_path / "run")
  gate = str(tmp_path / "gate")
  flags = [f"--config={os.path.join(REPO, 'configs', 'copy.py')}",
           f"--workdir={workdir}", *_flags_for(config())]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *command: subprocess.Popen(  # noqa: E731
      [sys.executable, *command, *flags], cwd=REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  child = run("-c", _GATED_MAIN, gate)
  try:
    deadline = time.time() + 600
    while not os.path.exists(provenance.config_path(workdir)):
      assert child.poll() is None and time.time() < deadline
      time.sleep(0.05)
    second = run("-m", "experiments.main")
    _, err2 = second.communicate(timeout=600)
    assert child.poll() is None  # still training: held at step 3
    child.send_signal(signal.SIGTERM)
    with open(gate, "w", encoding="utf-8"):
      pass
    _, err = child.communicate(timeout=600)
  finally:
    child.kill()
  assert second.returncode == 1
  assert err2.strip().splitlines()[-1].startswith("error: ")
  assert f"pid {child.pid} on host" in err2 and "Traceback" not in err2
  assert child.returncode == 143, err
  assert "Traceback" not in err
  (line,) = [x for x in err.splitlines() if "stopped by SIGTERM" in x]
  step = int(line.split("at step ")[1].split(";")[0])
  assert str(step) in os.listdir(checkpoints.latest_dir(workdir))
  assert not [p for p in glob.glob(os.path.join(workdir, "**"),
                                   recursive=True)
              if "tmp" in os.path.basename(p)]
  train.train_and_evaluate(config(), workdir)
  assert_same_run(workdir, straight[0], config())


# ``python -c _GATED_MAIN <gate file> <flags of experiments.main>``: the
# command-line entry point itself, with the copy task's train batches from
# step 3 on waiting until the gate file exists.
_GATED_MAIN = """
import os, runpy, sys, time
from experiments.data import algorithmic
gate = sys.argv.pop(1)
original = algorithmic.Copy.batch
def batch(self, split, step, batch_size):
  while split == "train" and step >= 3 and not os.path.exists(gate):
    time.sleep(0.02)
  return original(self, split, step, batch_size)
algorithmic.Copy.batch = batch
sys.argv[0] = "experiments.main"
runpy.run_module("experiments.main", run_name="__main__", alter_sys=True)
"""


def _flags_for(cfg):
  """--config.* flags turning configs/copy.py into ``cfg``."""
  import importlib
  base = provenance.flatten(importlib.import_module(
      "configs.copy").get_config().to_dict())
  return [f"--config.{k}={v}" for k, v in provenance.flatten(
      cfg.to_dict()).items() if base.get(k) != v]


# ------------------------------------------------------ full / read-only disk

def test_full_disk_is_one_error_naming_the_path_and_keeps_checkpoints(
    straight, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  cfg = config()
  original = ocp.CheckpointManager.save
  before = []

  def full(manager, step, *args, **kwargs):
    if step >= 4:
      before.append(_digest(checkpoints.checkpoints_dir(workdir)))
      raise OSError(errno.ENOSPC, "No space left on device",
                    os.path.join(str(manager.directory), str(step)))
    return original(manager, step, *args, **kwargs)

  with monkeypatch.context() as mp:
    mp.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(train.WorkdirError) as e:
      train.train_and_evaluate(cfg, workdir)
  message = str(e.value)
  assert "\n" not in message and "the disk is full" in message
  assert os.path.join(workdir, "checkpoints") in message
  assert _digest(checkpoints.checkpoints_dir(workdir)) == before[0]
  assert os.listdir(checkpoints.latest_dir(workdir)) == ["2"]
  train.train_and_evaluate(cfg, workdir)  # space freed: resume
  assert_same_run(workdir, straight[0], cfg)


def test_read_only_workdir_is_one_error_naming_the_path(tmp_path,
                                                        monkeypatch):
  workdir = str(tmp_path / "ro")
  os.makedirs(workdir)
  if os.geteuid() != 0:
    os.chmod(workdir, 0o555)
  else:  # root writes anywhere: make the file system refuse instead
    real_open = os.open

    def read_only(path, *args, **kwargs):
      if str(path).startswith(workdir):
        raise OSError(errno.EROFS, "Read-only file system", path)
      return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
  try:
    with pytest.raises(train.WorkdirError) as e:
      train.train_and_evaluate(config(), workdir)
  finally:
    os.chmod(workdir, 0o755)
  assert "\n" not in str(e.value)
  assert f"cannot write {workdir_lib.lock_path(workdir)}" in str(e.value)
