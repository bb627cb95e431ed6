"""Shared pytest fixtures for the attention tests.

Float64 references live in :mod:`tests.reference` (importable by any test
module); this file holds fixtures only.
"""

import jax
import numpy as np
import pytest


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
