"""Tests of Nystromformer attention ``nystrom``."""

import jax.numpy as jnp
import numpy as np

from tests.reference import reference_output
from tests.variant_helpers import T, H, DV, make_inputs, run


def _smooth(b, t, n, h, seed):
  """Low-frequency sequences: the regime landmarks are designed for."""
  rng = np.random.default_rng(seed)
  pos = np.arange(t)[:, None] / t
  x = sum(np.sin(np.pi * (i + 1) * pos + rng.normal(size=h))
          * rng.normal(size=h) for i in range(3))
  x = np.broadcast_to(x[None, :, None, :], (b, t, n, h))
  return jnp.asarray(x + 0.1 * rng.normal(size=(b, t, n, h)), jnp.float32)


def test_nystrom_error_falls_with_landmarks_and_is_exact_at_t():
  t = 32
  errors = {m: [] for m in (2, 8, 32)}
  for seed in range(3):
    q, k = _smooth(1, t, 2, H, 3 * seed), _smooth(1, t, 2, H, 3 * seed + 1)
    v = jnp.asarray(np.random.default_rng(seed).normal(size=(1, t, 2, DV)),
                    jnp.float32)
    exact = reference_output(q, k, v)
    for m in errors:
      out = run(f"nystrom(num_landmarks={m})", q, k, v)
      errors[m].append(np.abs(np.asarray(out) - exact).mean())
  mean = {m: np.mean(e) for m, e in errors.items()}
  assert mean[2] > mean[8] > mean[32]
  q, k, v = make_inputs(t=t, s=t, seed=16)
  full = run(f"nystrom(num_landmarks={t}, pinv_iterations=20)", q, k, v)
  np.testing.assert_allclose(full, reference_output(q, k, v),
                             rtol=1e-4, atol=1e-4)


def test_nystrom_padding_equals_truncation():
  q, k, v = make_inputs(seed=17)
  spec = "nystrom(num_landmarks=4)"
  padded = run(spec, q, k, v, key_value_seq_lengths=jnp.array([T, 10]))
  np.testing.assert_allclose(padded[1:],
                             run(spec, q[1:], k[1:, :10], v[1:, :10]),
                             rtol=1e-5, atol=1e-5)
