"""The background batch prefetcher and the loop's device-to-host traffic."""

import threading
import time

import jax
import pytest

from experiments import prefetch
from experiments import train
from tests.test_experiments import tiny


def _recording_make(calls, fail_at=None, error=RuntimeError):
  def make(step):
    calls.append(step)
    if step == fail_at:
      raise error(f"bad batch {step}")
    return {"step": step}
  return make


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_batches_come_in_order_whatever_the_depth(depth):
  calls = []
  p = prefetch.Prefetcher(_recording_make(calls), 3, 12, depth=depth)
  try:
    assert [p.get(s)["step"] for s in range(3, 12)] == list(range(3, 12))
  finally:
    p.close()
  assert calls == list(range(3, 12))  # each batch made once


def test_runs_ahead_by_at_most_its_depth():
  calls = []
  p = prefetch.Prefetcher(_recording_make(calls), 0, 100, depth=2)
  try:
    p.get(0)
    deadline = time.time() + 10
    while len(calls) < 4 and time.time() < deadline:
      time.sleep(0.01)
    time.sleep(0.1)
    # Step 0 taken; 1 and 2 queued; 3 made and waiting for room.
    assert calls == [0, 1, 2, 3]
  finally:
    p.close()
  assert not any(t.name == "attn-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_is_raised_at_the_step_that_made_it(error):
  p = prefetch.Prefetcher(_recording_make([], fail_at=3, error=error), 0, 10,
                          depth=2)
  for s in range(3):
    assert p.get(s)["step"] == s
  with pytest.raises(error, match="bad batch 3"):
    p.get(3)
  p.close()


def test_steps_must_be_consecutive():
  p = prefetch.Prefetcher(_recording_make([]), 0, 10, depth=0)
  p.get(0)
  with pytest.raises(ValueError, match="expected step 1"):
    p.get(2)


def test_loop_fetches_metrics_only_when_it_needs_them(tmp_path, monkeypatch):
  """Train metrics leave the device at the first step (it reports the
  compilation time), at log, checkpoint and eval steps, and nowhere else;
  every step's loss is still checked there."""
  config = tiny("copy", num_train_steps=12, log_every_steps=4,
                checkpoint_every_steps=6, eval_every_steps=12,
                **{"figures.enabled": False})
  fetched = []
  real = jax.device_get

  def device_get(x):
    if isinstance(x, list) and x and isinstance(x[0], tuple):
      fetched.append([step for step, _ in x])
    return real(x)
  monkeypatch.setattr(jax, "device_get", device_get)
  train.train_and_evaluate(config, str(tmp_path))
  assert fetched == [[1], [2, 3, 4], [5, 6], [7, 8], [9, 10, 11, 12]]


def test_a_nan_between_log_steps_is_caught_before_anything_is_saved(
    tmp_path, monkeypatch):
  config = tiny("copy", num_train_steps=8, log_every_steps=4,
                checkpoint_every_steps=4, eval_every_steps=8,
                **{"figures.enabled": False})
  real = jax.device_get

  def device_get(x):
    out = real(x)
    if isinstance(out, list) and out and isinstance(out[0], tuple):
      out = [(s, dict(m, loss=float("nan")) if s == 3 else m)
             for s, m in out]
    return out
  monkeypatch.setattr(jax, "device_get", device_get)
  with pytest.raises(train.NonFiniteLossError, match="at step 3"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints" / "latest" / "4").exists()


def test_loop_overhead_measurement_times_both_sides():
  from experiments.bench import loop  # pylint: disable=g-import-not-at-top
  result = loop.measure(tiny("copy"), steps=3, repeats=1)
  assert result["bare_ms"] > 0 and result["loop_ms"] > 0
  assert result["overhead"] == pytest.approx(
      result["loop_ms"] / result["bare_ms"] - 1)
