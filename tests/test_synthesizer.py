"""Tests of Synthesizer attention ``synthesizer``."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.variant_helpers import B, T, N, K, make_inputs, call, random_params


def test_dense_synthesizer_matches_numpy_mlp():
  q, k, v = make_inputs(seed=12)
  p = random_params("synthesizer(hidden=8)", q, k)
  bias = np.random.default_rng(13).normal(size=(B, 1, T, T))
  out = call("synthesizer(hidden=8)", q, k, v, params=p, is_causal=True,
              bias=jnp.asarray(bias))
  qq = np.asarray(q, np.float64)
  hidden = np.maximum(qq @ np.asarray(p["w1"], np.float64) + p["b1"], 0)
  logits = hidden @ np.asarray(p["w2"], np.float64) + p["b2"]  # [B,T,N,S]
  logits = logits.transpose(0, 2, 1, 3) + bias
  causal = np.tril(np.ones((T, T), bool))
  # the keys do not enter: scores are the logits (scale 1, no q·k)
  w = np.where(causal, np.exp(logits - logits.max(-1, keepdims=True)), 0)
  w = w / w.sum(-1, keepdims=True)
  v_rep = np.repeat(np.asarray(v, np.float64), N // K, axis=2)
  want = np.einsum("bnts,bsnd->btnd", w, v_rep)
  np.testing.assert_allclose(out, want, atol=2e-5)


def test_random_synthesizer_table_and_trainable_flag():
  q, k, v = make_inputs(t=5, s=7, seed=14)
  table = jnp.asarray(np.random.default_rng(15).normal(size=(N, 8, 9)),
                      jnp.float32)  # larger than needed: sliced
  out = call("synthesizer(kind='random')", q, k, v,
              params={"table": table})
  logits = np.asarray(table, np.float64)[:, :5, :7]
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  v_rep = np.repeat(np.asarray(v, np.float64), N // K, axis=2)
  np.testing.assert_allclose(out, np.einsum("nts,bsnd->btnd", w, v_rep),
                             atol=2e-5)

  def table_grad(spec):
    return jax.grad(lambda t: jnp.sum(call(spec, q, k, v, params={
        "table": t}) ** 2))(table)

  assert np.abs(np.asarray(table_grad("synthesizer(kind='random')"))).sum() > 0
  assert not np.asarray(
      table_grad("synthesizer(kind='random', trainable=False)")).any()
