"""Tests for attn.modules: each module against an independent reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attn
from attn import registry
from attn.modules import (AdditiveAttention, AttentionPooling,
                          GlimpseAttention, LuongAttention,
                          MultiHeadAttention, PositionalEmbedding)
from tests.reference import reference_attention

KEY = jax.random.key(0)
# One set of shapes throughout: eager JAX compiles each op once per shape.
B, T, D = 2, 6, 16


def normal(seed, shape):
  """NumPy-made inputs: jax.random would compile a sampler per shape."""
  return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


def np_softmax(logits, mask=None):
  """float64 softmax; rows with nothing to attend give zeros."""
  logits = np.asarray(logits, np.float64)
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  top = np.max(logits, axis=-1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  e = np.exp(logits - top)
  s = e.sum(-1, keepdims=True)
  return e / np.where(s == 0, 1.0, s)


def np_project(p, x, kv=None):
  """float64 projections q ``[B,T,N,H]``, k, v ``[B,S,K,H]``."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  kv = x if kv is None else np.asarray(kv, np.float64)
  proj = lambda name, inp: (np.einsum("btd,dnh->btnh", inp, p[name]["kernel"])  # pylint: disable=g-long-lambda
                            + p[name]["bias"])
  return proj("query", x), proj("key", kv), proj("value", kv)


def np_mha(p, x, kv=None, mask=None, causal=False):
  """float64 reference output of MultiHeadAttention (GQA included)."""
  q, k, v = np_project(p, x, kv)
  shape_TS = (q.shape[1], k.shape[1])
  full = np.ones(shape_TS, bool) if mask is None else np.asarray(mask)
  if causal:
    full = full & np.tril(np.ones(shape_TS, bool))
  o, _ = reference_attention(q, k, v, mask=full)
  out = np.asarray(p["out"]["kernel"], np.float64)
  return np.einsum("btnh,nhd->btd", o, out) + np.asarray(p["out"]["bias"])


# --------------------------------------------------------------------------
# MultiHeadAttention


@pytest.mark.parametrize("cross", [False, True])
def test_mha_matches_flax_linen_attention(cross):
  x, kv = normal(1, (B, T, D)), normal(2, (B, 4, 12))
  mask = np.random.RandomState(3).rand(B, 1, T, 4 if cross else T) < 0.7
  args = (x, kv) if cross else (x,)
  ours = MultiHeadAttention(num_heads=4)
  variables = ours.init(KEY, *args)
  ref = nn.MultiHeadDotProductAttention(num_heads=4).apply(
      variables, *args, mask=mask)
  out = ours.apply(variables, *args, mask=mask)
  # flax averages fully masked rows; we return zeros there: compare the rest.
  live = mask.any(-1)[:, 0, :, None]
  np.testing.assert_allclose(np.where(live, out, 0), np.where(live, ref, 0),
                             atol=1e-5)
  np.testing.assert_allclose(out, np_mha(variables["params"], x,
                                         kv if cross else None, mask),
                             atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gqa_and_mqa_match_reference_and_parameter_count(num_kv_heads):
  N, H = 4, 8
  mha = MultiHeadAttention(num_heads=N, num_kv_heads=num_kv_heads,
                           qkv_features=N * H, out_features=12, causal=True)
  x = normal(4, (B, T, D))
  variables = mha.init(KEY, x)
  shapes = jax.tree.map(jnp.shape, variables["params"])
  assert shapes["key"]["kernel"] == (D, num_kv_heads, H)
  count = sum(a.size for a in jax.tree.leaves(variables))
  assert count == (D * N * H + N * H) + 2 * (D * num_kv_heads * H
                                             + num_kv_heads * H) + (
                                                 N * H * 12 + 12)
  out = mha.apply(variables, x)
  assert out.shape == (B, T, 12)
  np.testing.assert_allclose(out, np_mha(variables["params"], x, causal=True),
                             atol=1e-5)


def test_bad_head_configuration_raises():
  x = normal(0, (B, T, 10))
  with pytest.raises(ValueError, match="divisible by num_heads"):
    MultiHeadAttention(num_heads=3).init(KEY, x)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    MultiHeadAttention(num_heads=2, num_kv_heads=3, qkv_features=6).init(
        KEY, x)


def test_unknown_attention_name_lists_registered():
  with pytest.raises(ValueError, match="softmax"):
    MultiHeadAttention(num_heads=4, attention="no_such_attention").init(
        KEY, normal(0, (B, T, D)))


@pytest.mark.parametrize("positional", ["rope", "alibi", "t5"])
def test_kv_cache_decoding_equals_full_forward(positional):
  x = normal(5, (B, T, D))
  mha = MultiHeadAttention(num_heads=4, num_kv_heads=2, causal=True,
                           positional=positional, decode=True)
  variables = mha.init(KEY, x)
  full = mha.clone(decode=False).apply({"params": variables["params"]}, x)
  step = jax.jit(lambda c, xs: mha.apply(  # pylint: disable=g-long-lambda
      {"params": variables["params"], "cache": c}, xs, mutable=["cache"]))
  cache, outs = variables["cache"], []
  # A 2-token prefill, then one token at a time.
  for start, stop in [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]:
    out, updated = step(cache, x[:, start:stop])
    cache = updated["cache"]
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
  assert int(cache["cache_index"]) == 6


def test_decode_needs_causal_self_attention():
  x = normal(0, (B, T, D))
  with pytest.raises(ValueError, match="causal self-attention"):
    MultiHeadAttention(num_heads=4, decode=True).init(KEY, x)


def _entries(predicate):
  return [n for n in attn.list_attention()
          if predicate(registry.get_entry(n)) and n != "cudnn"]


@pytest.mark.parametrize("name", _entries(lambda e: not e.exact)[:1]
                         or [pytest.param("none", marks=pytest.mark.skip(
                             "no approximate variant registered"))])
def test_decode_with_approximate_variant_raises(name):
  with pytest.raises(ValueError, match="KV cache"):
    MultiHeadAttention(num_heads=4, attention=name, causal=True,
                       decode=True).init(KEY, normal(0, (B, T, D)))


@pytest.mark.parametrize("name", _entries(lambda e: not e.causal) or [
    pytest.param("none", marks=pytest.mark.skip("all variants are causal"))])
def test_causal_with_non_causal_variant_raises(name):
  with pytest.raises(ValueError, match="causal masking"):
    MultiHeadAttention(num_heads=4, attention=name, causal=True).init(
        KEY, normal(0, (B, T, D)))


def test_weights_sown_only_when_intermediates_mutable():
  x = normal(6, (B, T, D))
  mha = MultiHeadAttention(num_heads=4, causal=True)
  variables = mha.init(KEY, x)
  assert "intermediates" not in variables
  out, state = mha.apply(variables, x, mutable=["intermediates"])
  (weights,) = state["intermediates"]["attention_weights"]
  assert weights.shape == (B, 4, T, T)
  q, k, v = np_project(variables["params"], x)
  _, ref = reference_attention(q, k, v, mask=np.tril(np.ones((T, T), bool)))
  np.testing.assert_allclose(weights, ref, atol=1e-5)
  np.testing.assert_allclose(out, mha.apply(variables, x), atol=1e-6)


def test_attention_dropout_uses_dropout_rng():
  x = normal(7, (B, T, D))
  mha = MultiHeadAttention(num_heads=4, dropout_rate=0.5)
  variables = mha.init(KEY, x)
  det = mha.apply(variables, x)
  a = mha.apply(variables, x, deterministic=False,
                rngs={"dropout": jax.random.key(1)})
  b = mha.apply(variables, x, deterministic=False,
                rngs={"dropout": jax.random.key(1)})
  c = mha.apply(variables, x, deterministic=False,
                rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, det) and not np.allclose(a, c)


def test_rng_kernel_gets_attention_stream_only_when_not_deterministic():
  seen = []

  def noisy(query, key, value, bias=None, mask=None, *, rng=None):
    seen.append(rng)
    out = attn.dot_product_attention(query, key, value, bias, mask)
    if rng is None:
      return out
    return out + jax.random.normal(rng, out.shape)

  x = normal(8, (B, T, D))
  mha = MultiHeadAttention(num_heads=4, attention=noisy)
  variables = mha.init(KEY, x)
  det = mha.apply(variables, x, deterministic=False)  # no "attention" rng
  a = mha.apply(variables, x, deterministic=False,
                rngs={"attention": jax.random.key(3)})
  b = mha.apply(variables, x, rngs={"attention": jax.random.key(3)})
  assert seen[-3] is None and seen[-2] is not None and seen[-1] is None
  np.testing.assert_allclose(det, b, atol=1e-6)
  assert not np.allclose(a, det)


# --------------------------------------------------------------------------
# Classic single-head attention


def test_additive_attention_matches_brute_force():
  q, k, vals = normal(11, (B, 4, D)), normal(12, (B, T, 12)), normal(13,
                                                                   (B, T, D))
  mask = np.array([[True] * T, [True] * 3 + [False] * (T - 3)])[:, None, :]
  module = AdditiveAttention(attention_dim=8)
  variables = module.init(KEY, q, k, vals, mask)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  context, weights = module.apply(variables, q, k, vals, mask)
  for b in range(2):
    for t in range(4):
      logits = [p["v"] @ np.tanh(np.asarray(q[b, t]) @ p["w_q"]
                                 + np.asarray(k[b, s]) @ p["w_k"])
                for s in range(T)]
      w = np_softmax(np.array(logits), mask[b, 0])
      np.testing.assert_allclose(weights[b, t], w, atol=1e-5)
      np.testing.assert_allclose(context[b, t], w @ np.asarray(vals[b]),
                                 atol=1e-5)


@pytest.mark.parametrize("score", ["dot", "general", "concat", "location"])
def test_luong_global_scores_match_reference(score):
  q, k = normal(14, (B, 4, D)), normal(15, (B, T, D))
  module = LuongAttention(score=score, max_length=8, attention_dim=4)
  variables = module.init(KEY, q, k)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64),
                   variables.get("params", {}))
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  logits = {
      "dot": lambda: np.einsum("btd,bsd->bts", qn, kn),
      "general": lambda: np.einsum("btd,de,bse->bts", qn, p.get("w"), kn),
      "concat": lambda: np.tanh((qn @ p["w_q"])[:, :, None]
                                + (kn @ p["w_k"])[:, None]) @ p["v"],
      "location": lambda: (qn @ p["w"])[..., :T],
  }[score]()
  context, weights = module.apply(variables, q, k)
  np.testing.assert_allclose(weights, np_softmax(logits), atol=1e-5)
  np.testing.assert_allclose(context, np_softmax(logits) @ kn, atol=1e-5)


def test_luong_local_p_matches_reference():
  q, k = normal(16, (B, 4, D)), normal(17, (B, 9, D))
  mask = np.array([[True] * 9, [True] * 6 + [False] * 3])[:, None, :]
  module = LuongAttention(score="general", mode="local_p", window=2)
  variables = module.init(KEY, q, k, mask=mask)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  context, weights = module.apply(variables, q, k, mask=mask)
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  for b, length in enumerate([9, 6]):
    for t in range(4):
      gate = 1 / (1 + np.exp(-np.tanh(qn[b, t] @ p["w_p"]) @ p["v_p"]))
      centre = length * gate
      s = np.arange(9)
      inside = (np.abs(s - centre) <= 2) & (s < length)
      align = np_softmax(qn[b, t] @ p["w"] @ kn[b].T, inside)
      w = align * np.exp(-(s - centre) ** 2 / 2.0)
      np.testing.assert_allclose(weights[b, t], w, atol=1e-5)
      np.testing.assert_allclose(context[b, t], w @ kn[b], atol=1e-5)
  assert np.all(np.asarray(weights)[1, :, 6:] == 0)


def test_luong_rejects_unknown_score_and_dot_width_mismatch():
  q, k = normal(0, (B, 4, D)), normal(1, (B, T, 12))
  with pytest.raises(ValueError, match="choose from"):
    LuongAttention(score="bilinear").init(KEY, q, k)
  with pytest.raises(ValueError, match="widths to match"):
    LuongAttention(score="dot").init(KEY, q, k)


@pytest.mark.parametrize("score", ["scaled_dot", "additive", "cosine"])
def test_glimpse_attention_is_learned_query_weighted_sum(score):
  inputs = normal(18, (3, T, D))
  ctx = jnp.array([0, 2, 2])
  mask = np.ones((3, T), bool)
  mask[1, 4:] = False
  module = GlimpseAttention(num_contexts=3, features=5, score=score)
  variables = module.init(KEY, inputs, ctx, mask)
  out, weights = module.apply(variables, inputs, ctx, mask)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  x = np.asarray(inputs, np.float64)
  for b in range(3):
    q = p["query"]["embedding"][int(ctx[b])]
    if score == "scaled_dot":
      logits = x[b] @ q / np.sqrt(D)
    elif score == "additive":
      logits = np.tanh(q @ p["w_q"] + x[b] @ p["w_k"]) @ p["v"]
    else:
      logits = np.exp(p["log_beta"]) * (x[b] @ q) / (np.linalg.norm(x[b], axis=-1)
                                          * np.linalg.norm(q))
    w = np_softmax(logits, mask[b])
    np.testing.assert_allclose(weights[b], w, atol=1e-5)
    np.testing.assert_allclose(
        out[b], (w @ x[b]) @ p["out"]["kernel"] + p["out"]["bias"],
        atol=1e-5)
  assert out.shape == (3, 5)


# --------------------------------------------------------------------------
# Nadaraya-Watson attention pooling


def np_nadaraya_watson(xq, xk, y, kernel, h):
  out = np.zeros(len(xq))
  for t, x in enumerate(xq):
    u = (x - xk) / h
    k = {"gaussian": np.exp(-u ** 2 / 2), "boxcar": (np.abs(u) <= 1) * 1.0,
         "epanechnikov": np.maximum(1 - u ** 2, 0), "constant": np.ones_like(u)
         }[kernel]
    out[t] = (k @ y) / k.sum() if k.sum() > 0 else 0.0
  return out


@settings(max_examples=8, deadline=None)
@given(kernel=st.sampled_from(["gaussian", "boxcar", "epanechnikov",
                               "constant"]),
       h=st.floats(0.2, 3.0), seed=st.integers(0, 100))
def test_nadaraya_watson_matches_brute_force(kernel, h, seed):
  rs = np.random.RandomState(seed)
  xk, xq = rs.uniform(0, 5, (1, 12)), rs.uniform(0, 5, (1, 4))
  y = (np.sin(xk) + 0.1 * rs.randn(1, 12)).astype(np.float32)
  module = AttentionPooling(kernel=kernel, bandwidth=h)
  out, weights = module.apply({}, xq, xk, y)
  np.testing.assert_allclose(out[0], np_nadaraya_watson(xq[0], xk[0], y[0],
                                                        kernel, h), atol=1e-5)
  assert np.all(np.isfinite(weights))


def test_nadaraya_watson_no_neighbour_gives_zero_and_finite_grad():
  xk, y = jnp.array([[0.0, 1.0]]), jnp.array([[3.0, 4.0]])
  module = AttentionPooling(kernel="boxcar", bandwidth=0.5)
  out, _ = module.apply({}, jnp.array([[10.0]]), xk, y)
  assert float(out[0, 0]) == 0.0
  grad = jax.grad(lambda q: module.apply({}, q, xk, y)[0].sum())(
      jnp.array([[10.0]]))
  assert np.all(np.isfinite(grad))


def test_parametric_nadaraya_watson_learns_bandwidth():
  xk = jnp.linspace(0, 5, 20)[None]
  y = jnp.sin(xk)
  module = AttentionPooling(kernel="gaussian", bandwidth=2.0,
                            learn_bandwidth=True)
  variables = module.init(KEY, xk, xk, y)
  np.testing.assert_allclose(variables["params"]["log_bandwidth"], np.log(2))

  def loss(v):  # leave-in fit: a narrower kernel interpolates better
    return jnp.mean((module.apply(v, xk, xk, y)[0] - y) ** 2)

  grad = jax.grad(loss)(variables)["params"]["log_bandwidth"]
  assert float(grad) > 0  # descending shrinks the width


# --------------------------------------------------------------------------
# Positional embeddings


@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_absolute_positional_embedding_decode_offsets(positional):
  x = normal(19, (B, T, D))
  module = PositionalEmbedding(positional, max_len=8, decode=True)
  variables = module.init(KEY, x)
  full = module.clone(decode=False).apply(
      {k: v for k, v in variables.items() if k != "cache"}, x)
  assert not np.allclose(full, x)
  cache, outs = variables["cache"], []
  for t in range(T):
    out, upd = module.apply({**variables, "cache": cache}, x[:, t:t + 1],
                            mutable=["cache"])
    cache = upd["cache"]
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-6)
  if positional == "sinusoidal":
    np.testing.assert_allclose(full - x, np.broadcast_to(
        attn.positional.sinusoidal_encoding(T, D), x.shape), atol=1e-6)


def test_positional_embedding_none_is_identity_and_length_checked():
  x = normal(20, (B, T, D))
  module = PositionalEmbedding("none", max_len=2)
  np.testing.assert_array_equal(module.apply({}, x), x)
  with pytest.raises(ValueError, match="max_len"):
    PositionalEmbedding("learned", max_len=2).init(KEY, x)
