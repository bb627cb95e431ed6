"""Dropout inside the chunked kernel (FlashAttention-2 style).

The keep-mask of each score block is drawn from the key and the block
indices, so the backward must recompute exactly the forward's mask: checked
against a dense float32 reference that applies the same mask, materialised
with :func:`attn.kernels.chunked.dropout_keep_dense`, forward and gradients.
Statistics are compared with the ``xla`` path's dropout.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.kernels import canonical, chunked
from attn.kernels.exact import dot_product_attention
from tests.reference import random_gqa_inputs

B, T, S, N, K, H = 2, 13, 21, 4, 2, 8
G = N // K
BLOCKS = dict(block_q=8, block_k=8)
RATE = 0.3


def _inputs(seed=0):
  return random_gqa_inputs(seed, B, T, S, N, K, H)


def _chunked(q, k, v, bias, rng, rate=RATE, broadcast=False, causal=True):
  inputs = canonical.canonicalize(q, k, v, bias, is_causal=causal)
  return chunked.chunked_attention(inputs, dropout_rate=rate, dropout_rng=rng,
                                   broadcast_dropout=broadcast, **BLOCKS)


def _dense(q, k, v, bias, keep, rate=RATE, causal=True):
  """softmax(s) ⊙ keep / (1 - rate) @ v, all materialised (float32)."""
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H) + bias
  if causal:
    s = jnp.where(jnp.tril(jnp.ones((T, S), bool)), s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1) * keep / (1.0 - rate)
  return jnp.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("broadcast", [False, True])
def test_backward_uses_the_forwards_block_masks(broadcast):
  q, k, v, bias, g = _inputs()
  rng = jax.random.PRNGKey(42)
  keep = chunked.dropout_keep_dense(rng, RATE, shape=(B, T, S, N, K),
                                    broadcast=broadcast, **BLOCKS)
  assert keep.shape == (B, N, T, S)
  assert 0.6 < float(keep.mean()) < 0.8
  if broadcast:
    assert bool(jnp.all(keep == keep[:1, :1]))
  else:
    assert not bool(jnp.all(keep[:, 0] == keep[:, 1]))
  fn = functools.partial(_chunked, rng=rng, broadcast=broadcast)
  ref = functools.partial(_dense, keep=keep)
  def out_and_grads(f):
    return jax.jit(lambda *a: (f(*a), jax.grad(
        lambda *b: jnp.sum(f(*b) * g), argnums=(0, 1, 2, 3))(*a)))

  out, grads = out_and_grads(fn)(q, k, v, bias)
  ref_out, ref_grads = out_and_grads(ref)(q, k, v, bias)
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  # A different mask gives visibly different gradients: the check has teeth.
  other = chunked.dropout_keep_dense(jax.random.PRNGKey(43), RATE,
                                     shape=(B, T, S, N, K), **BLOCKS)
  other_grads = out_and_grads(functools.partial(_dense, keep=other))(
      q, k, v, bias)[1]
  assert not np.allclose(grads[2], other_grads[2], atol=1e-2)


def test_same_key_same_result_other_key_other_result():
  q, k, v, bias, _ = _inputs(1)
  fn = jax.jit(_chunked)
  a = fn(q, k, v, bias, jax.random.PRNGKey(0))
  b = fn(q, k, v, bias, jax.random.PRNGKey(0))
  c = fn(q, k, v, bias, jax.random.PRNGKey(1))
  assert bool(jnp.all(a == b))
  assert not np.allclose(a, c, atol=1e-3)
  no_dropout = _chunked(q, k, v, bias, None, rate=0.0)
  assert not np.allclose(a, no_dropout, atol=1e-3)


def test_statistics_match_the_xla_dropout():
  """Mean and variance of outputs, and mean gradients, over many keys."""
  q, k, v, bias, g = _inputs(2)
  keys = jax.random.split(jax.random.PRNGKey(3), 200)

  def chunked_out(key):
    return _chunked(q, k, v, bias, key)

  def xla_out(key):
    return dot_product_attention(
        q, k, v, bias, is_causal=True, implementation="xla",
        dropout_rate=RATE, dropout_rng=key)

  def grad_q(fn, key):
    return jax.grad(lambda q_: jnp.sum(fn(q_, key) * g))(q)

  n = len(keys)
  plain = _chunked(q, k, v, bias, None, rate=0.0)
  samples = {"chunked": jax.jit(jax.vmap(chunked_out))(keys),
             "xla": jax.jit(jax.vmap(xla_out))(keys)}
  for x in samples.values():
    err = np.asarray(jnp.abs(x.mean(0) - plain))
    assert np.all(err <= 5 * np.asarray(x.std(0)) / np.sqrt(n) + 1e-4)
  var_c, var_x = samples["chunked"].var(0), samples["xla"].var(0)
  # Per-element variances agree on average (each is noisy, ~10% at n=200).
  ratio = float(var_c.sum() / var_x.sum())
  assert 0.9 < ratio < 1.1, ratio

  plain_grad = jax.grad(lambda q_: jnp.sum(
      _chunked(q_, k, v, bias, None, rate=0.0) * g))(q)
  grads = {
      "chunked": jax.jit(jax.vmap(functools.partial(
          grad_q, lambda q_, key: _chunked(q_, k, v, bias, key))))(keys),
      "xla": jax.jit(jax.vmap(functools.partial(grad_q, lambda q_, key: (
          dot_product_attention(q_, k, v, bias, is_causal=True,
                                implementation="xla", dropout_rate=RATE,
                                dropout_rng=key)))))(keys)}
  for x in grads.values():
    err = np.asarray(jnp.abs(x.mean(0) - plain_grad))
    assert np.all(err <= 5 * np.asarray(x.std(0)) / np.sqrt(n) + 1e-4)


def test_dropout_memory_stays_linear():
  """No [T, S] keep-mask or score matrix is materialised (with gradient)."""
  L = 2048
  q = jnp.zeros((1, L, 1, 8))

  def loss(q, rng):
    inputs = canonical.canonicalize(q, q, q)
    return jnp.sum(chunked.chunked_attention(
        inputs, dropout_rate=0.1, dropout_rng=rng, block_q=128,
        block_k=128))

  mem = jax.jit(jax.grad(loss)).lower(
      q, jax.random.PRNGKey(0)).compile().memory_analysis()
  assert mem.temp_size_in_bytes < L * L // 4, mem  # a bool [T, S] is L·L


def test_registry_kernel_takes_dropout_and_checks_its_arguments():
  q, k, v, bias, _ = _inputs()
  fn = attn.get_attention("chunked(block_q=8, block_k=8)")
  rng = jax.random.PRNGKey(5)
  out = fn(q, k, v, bias, is_causal=True, dropout_rate=RATE, dropout_rng=rng,
           broadcast_dropout=False)
  np.testing.assert_allclose(out, _chunked(q, k, v, bias, rng), atol=1e-6)
  with pytest.raises(ValueError, match="dropout_rng"):
    fn(q, k, v, dropout_rate=0.1)
  with pytest.raises(ValueError, match="dropout_rate"):
    fn(q, k, v, dropout_rate=1.0, dropout_rng=rng)
