"""Tests of linear (kernelized) attention ``linear``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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

  def per_head(q, k, v):
    one = functools.partial(linear_lib.feature_attention_one_head,
                            features=feats, is_causal=False, chunk_size=8)
    return blocks.map_heads(one, q, k, v, valid)

  np.testing.assert_allclose(native(q, k, v), per_head(q, k, v), atol=1e-5)
  g_native = jax.grad(lambda *a: native(*a).sum(), argnums=(0, 1, 2))(q, k, v)
  g_head = jax.grad(lambda *a: per_head(*a).sum(), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_native, g_head):
    np.testing.assert_allclose(a, b, atol=1e-4)
