"""Tests of hard (one-position) attention ``hard``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.variant_helpers import (B, T, N, K, DV, make_inputs, call,
                                   call_and_grads)


def _is_one_value_row_per_query(out, v):
  v_rep = np.repeat(np.asarray(v, np.float32), N // K, axis=2)
  # distance of out[b, t, n] to each value row v[b, s, n]
  d = np.abs(np.asarray(out, np.float32)[:, :, None]
             - v_rep[:, None, :]).max(-1)  # [B, T, S, N]
  return (d.min(axis=2) == 0).all()


@pytest.mark.parametrize("estimator", ["straight_through", "gumbel"])
def test_hard_attention_picks_one_row_and_has_gradients(estimator):
  q, k, v = make_inputs(seed=10)
  spec = f"hard(estimator={estimator!r}, temperature=0.5)"
  rng = jax.random.PRNGKey(3)
  sampled, (gq, gk, _) = call_and_grads(spec, q, k, v, rng=rng)
  assert _is_one_value_row_per_query(sampled, v)
  # gradients reach the scores through the surrogate
  assert np.isfinite(np.asarray(gq)).all() and np.isfinite(np.asarray(gk)).all()
  assert np.abs(np.asarray(gq)).sum() > 0 and np.abs(np.asarray(gk)).sum() > 0
  # deterministic for a fixed rng, different for another
  again, _ = call_and_grads(spec, q, k, v, rng=rng)
  np.testing.assert_array_equal(sampled, again)
  other, _ = call_and_grads(spec, q, k, v, rng=jax.random.PRNGKey(4))
  assert not np.array_equal(sampled, other)
  # without rng: the argmax of the allowed scores
  mask = np.random.default_rng(11).random((B, 1, T, T)) < 0.5
  argmax = call(spec, q, k, v, mask=jnp.asarray(mask))
  qq, kk = np.asarray(q, np.float64), np.repeat(np.asarray(k), N // K, 2)
  s = np.where(mask, np.einsum("btnh,bsnh->bnts", qq, kk), -np.inf)
  pick = np.argmax(s, -1)  # [B, N, T]
  v_rep = np.repeat(np.asarray(v), N // K, axis=2)
  want = np.stack([v_rep[b, pick[b, n], n] for b in range(B)
                   for n in range(N)]).reshape(B, N, T, DV)
  want = np.where(mask.any(-1)[..., None], want, 0.0)
  np.testing.assert_array_equal(argmax, want.transpose(0, 2, 1, 3))
  if estimator == "gumbel":  # deterministic=True ignores the rng
    np.testing.assert_array_equal(
        argmax, call(spec, q, k, v, mask=jnp.asarray(mask), rng=rng,
                      deterministic=True))
