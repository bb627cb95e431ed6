"""Shared pytest fixtures for the attention tests.

Float64 references live in :mod:`tests.reference` (importable by any test
module); this file holds fixtures only.
"""

import os
import tempfile

# One persistent compilation cache for the whole session: pytest-xdist
# workers and the subprocesses tests start (which inherit the environment)
# compile a program that another process already compiled only once.
# Results are unchanged: a cache hit loads the same executable. Every
# program is cached, however quick to compile: most of the suite's are the
# small ones of eager (op-by-op) JAX, and a rerun loads them (about 1.7x
# faster on the model tests) instead of compiling them again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"attn-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# XLA's cheapest CPU compilation for every program the tests compile (in
# this process and, through the environment, in the subprocesses they start):
# compilation is most of the suite's time, and these flags cut it 2-6x. They
# turn off LLVM's optimisations and the new fusion emitters only; XLA's HLO
# passes (fusion decisions, buffer assignment, so memory_analysis) are the
# same, results agree to float rounding, and every assertion is unchanged.
# ATTN_TEST_XLA_FLAGS="" compiles as users do; flags already in XLA_FLAGS
# come later and win.
from tests.multidevice_helpers import TEST_XLA_FLAGS  # pylint: disable=g-import-not-at-top,wrong-import-position
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      filter(None, [TEST_XLA_FLAGS, os.environ.get("XLA_FLAGS", "")]))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def np_rng():
  """A fresh, seeded NumPy generator per test (reproducible inputs)."""
  return np.random.default_rng(0)


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
  """Runs a test body twice: once eagerly and once under ``jax.jit``.

  Use as ``maybe_jit(fn)(*array_args)``; non-array options must be bound
  into ``fn`` (e.g. with a lambda) so they stay static.
  """
  return jax.jit if request.param else (lambda fn: fn)


def pytest_configure(config):
  # A restore of a corrupt checkpoint fails (CheckpointError, tested) while
  # Orbax still holds read coroutines it never schedules; whichever later
  # test happens to be running when they are garbage-collected would get
  # this warning. It is the same abandoned read whose "Event loop is closed"
  # errors experiments.checkpoints already drops.
  from experiments import checkpoints  # pylint: disable=g-import-not-at-top
  config.addinivalue_line(
      "filterwarnings",
      f"ignore:{checkpoints.ABANDONED_READ_WARNING}:RuntimeWarning")
