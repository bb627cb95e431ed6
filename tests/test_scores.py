"""Tests for the classic score functions in ``attn.scores``.

Each score is checked against its formula written in float64 NumPy, and
``score_attention`` against a masked float64 softmax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import scores
from tests.reference import reference_attention, reference_from_logits

T, S, H, HK, A = 3, 4, 5, 6, 7


@pytest.fixture
def qk(np_rng):
  return np_rng.standard_normal((T, H)), np_rng.standard_normal((S, H))


def _np_scores(name, q, k, **p):
  """The textbook formula of each score, float64, for one head."""
  if name == "dot":
    return q @ k.T
  if name == "scaled_dot":
    return q @ k.T * p.get("scale", 1 / np.sqrt(q.shape[-1]))
  if name == "general":
    return q @ p["w_HK"] @ k.T
  if name == "additive":
    out = np.zeros((len(q), len(k)))
    for t in range(len(q)):
      for s in range(len(k)):
        out[t, s] = p["v_A"] @ np.tanh(p["w_q_HA"].T @ q[t]
                                       + p["w_k_KA"].T @ k[s])
    return out
  if name == "cosine":
    cos = (q @ k.T) / np.outer(np.linalg.norm(q, axis=-1),
                               np.linalg.norm(k, axis=-1))
    return p.get("beta", 1.0) * cos
  if name == "location":
    return (q @ p["w_HL"])[:, :len(k)]
  if name == "uniform":
    return np.zeros((len(q), len(k)))
  raise AssertionError(name)


def _params(name, rng, hk=H):
  return {
      "dot": {}, "scaled_dot": {}, "cosine": {"beta": 3.0}, "uniform": {},
      "general": {"w_HK": rng.standard_normal((H, hk))},
      "additive": {"w_q_HA": rng.standard_normal((H, A)),
                   "w_k_KA": rng.standard_normal((hk, A)),
                   "v_A": rng.standard_normal(A)},
      "location": {"w_HL": rng.standard_normal((H, S + 2))},
  }[name]


@pytest.mark.parametrize("name", sorted(scores.SCORES))
def test_score_matches_numpy_formula(np_rng, qk, name):
  q, k = qk
  params = _params(name, np_rng)
  got = scores.get_score(name)(
      jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
      **{n: jnp.asarray(x, jnp.float32) for n, x in params.items()})
  assert got.shape == (T, S) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_scores(name, q, k, **params),
                             rtol=1e-5, atol=1e-5)


def test_scaled_dot_explicit_scale_and_bf16_inputs(qk):
  q, k = qk
  got = scores.scaled_dot(jnp.asarray(q, jnp.bfloat16),
                          jnp.asarray(k, jnp.bfloat16), scale=0.5)
  assert got.dtype == jnp.float32
  qb, kb = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
            for x in (q, k))
  np.testing.assert_allclose(got, 0.5 * qb @ kb.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["general", "additive"])
def test_key_dim_may_differ_from_query_dim(np_rng, name):
  q = np_rng.standard_normal((T, H))
  k = np_rng.standard_normal((S, HK))
  params = _params(name, np_rng, hk=HK)
  got = scores.get_score(name)(q, k, **params)
  np.testing.assert_allclose(got, _np_scores(name, q, k, **params),
                             rtol=1e-5, atol=1e-5)


def test_location_ignores_key_values(np_rng, qk):
  q, k = qk
  w = np_rng.standard_normal((H, S))
  a = scores.location(q, k, w)
  b = scores.location(q, 10 * k + 3, w)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fn, args, match", [
    (scores.general, [np.ones((S, H + 1))], r"\[Hq, Hk\]=\(5, 5\)"),
    (scores.additive, [np.ones((H, A)), np.ones((H, A + 1)), np.ones(A)],
     "inconsistent attention width"),
    (scores.location, [np.ones((H, S - 1))], r"L>=4"),
])
def test_bad_parameter_shapes(qk, fn, args, match):
  with pytest.raises(ValueError, match=match):
    fn(*qk, *args)


def test_uniform_attention_is_the_mean_of_attendable_values(np_rng):
  q, k, v = (np_rng.standard_normal((2, n, 1, H)).astype(np.float32)
             for n in (T, S, S))
  mask = np.ones((2, 1, T, S), bool)
  mask[1, ..., 2:] = False
  out, w = scores.score_attention("uniform", q, k, v, mask)
  np.testing.assert_allclose(out[0, :, 0], np.broadcast_to(
      v[0, :, 0].mean(0), (T, H)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[1, :, 0], np.broadcast_to(
      v[1, :2, 0].mean(0), (T, H)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w[1, 0], np.tile([0.5, 0.5, 0, 0], (T, 1)))


def test_unknown_score_lists_known():
  with pytest.raises(ValueError, match="unknown score.*'additive'.*'dot'"):
    scores.get_score("bilinear")


def test_score_attention_scaled_dot_equals_reference(np_rng):
  q = np_rng.standard_normal((2, T, 2, H)).astype(np.float32)
  k = np_rng.standard_normal((2, S, 2, H)).astype(np.float32)
  v = np_rng.standard_normal((2, S, 2, 3)).astype(np.float32)
  mask = np_rng.random((2, 1, T, S)) < 0.6
  mask[1, 0, 2] = False
  out, w = scores.score_attention("scaled_dot", q, k, v, mask=mask)
  want_out, want_w = reference_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(out)[1, 2])


def test_score_attention_additive_with_mask_under_jit(np_rng):
  q = np_rng.standard_normal((2, T, 2, H))
  k = np_rng.standard_normal((2, S, 2, HK))
  v = np_rng.standard_normal((2, S, 2, 3))
  params = _params("additive", np_rng, hk=HK)
  mask = np.tril(np.ones((T, S), bool))
  fn = jax.jit(lambda q, k, v, m, p: scores.score_attention(
      "additive", q, k, v, mask=m, **p))
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  out, w = fn(f32(q), f32(k), f32(v), mask, jax.tree.map(f32, params))
  logits = np.stack([np.stack([
      _np_scores("additive", q[b, :, n], k[b, :, n], **params)
      for n in range(2)]) for b in range(2)])
  want_out, want_w = reference_from_logits(logits, v, mask)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"mask": np.ones((T, S))}, "mask must be boolean"),
    ({"mask": np.ones((T, S + 1), bool)}, "not broadcastable"),
    ({"key": np.ones((2, S, 3, H))}, "incompatible shapes"),
    ({"query": np.ones((T, 2, H))}, r"expects \[B, T, N, H\]"),
])
def test_score_attention_rejects_bad_inputs(kwargs, match):
  args = {"query": np.ones((2, T, 2, H)), "key": np.ones((2, S, 2, H)),
          "value": np.ones((2, S, 2, 3))}
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    scores.score_attention("dot", **args)
