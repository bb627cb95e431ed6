"""Tests of Luong local-predictive attention ``local_p``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.variant_helpers import make_inputs, call, random_params


def np_local_p(q, k, v, w_p, v_p, window, causal, length):
  """Loop reference of Luong local-p attention, one example, one head."""
  t_len, s_len = len(q), len(k)
  out = np.zeros((t_len, v.shape[-1]))
  sigma = window / 2
  for t in range(t_len):
    p = length / (1 + np.exp(-(np.tanh(q[t] @ w_p) @ v_p)))
    cands = [s for s in range(min(s_len, length))
             if p - window <= s <= p + window and (not causal or s <= t)]
    if not cands:
      continue
    sc = np.array([q[t] @ k[s] / np.sqrt(q.shape[1]) for s in cands])
    a = np.exp(sc - sc.max())
    a = a / a.sum() * np.exp(-(np.array(cands) - p) ** 2 / (2 * sigma ** 2))
    out[t] = a @ v[cands]
  return out


@pytest.mark.parametrize("causal", [False, True])
def test_local_p_matches_loop_reference(causal):
  q, k, v = make_inputs(b=2, t=12, s=20, n=2, k=2, seed=24)
  spec = "local_p(window=3, hidden=8)"
  p = random_params(spec, q, k)
  p = {"w_p": p["w_p"] * 3.0, "v_p": p["v_p"] * 3.0}  # spread the centres
  lengths = [14, 20]
  out = call(spec, q, k, v, params=p, is_causal=causal,
              key_value_seq_lengths=jnp.array(lengths))
  p64 = {n: np.asarray(x, np.float64) for n, x in p.items()}
  for b in range(2):
    for n in range(2):
      want = np_local_p(*(np.asarray(x, np.float64)[b, :, n]
                          for x in (q, k, v)), p64["w_p"], p64["v_p"], 3,
                        causal, lengths[b])
      np.testing.assert_allclose(out[b, :, n], want, atol=2e-5)
  # the centre predictor is trained through the Gaussian
  g = jax.grad(lambda w: jnp.sum(call(spec, q, k, v, params={
      "w_p": w, "v_p": p["v_p"]}) ** 2))(p["w_p"])
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
