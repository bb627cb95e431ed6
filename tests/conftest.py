"""Shared pytest fixtures for the attention tests.

Float64 references live in :mod:`tests.reference` (importable by any test
module); this file holds fixtures only.
"""

import os
import tempfile

# One persistent compilation cache for the whole session: pytest-xdist
# workers and the subprocesses tests start (which inherit the environment)
# compile a program that another process already compiled only once.
# Results are unchanged: a cache hit loads the same executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"attn-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

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
