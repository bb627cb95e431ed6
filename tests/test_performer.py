"""Tests of Performer (FAVOR+) attention ``performer``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.kernels import performer as performer_lib
from tests.reference import reference_mask, reference_output
from tests.variant_helpers import B, T, N, K, H, DV, make_inputs, run


def test_performer_error_shrinks_with_features():
  q, k, v = make_inputs(b=4, t=16, n=2, k=2, seed=12, scale=0.6)
  exact = reference_output(q, k, v)
  errors = [np.mean([np.abs(np.asarray(run(
      f"performer(num_features={m})", q, k, v,
      rng=jax.random.PRNGKey(seed))) - exact).mean() for seed in range(3)])
            for m in (16, 256, 2048, 16384)]
  assert errors[0] > errors[1] > errors[2] > errors[3]
  # Unbiased: the error keeps falling like 1/sqrt(M) (no plateau).
  assert errors[3] < 0.3 * errors[1]


@pytest.mark.parametrize("causal", [False, True])
def test_performer_equals_quadratic_form_of_its_features(causal):
  """Chunked scan == (φ(q)φ(k)ᵀ ⊙ mask) v / rowsum with the same W (f64)."""
  q, k, v = make_inputs(seed=24)
  out = run("performer(num_features=24, seed=5, chunk_size=3)", q, k, v,
             is_causal=causal, key_value_seq_lengths=jnp.array([T, 12]))
  w = np.asarray(performer_lib.orthogonal_features(
      *performer_lib.gaussian_draws(None, 5, 24, H)), np.float64)
  phi = lambda x: np.exp(x @ w.T / H ** 0.25
                         - 0.5 * np.sum(x * x, -1, keepdims=True) / H ** 0.5)
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  mask = reference_mask(B, T, T, is_causal=causal, kv_lengths=[T, 12])
  ref = np.zeros((B, T, N, DV))
  for b in range(B):
    for n in range(N):
      a = phi(q64[b, :, n]) @ phi(k64[b, :, n // (N // K)]).T * mask[b, 0]
      ref[b, :, n] = a @ v64[b, :, n // (N // K)] / a.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_performer_randomness_is_seeded():
  q, k, v = make_inputs(seed=13)
  out = lambda spec, **kw: np.asarray(run(spec, q, k, v, **kw))
  np.testing.assert_array_equal(out("performer(seed=3)"),
                                out("performer(seed=3)"))
  assert not np.allclose(out("performer(seed=3)"), out("performer(seed=4)"))
  key7, key8 = jax.random.PRNGKey(7), jax.random.PRNGKey(8)
  with_rng = out("performer(seed=3)", rng=key7)   # rng replaces the seed
  np.testing.assert_array_equal(with_rng, out("performer(seed=3)", rng=key7))
  assert not np.allclose(with_rng, out("performer(seed=3)"))
  assert not np.allclose(with_rng, out("performer(seed=3)", rng=key8))


@pytest.mark.parametrize("s", [11, 23])
def test_performer_causal_alignment_padding_and_grads(s):
  """Causal performer (native-layout prefix sums) with S != T, key lengths,
  a query padding mask, GQA and T=16 with chunk 5 equals the float64
  brute-force form of its own features (same W), forward and jax.grad."""
  from tests.test_linear import favor_phi, reference_and_grads  # pylint: disable=g-import-not-at-top
  from tests.variant_helpers import call_and_grads  # pylint: disable=g-import-not-at-top
  q, k, v = make_inputs(t=T, s=s, seed=41)
  kv_len = np.array([s, s // 2 - 1])
  # example 0 pads its queries, example 1 its keys
  q_valid = np.arange(T)[None, :] < np.array([9, T])[:, None]
  out, grads = call_and_grads(
      "performer(num_features=24, seed=5, chunk_size=5)", q, k, v,
      is_causal=True, key_value_seq_lengths=jnp.asarray(kv_len),
      mask=jnp.asarray(q_valid)[:, None, :, None])
  w = np.asarray(performer_lib.orthogonal_features(
      *performer_lib.gaussian_draws(None, 5, 24, H)))
  kv_valid = np.arange(s)[None, :] < kv_len[:, None]
  want, want_grads = reference_and_grads(
      q, k, v, 2 * out, lambda xp: favor_phi(xp, w, 1 / np.sqrt(H)),
      kv_valid=kv_valid, q_valid=q_valid)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out[0, 9:], 0.0)
  for g, want_g in zip(grads, want_grads):
    np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=2e-5)
