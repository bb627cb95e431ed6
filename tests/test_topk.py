"""Tests of top-k sparse softmax attention ``topk``."""

import jax.numpy as jnp
import numpy as np

from tests.reference import reference_output
from tests.variant_helpers import B, T, N, K, H, make_inputs, call


def test_topk_with_k_at_least_s_is_exact_attention():
  q, k, v = make_inputs(seed=6)
  rng = np.random.default_rng(7)
  bias = rng.normal(size=(1, N, T, T))
  mask = rng.random((B, 1, T, T)) < 0.7
  for kwargs, m in (({}, None), ({"is_causal": True},
                                 np.tril(np.ones((T, T), bool)))):
    for kk in (T, T + 5):
      out = call(f"topk(k={kk})", q, k, v, bias=jnp.asarray(bias),
                  mask=jnp.asarray(mask), **kwargs)
      full = mask if m is None else mask & m
      np.testing.assert_allclose(out, reference_output(q, k, v, full, bias),
                                 atol=2e-5)


def test_topk_keeps_exactly_the_k_best_keys():
  q, k, v = make_inputs(seed=8)
  out = call("topk(k=3)", q, k, v, is_causal=True)
  qq, kk = np.asarray(q, np.float64), np.repeat(np.asarray(k), N // K, 2)
  s = np.einsum("btnh,bsnh->bnts", qq, kk) / np.sqrt(H)
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  kth = -np.sort(-s, axis=-1)[..., 2:3]
  keep = (s >= kth) & np.isfinite(s)
  np.testing.assert_allclose(out, reference_output(q, k, v, keep), atol=2e-5)


def test_topk_error_shrinks_as_k_grows():
  q, k, v = make_inputs(seed=9)
  exact = reference_output(q, k, v)
  errors = [np.abs(call(f"topk(k={kk})", q, k, v) - exact).mean()
            for kk in (1, 4, 8, 16)]
  assert errors[0] > errors[1] > errors[2] > errors[3]
  assert errors[3] < 1e-6
