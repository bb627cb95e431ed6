"""Reading what a traced function does: its jaxpr's equations."""

from __future__ import annotations

from typing import Iterator

import jax


def equations(jaxpr) -> Iterator:
  """Every equation of ``jaxpr`` and of the jaxprs nested in it (loop and
  branch bodies, custom-VJP and pjit calls), outermost first."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.core.jaxprs_in_params(eqn.params):
      yield from equations(sub)
