"""``nadaraya_watson``: 1-D kernel regression, attention as a smoother.

Data ``y = 2 sin(x) + x + noise`` (noise ~ N(0, noise_std^2)) on
``x in [0, x_max]``. Each example is its own small data set: ``keys`` are
``num_keys`` sorted uniform points with noisy ``values``, and the model
predicts ``targets`` at ``queries`` by attending from each query to the keys
(Nadaraya 1964; Watson 1964; the d2l.ai chapter "Attention Pooling").

* train: ``queries`` are fresh sorted uniform points and ``targets`` their
  noisy observations (what a learner can see).
* valid/test: ``queries`` are the grid ``linspace(0, x_max, num_queries)``
  and ``targets`` the noise-free :meth:`NadarayaWatson.function`, so the
  error measures how well the estimator recovers the function.

All arrays float32: ``queries`` ``[B, Q]``, ``keys`` ``[B, K]``, ``values``
``[B, K]``, ``targets`` ``[B, Q]``. The data are continuous, so draws from
different splits (different random streams) coincide with probability 0.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from experiments.data.base import (Batch, Task, check_float, check_int,
                                    split_id)


class NadarayaWatson(Task):
  """Kernel regression of ``2 sin(x) + x`` from noisy samples.

  Options:
    num_keys: training points (keys/values) per example.
    num_queries: query points per example.
    noise_std: standard deviation of the observation noise.
    x_max: inputs lie in ``[0, x_max]``.
  """

  name = "nadaraya_watson"
  kind = "regression"

  def __init__(self, seed: int = 0, *, num_keys: int = 50,
               num_queries: int = 50, noise_std: float = 0.5,
               x_max: float = 5.0):
    super().__init__(seed)
    self.num_keys = check_int(self.name, "num_keys", num_keys, 1)
    self.num_queries = check_int(self.name, "num_queries", num_queries, 1)
    self.noise_std = check_float(self.name, "noise_std", noise_std, 0.0)
    self.x_max = check_float(self.name, "x_max", x_max, 0.0)
    if self.x_max == 0.0:
      raise ValueError(f"{self.name}: x_max must be > 0, got {x_max!r}")

  @staticmethod
  def function(x: np.ndarray) -> np.ndarray:
    """The noise-free target ``2 sin(x) + x`` (same shape and dtype)."""
    return 2.0 * np.sin(x) + x

  def _sample(self, rng: np.random.Generator, split: str, n: int) -> Batch:
    keys = np.sort(rng.uniform(0.0, self.x_max, (n, self.num_keys)), axis=1)
    values = self.function(keys) + self.noise_std * rng.standard_normal(
        keys.shape)
    if split_id(split) == 0:
      queries = np.sort(rng.uniform(0.0, self.x_max, (n, self.num_queries)),
                        axis=1)
      targets = self.function(queries) + self.noise_std * rng.standard_normal(
          queries.shape)
    else:
      grid = np.linspace(0.0, self.x_max, self.num_queries)
      queries = np.broadcast_to(grid, (n, self.num_queries))
      targets = self.function(queries)
    return {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in
            (("queries", queries), ("keys", keys), ("values", values),
             ("targets", targets))}

  def spec(self) -> Dict[str, Any]:
    return {"name": self.name, "kind": self.kind, "num_keys": self.num_keys,
            "num_queries": self.num_queries, "x_max": self.x_max,
            "noise_std": self.noise_std}
