"""End-to-end tests of train_and_evaluate: smoke per config, NaN, bad
configs, corrupt checkpoints, determinism (kills and resumes:
tests/test_run_integrity.py)."""

import gc
import glob
import importlib
import json
import os
import shutil
import types
import warnings

import jax
import numpy as np
import pytest

from experiments import checkpoints
from experiments import config_validation
from experiments import train
from experiments import data as tasks_lib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                          "configs")
EXPERIMENT_CONFIGS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
    if os.path.basename(p) not in ("__init__.py", "base.py", "benchmark.py"))


def load_config(name, **overrides):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.runlocal = True
  for key, value in overrides.items():
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return config


def tiny(name, **overrides):
  """runlocal config, made smaller still for unit tests."""
  base = dict(num_train_steps=6, eval_every_steps=3, checkpoint_every_steps=3,
              log_every_steps=3, num_eval_examples=8, eval_batch_size=8,
              **{"figures.num_examples": 1})
  base.update(overrides)
  config = load_config(name)
  config = config_validation.prepare(config)
  for key, value in base.items():
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  config.runlocal = False  # already shrunk; keep the overrides above
  return config


def read_jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


# One config per problem kind draws its pictures in the smoke run.
DRAWN = ("reverse", "reverse_rnn", "digits_vit", "glimpse", "nadaraya_watson",
         "associative_recall", "digits_set_anomaly")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """``name -> (workdir, result)`` of the smoke run of config ``name``,
  trained once per module (tests that need a finished run copy it)."""
  runs = {}

  def get(name):
    if name not in runs:
      path = str(tmp_path_factory.mktemp(name))
      config = tiny(name, **{"figures.enabled": name in DRAWN})
      runs[name] = (path, train.train_and_evaluate(config, path))
    return runs[name]
  return get


def finished_copy(smoke_run, name, tmp_path):
  """A private copy of the finished smoke run of ``name``."""
  path = str(tmp_path / "run")
  shutil.copytree(smoke_run(name)[0], path)
  return path


@pytest.mark.parametrize("name", EXPERIMENT_CONFIGS)
def test_smoke_every_config(name, smoke_run):
  draw = name in DRAWN
  tmp_path, result = smoke_run(name)
  records = read_jsonl(tmp_path)
  # Drawn runs also log what attention looked like (split "attention").
  expected = {"train", "valid", "test"} | ({"attention"} if draw else set())
  assert {r["split"] for r in records} == expected
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  assert result["best_step"] in (3, 6)
  if draw:
    pngs = glob.glob(os.path.join(tmp_path, "figures", "*.png"))
    assert os.path.join(tmp_path, "figures", "training_curves.png") in pngs
    assert len(pngs) >= 2


def test_same_config_same_metrics(tmp_path):
  config = tiny("glimpse", **{"figures.enabled": False})
  a = train.train_and_evaluate(config, str(tmp_path / "a"))
  b = train.train_and_evaluate(config, str(tmp_path / "b"))
  assert read_jsonl(tmp_path / "a") == read_jsonl(tmp_path / "b")
  assert a == b


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path,
                                                            monkeypatch):
  config = tiny("nadaraya_watson", num_train_steps=10,
                checkpoint_every_steps=2, eval_every_steps=100,
                **{"figures.enabled": False})
  cls = type(tasks_lib.get_task("nadaraya_watson"))
  original = cls.batch

  def poisoned(self, split, step, batch_size):
    batch = original(self, split, step, batch_size)
    if split == "train" and step == 4:  # the 5th optimizer step
      batch = dict(batch, values=batch["values"] * np.nan)
    return batch

  monkeypatch.setattr(cls, "batch", poisoned)
  with pytest.raises(train.NonFiniteLossError, match="at step 5"):
    train.train_and_evaluate(config, str(tmp_path))
  latest = os.listdir(tmp_path / "checkpoints" / "latest")
  assert "4" in latest and "5" not in latest


@pytest.mark.parametrize("override,message", [
    ({"model.attention": "no_such_attention"}, "unknown attention"),
    ({"model.attention": "chunked(bogus=1)"}, "no option"),
    ({"model.positional": "spiral"}, "positional"),
    ({"task.name": "no_such_task"}, "task.name"),
    ({"num_train_steps": -5}, "num_train_steps"),
    ({"model.num_heads": 3}, "does not divide"),
    ({"schedule": "sawtooth"}, "schedule"),
    ({"task.options.length": 0}, "length"),
    ({"model.arch": "bogus"}, r"model.arch='bogus'; choose from"),
    ({"model.arch": "glimpse"}, "builds no model for task 'reverse'"),
])
def test_bad_config_fails_before_compiling(override, message, tmp_path):
  config = load_config("reverse", **override)
  with pytest.raises(train.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_misspelled_field_is_reported(tmp_path):
  config = load_config("reverse")
  config.unlock()
  config.num_train_step = 10  # missing "s"
  with pytest.raises(train.ConfigError, match="unknown field "
                     "config.num_train_step"):
    train.train_and_evaluate(config, str(tmp_path))


# A failed restore prints nothing but its error (no "Event loop is closed"
# or "error while reading array index" tracebacks from Orbax's abandoned
# reads, whenever they are garbage-collected).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_is_named_and_fresh_start_sets_it_aside(
    smoke_run, tmp_path):
  config = tiny("copy", **{"figures.enabled": False})
  workdir = finished_copy(smoke_run, "copy", tmp_path)
  step_dir = tmp_path / "run" / "checkpoints" / "latest" / "6"
  for path in glob.glob(str(step_dir / "**" / "*"), recursive=True):
    if os.path.isfile(path) and "metadata" not in path.lower():
      with open(path, "wb") as f:
        f.write(b"garbage")
  with pytest.raises(train.CheckpointError, match=str(step_dir)):
    train.train_and_evaluate(config, workdir)
  config.fresh_start = True
  train.train_and_evaluate(config, workdir)
  aside = glob.glob(os.path.join(workdir, "set_aside", "*", "checkpoints"))
  assert len(aside) == 1  # progress is renamed, never deleted


# A failed restore prints nothing but its error (no "Event loop is closed"
# tracebacks from Orbax's abandoned reads).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_incompatible_checkpoint_is_named(smoke_run, tmp_path):
  config = tiny("copy", **{"figures.enabled": False})
  workdir = finished_copy(smoke_run, "copy", tmp_path)
  config.model.emb_dim = 16
  with pytest.raises(train.ConfigError, match="model.emb_dim: 32 -> 16"):
    train.train_and_evaluate(config, workdir)
  os.remove(os.path.join(workdir, "config.json"))  # records no config
  with pytest.raises(train.CheckpointError, match="checkpoints"):
    train.train_and_evaluate(config, workdir)


class _Pending:
  """An awaitable that never completes: a read still in flight."""

  def __await__(self):
    yield


async def _read_array_index_and_device_put():  # named like Orbax's read
  try:
    await _Pending()
  except BaseException as e:  # as Orbax does
    raise Exception("Encountered error while reading array index") from e


# The abandoned reads above are garbage-collected whenever Python gets to
# them (often in a later test, or at exit); here they are made on purpose.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_abandoned_reads_of_a_failed_restore_print_nothing():
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    checkpoints._quiet_abandoned_reads()  # pylint: disable=protected-access
    never_started = _read_array_index_and_device_put()
    suspended = _read_array_index_and_device_put()
    suspended.send(None)
    del never_started, suspended  # warns / raises while closing
    gc.collect()
  assert not caught, [str(w.message) for w in caught]
  # Other unraisable exceptions still reach the previous hook.
  other = types.SimpleNamespace(exc_value=Exception("x"), object=None)
  assert not checkpoints._is_abandoned_read(other)  # pylint: disable=protected-access


@pytest.mark.parametrize("positional, equivariant",
                         [("none", True), ("learned", False)])
def test_set_anomaly_reports_permutation_error(positional, equivariant):
  """The set-anomaly eval measures equivariance: ~0 without positions,
  clearly non-zero with learned positions (which break it)."""
  from experiments import problems  # pylint: disable=g-import-not-at-top
  config = tiny("digits_set_anomaly", **{"model.positional": positional})
  task = config_validation.make_task(config)
  problem = problems.make_problem(config, task)
  batch = task.batch("train", 0, 8)
  params = jax.jit(problem.init)(jax.random.key(0), batch)
  error = float(problem.eval_step(params, batch)["permutation_error"])
  if equivariant:
    assert error < 1e-5
  else:
    assert error > 1e-3
