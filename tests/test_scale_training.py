"""The training loop scaled out gives the single-device run.

``experiments.train.train_and_evaluate`` on 8 simulated CPU devices (data
parallel, and ring attention over a ``seq`` axis), resumed from an 8-device
checkpoint on 4 and on 1 device, and as two real ``jax.distributed``
processes of ``python -m experiments.main``: each must reproduce the
metrics.jsonl curve and final parameters of one uninterrupted run on one
device, to float tolerance. Every run happens in a subprocess with its own
device count (tests/scale_training_helpers.py).
"""

import glob
import os

import numpy as np
import pytest

from tests import scale_training_helpers as helpers

# Runs differ only in the order of float32 reductions (the gradient
# all-reduce, the ring's online softmax) carried through 4 AdamW steps:
# observed differences are <= 2e-7, relative for metrics and absolute for
# parameters.
RTOL, ATOL = 1e-5, 1e-6
ONE_DEVICE = {"mesh.data": 1}
TIMEOUT = 900  # seconds per subprocess, on a busy machine


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every run of this module: ``{name: job result}`` and more.

  Two rounds of concurrent subprocesses sharing one compilation cache:
  8 devices (interrupted, data-parallel and ring runs) beside the
  two-process group; then 1 device (the reference, a resume, and the
  group's checkpoint) beside 4 devices (a resume).
  """
  root = tmp_path_factory.mktemp("scale")
  path = lambda name: str(root / name)  # noqa: E731
  # The session's compilation cache (tests/conftest.py) when there is one:
  # a rerun loads these runs' programs instead of compiling them again.
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or path(
      "compilation_cache")
  resume = lambda name, overrides: {  # noqa: E731
      "workdir": path(name), "copy_from": path("killed8"),
      "overrides": overrides, "params_out": path(name + ".npz")}
  started = []
  try:
    c8 = helpers.run_jobs([
        {"workdir": path("killed8"), "overrides": {"mesh.data": 8},
         "stop_at": 2},
        {"workdir": path("dp8"), "overrides": {"mesh.data": 8},
         "params_out": path("dp8.npz")},
        {"workdir": path("ring"), "params_out": path("ring.npz"),
         "overrides": {"mesh.data": 2, "mesh.seq": 4,
                       "model.attention": "ring", "figures.enabled": True}},
    ], devices=8, cache_dir=cache)
    started.append(c8)
    group = helpers.run_main_processes(path("two_processes"),
                                       {"mesh.data": -1}, cache_dir=cache)
    started += group
    out = {"stdout_two_processes": helpers.finish(group, TIMEOUT)}
    r8 = helpers.result(c8, TIMEOUT)
    c4 = helpers.run_jobs([resume("resumed4", {"mesh.data": 4})], devices=4,
                          cache_dir=cache)
    started.append(c4)
    c1 = helpers.run_jobs([
        {"workdir": path("one"), "overrides": ONE_DEVICE,
         "params_out": path("one.npz")},
        resume("resumed1", ONE_DEVICE),
        {"workdir": path("two_processes"), "overrides": ONE_DEVICE,
         "params_only": True, "params_out": path("two_processes.npz")},
    ], devices=1, cache_dir=cache)
    started.append(c1)
    r1 = helpers.result(c1, TIMEOUT)
    r4 = helpers.result(c4, TIMEOUT)
  finally:
    for child in started:
      child.kill()
  out.update(zip(["killed8", "dp8", "ring"], r8["jobs"]))
  out.update(zip(["one", "resumed1", "two_processes"], r1["jobs"]))
  out["resumed4"] = r4["jobs"][0]
  out["device_counts"] = {"one": r1["device_count"], "four": r4["device_count"],
                          "eight": r8["device_count"]}
  out["params"] = {os.path.basename(p)[:-len(".npz")]: helpers.load_params(p)
                   for p in glob.glob(path("*.npz"))}
  return out


def assert_same_curve(got, want):
  """Same (step, split) records with the same metrics, to float tolerance."""
  curve = ("train", "valid", "test")  # figures may add records of their own
  got = [r for r in got if r["split"] in curve]
  want = [r for r in want if r["split"] in curve]
  assert [(r["step"], r["split"]) for r in got] == [
      (r["step"], r["split"]) for r in want]
  for g, w in zip(got, want):
    assert sorted(g) == sorted(w), (g, w)
    keys = sorted(k for k in w if k not in ("step", "split"))
    np.testing.assert_allclose([g[k] for k in keys], [w[k] for k in keys],
                               rtol=RTOL, atol=ATOL, err_msg=str((g, w)))


def assert_same_params(got, want):
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL,
                               err_msg=name)


def finished(runs, name):
  """``runs[name]``, after checking that its training raised nothing."""
  job = runs[name]
  assert job["error"] is None, f"{name}: {job['error']}"
  return job


def test_reference_run_trains(runs):
  """The one-device run the others are compared with: 4 steps, 2 evals."""
  assert runs["device_counts"]["one"] == 1
  one = finished(runs, "one")
  assert [(r["step"], r["split"]) for r in one["records"]] == [
      (1, "train"), (2, "train"), (2, "valid"), (3, "train"), (4, "train"),
      (4, "valid"), (4, "test")]
  losses = [r["loss"] for r in one["records"] if r["split"] == "train"]
  assert all(np.isfinite(losses)) and len(set(losses)) == 4
  assert one["latest_step"] == 4


def test_data_parallel_on_8_devices_matches_1_device(runs):
  assert runs["device_counts"]["eight"] == 8
  assert_same_curve(finished(runs, "dp8")["records"], runs["one"]["records"])
  assert_same_params(runs["params"]["dp8"], runs["params"]["one"])


def test_checkpoint_from_8_devices_resumes_on_4_and_on_1(runs):
  killed = finished(runs, "killed8")
  assert killed["interrupted"] and killed["latest_step"] == 2
  assert_same_curve(killed["records"], runs["one"]["records"][:3])
  assert runs["device_counts"]["four"] == 4
  for name in ("resumed4", "resumed1"):
    resumed = finished(runs, name)
    # Steps 0 and 1 came from the 8-device checkpoint, not from retraining
    # (step 0's batch is also read once to initialise the model).
    assert 1 not in resumed["train_steps_loaded"], name
    assert resumed["train_steps_loaded"][-2:] == [2, 3], name
    assert_same_curve(resumed["records"], runs["one"]["records"])
    assert_same_params(runs["params"][name], runs["params"]["one"])


def test_two_processes_train_like_one(runs):
  """2 x experiments.main, 1 device each, one shared workdir.

  Each process loads only its half of every batch: had both loaded the
  same rows, the loss would differ from the one-device run's.
  """
  assert all("Finished. Best checkpoint: step 4." in out
             for out in runs["stdout_two_processes"])
  # One curve, written once: only process 0 may write metrics.jsonl.
  assert_same_curve(runs["two_processes"]["records"], runs["one"]["records"])
  assert runs["two_processes"]["latest_step"] == 4
  assert_same_params(runs["params"]["two_processes"], runs["params"]["one"])


def test_ring_attention_in_training_loop_matches_softmax(runs):
  """attention=ring on a 2 (data) x 4 (seq) mesh vs softmax on one device.

  The run ends by drawing its figures: ring attention returns no weights
  to draw, which must not make it fail.
  """
  ring = finished(runs, "ring")
  assert_same_curve(ring["records"], runs["one"]["records"])
  assert_same_params(runs["params"]["ring"], runs["params"]["one"])
  assert "training_curves.png" in ring["figures"]
