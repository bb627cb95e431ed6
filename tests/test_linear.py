"""Tests of linear (kernelized) attention ``linear``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import registry
from attn.kernels import blocks
from attn.kernels import performer as performer_lib
from tests.variant_helpers import T, make_inputs, run


def _linear_reference(q, k, v, causal, kv_len=None):
  """float64 quadratic form: (φ(q)φ(k)ᵀ ⊙ mask) v / rowsum, φ = elu + 1."""
  phi = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0)))
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t_, n_, _ = q.shape
  k_ = k.shape[2]
  out = np.zeros((b_, t_, n_, v.shape[-1]))
  for b in range(b_):
    for n in range(n_):
      w = phi(q[b, :, n]) @ phi(k[b, :, n // (n_ // k_)]).T
      if causal:
        w = np.tril(w)
      if kv_len is not None:
        w[:, kv_len[b]:] = 0
      out[b, :, n] = (w @ v[b, :, n // (n_ // k_)]) / w.sum(-1, keepdims=True)
  return out


@pytest.mark.parametrize("causal, chunk", [(False, 3), (True, 3),
                                           (True, 64)])
def test_linear_equals_quadratic_form(causal, chunk):
  q, k, v = make_inputs(seed=11)
  out = run(f"linear(chunk_size={chunk})", q, k, v, is_causal=causal,
             key_value_seq_lengths=jnp.array([T, 12]))
  np.testing.assert_allclose(
      out, _linear_reference(q, k, v, causal, kv_len=[T, 12]), rtol=2e-5,
      atol=2e-5)


def test_linear_causal_with_fewer_keys_than_queries():
  q, k, v = make_inputs(t=T, s=11, seed=23)
  out = run("linear(chunk_size=4)", q, k, v, is_causal=True)
  np.testing.assert_allclose(out, _linear_reference(q, k, v, True),
                             rtol=2e-5, atol=2e-5)


def _one_head_path(feats, valid, *, is_causal):
  """The one-head chunk scan vmapped over heads (the layout the native
  paths replaced): ``f(q, k, v) -> [B, T, N, Dv]``, chunks of 8."""
  from attn.kernels import linear as linear_lib  # pylint: disable=g-import-not-at-top
  one = functools.partial(linear_lib.feature_attention_one_head,
                          features=feats, is_causal=is_causal, chunk_size=8)
  return lambda q, k, v: blocks.map_heads(one, q, k, v, valid)


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_noncausal_feature_attention_layouts_agree(feature_map):
  """The native-layout non-causal path (what linear/performer run) equals
  the one-head kernel vmapped over heads: forward and gradients, with GQA,
  key padding and lengths that the chunk size does not divide."""
  from attn.kernels import linear as linear_lib  # pylint: disable=g-import-not-at-top
  ks = jax.random.split(jax.random.key(7), 4)
  B, T, S, N, K, H, D = 2, 37, 29, 4, 2, 8, 5
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, S, K, H))
  v = jax.random.normal(ks[2], (B, S, K, D))
  valid = jnp.arange(S)[None] < jnp.array([29, 11])[:, None]
  feats = (linear_lib.ELU_FEATURES if feature_map == "elu" else
           performer_lib.favor_feature_map(
               jax.random.normal(ks[3], (16, H)), 1 / np.sqrt(H)))

  def native(q, k, v):
    return linear_lib.feature_attention_noncausal(q, k, v, valid, feats,
                                                  chunk_size=8)

  per_head = _one_head_path(feats, valid, is_causal=False)

  np.testing.assert_allclose(native(q, k, v), per_head(q, k, v), atol=1e-5)
  g_native = jax.grad(lambda *a: native(*a).sum(), argnums=(0, 1, 2))(q, k, v)
  g_head = jax.grad(lambda *a: per_head(*a).sum(), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_native, g_head):
    np.testing.assert_allclose(a, b, atol=1e-4)


# ------------------------------------------ causal: the native-layout path


def elu_phi(xp):
  """``φ(x) = elu(x) + 1`` written with the array module ``xp``."""
  return lambda x: xp.where(x > 0, x + 1.0, xp.exp(xp.minimum(x, 0.0)))


def favor_phi(xp, w_MH, scale):
  """FAVOR+ ``φ(x) = exp(W x̂ - |x̂|²/2)``, ``x̂ = x·√scale``, no stabiliser
  (it cancels in the ratio; float64 has the range)."""
  def phi(x):
    x = x * np.sqrt(scale)
    return xp.exp(x @ xp.asarray(w_MH).T
                  - 0.5 * xp.sum(x * x, axis=-1, keepdims=True))
  return phi


def causal_feature_reference(q, k, v, phi, kv_valid=None, q_valid=None,
                             xp=np):
  """Brute-force causal kernelised attention, one ``[T, S]`` matrix a head:

  ``out_t = Σ_{s<=t, valid s} φ(q_t)·φ(k_s) v_s / Σ_{s<=t, valid s}
  φ(q_t)·φ(k_s)`` at absolute positions (keys ``s >= T`` never count),
  zeros where that normaliser is 0 or the query is not valid. Query head
  ``n`` uses key head ``n // (N // K)``. ``xp`` is ``np`` (float64 inputs)
  or ``jax.numpy`` under ``jax.enable_x64`` (for gradients); nothing here
  uses :mod:`attn`.
  """
  B, T, N, _ = q.shape
  S, K = k.shape[1], k.shape[2]
  allowed_TS = np.arange(S)[None, :] <= np.arange(T)[:, None]
  kv_valid = np.ones((B, S), bool) if kv_valid is None else np.asarray(
      kv_valid)
  rows = []
  for b in range(B):
    heads = []
    for n in range(N):
      kh = n // (N // K)
      w = (phi(q[b, :, n]) @ phi(k[b, :, kh]).T) * (
          allowed_TS & kv_valid[b][None, :])
      den = xp.sum(w, axis=-1)
      ok = den > 0
      out = xp.where(ok[:, None],
                     (w @ v[b, :, kh]) / xp.where(ok, den, 1.0)[:, None], 0.0)
      if q_valid is not None:
        out = out * np.asarray(q_valid[b], np.float64)[:, None]
      heads.append(out)
    rows.append(xp.stack(heads, axis=1))
  return xp.stack(rows)


def reference_and_grads(q, k, v, cot, phi_of_xp, **kwargs):
  """Float64 reference output and ``jax.grad`` of ``sum(out · cot)`` w.r.t.
  ``q, k, v`` (the reference written in ``jax.numpy`` under x64)."""
  f64 = lambda x: np.asarray(x, np.float64)
  out = causal_feature_reference(f64(q), f64(k), f64(v), phi_of_xp(np),
                                 **kwargs)
  with jax.enable_x64():
    loss = lambda *a: jnp.sum(causal_feature_reference(
        *a, phi_of_xp(jnp), xp=jnp, **kwargs) * jnp.asarray(f64(cot)))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        *(jnp.asarray(f64(x)) for x in (q, k, v)))
    grads = [np.asarray(g) for g in grads]
  return out, grads


def out_and_grads(fn, cot, q, k, v):
  """``fn(q, k, v)`` and the grads of ``sum(out · cot)``, one compilation."""
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out * cot), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2),
                                               has_aux=True))(q, k, v)
  return out, grads


def _causal_case(feature_map, seed=3):
  """GQA inputs with T=19 (not a multiple of the chunk sizes used), key
  padding with holes (example 1 has its first 3 keys invalid, so its
  first 3 queries have nothing to attend), a cotangent and the features."""
  from attn.kernels import linear as linear_lib  # pylint: disable=g-import-not-at-top
  B, T, N, K, H, D, M = 2, 19, 4, 2, 8, 5, 12
  rng = np.random.default_rng(seed)
  q, k, v, cot = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (
      (B, T, N, H), (B, T, K, H), (B, T, K, D), (B, T, N, D)))
  valid = np.ones((B, T), bool)
  valid[0, [5, 6, 12]] = False
  valid[1, :3] = False
  valid[1, 15:] = False
  if feature_map == "elu":
    return (q, k, v, cot, jnp.asarray(valid), linear_lib.ELU_FEATURES,
            elu_phi)
  w = rng.normal(size=(M, H))
  scale = 1 / np.sqrt(H)
  return (q, k, v, cot, jnp.asarray(valid), performer_lib.favor_feature_map(
      jnp.asarray(w, jnp.float32), scale),
          lambda xp: favor_phi(xp, np.asarray(w, np.float32), scale))


@pytest.mark.parametrize("chunk, padded", [(4, True), (64, True),
                                           (4, False), (64, False)])
@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_causal_native_equals_float64_reference(feature_map, chunk, padded):
  """feature_attention_causal == the brute-force prefix-sum form in float64
  (GQA, T=19 with chunks of 4 / one chunk, key padding with holes, queries
  with nothing to attend -> exact zeros; or kv_valid=None), forward and
  jax.grad."""
  from attn.kernels import linear as linear_lib  # pylint: disable=g-import-not-at-top
  q, k, v, cot, valid, feats, phi_of_xp = _causal_case(feature_map)
  valid = valid if padded else None
  out, grads = out_and_grads(
      lambda q, k, v: linear_lib.feature_attention_causal(
          q, k, v, valid, feats, chunk_size=chunk), cot, q, k, v)
  want, want_grads = reference_and_grads(q, k, v, cot, phi_of_xp,
                                         kv_valid=valid)
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
  for g, w in zip(grads, want_grads):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5)
  if padded:
    np.testing.assert_array_equal(out[1, :3], 0.0)
    np.testing.assert_array_equal(grads[0][1, :3], 0.0)


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_causal_feature_attention_layouts_agree(feature_map):
  """The native-layout causal path (what linear/performer run) equals the
  old one-head chunk scan (is_causal=True) vmapped over heads to float32
  round-off: forward and gradients, GQA, key padding, T % chunk != 0."""
  from attn.kernels import linear as linear_lib  # pylint: disable=g-import-not-at-top
  q, k, v, cot, valid, feats, _ = _causal_case(feature_map, seed=8)

  def native(q, k, v):
    return linear_lib.feature_attention_causal(q, k, v, valid, feats,
                                               chunk_size=8)

  per_head = _one_head_path(feats, valid, is_causal=True)

  out, grads = out_and_grads(native, cot, q, k, v)
  want, want_grads = out_and_grads(per_head, cot, q, k, v)
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  for a, b in zip(grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("s", [11, 16, 23])
def test_linear_causal_alignment_and_padding(s):
  """The registered kernel, causal, S != T (keys at absolute positions:
  fewer keys, or extra keys past T that never count), key lengths and a
  query padding mask (zero rows), GQA, T=16 with chunk 5: equals the float64
  reference, forward and jax.grad."""
  from tests.variant_helpers import call_and_grads  # pylint: disable=g-import-not-at-top
  q, k, v = make_inputs(t=T, s=s, seed=31)
  kv_len = np.array([s, s // 2 - 1])
  # example 0 pads its queries, example 1 its keys
  q_valid = np.arange(T)[None, :] < np.array([9, T])[:, None]
  out, grads = call_and_grads(
      "linear(chunk_size=5)", q, k, v, is_causal=True,
      key_value_seq_lengths=jnp.asarray(kv_len),
      mask=jnp.asarray(q_valid)[:, None, :, None])
  kv_valid = np.arange(s)[None, :] < kv_len[:, None]
  want, want_grads = reference_and_grads(
      q, k, v, 2 * out, elu_phi, kv_valid=kv_valid, q_valid=q_valid)
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(out[0, 9:], 0.0)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["linear", "performer"])
@pytest.mark.parametrize("causal", [False, True])
def test_no_queries_give_an_empty_output(name, causal):
  q = jnp.zeros((2, 0, 4, 8))
  k = jnp.ones((2, 0 if causal else 5, 2, 8))
  out = registry.get_attention(name)(q, k, k, is_causal=causal)
  assert out.shape == (2, 0, 4, 8)
