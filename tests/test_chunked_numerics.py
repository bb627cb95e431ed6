"""Blockwise kernels (chunked, ring) at the edges: the log-sum-exp residual,
logit soft-capping, ``precision``, huge and infinite biases.

References: ``jax.nn.dot_product_attention`` and the float64 NumPy
reference in :mod:`tests.reference` (gradients by central differences in
float64).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.kernels import canonical, chunked
from attn.kernels.ring import ring_attention
from attn.parallel import make_mesh
from tests.jaxprs import equations
from tests.reference import random_gqa_inputs, reference_attention

B, T, S, N, K, H = 2, 19, 23, 4, 2, 8
G = N // K
BLOCKS = dict(block_q=8, block_k=8)


def _inputs(seed=0):
  return random_gqa_inputs(seed, B, T, S, N, K, H)


def _chunked(q, k, v, bias=None, mask=None, return_residual=False, **kw):
  inputs = canonical.canonicalize(q, k, v, bias, mask, **kw)
  return chunked.chunked_attention(inputs, return_residual=return_residual,
                                   **BLOCKS)


def _ring(q, k, v, bias=None, mask=None, return_residual=False, **kw):
  mesh = make_mesh(data=1, seq=1, devices=jax.devices()[:1])
  return ring_attention(q, k, v, bias, mask, mesh=mesh,
                        return_residual=return_residual, **BLOCKS, **kw)


KERNELS = {"chunked": _chunked, "ring": _ring}
# Jitted once per module: the forward and its VJP each compile to one
# program, shared by every bias value of the tests below (eagerly, each of
# the kernels' operations would compile on its own).
JITTED = {name: jax.jit(fn) for name, fn in KERNELS.items()}


def _jax_nn(q, k, v, bias=None, mask=None, **kw):
  return jax.nn.dot_product_attention(q, jnp.repeat(k, G, axis=2),
                                      jnp.repeat(v, G, axis=2), bias, mask,
                                      **kw)


def _close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a, np.float64),
                             np.asarray(b, np.float64), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------
# return_residual


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_return_residual_matches_jax_nn(name):
  """``(out, lse[B, T, N])`` and the VJP, as jax.nn (lse has no gradient)."""
  q, k, v, bias, g = _inputs()
  mask = jax.random.bernoulli(jax.random.PRNGKey(7), 0.8, (B, 1, T, S))
  g_lse = jax.random.normal(jax.random.PRNGKey(8), (B, T, N))
  fn = jax.jit(functools.partial(KERNELS[name], is_causal=True,
                                 return_residual=True))
  ref = jax.jit(functools.partial(_jax_nn, is_causal=True,
                                  return_residual=True))
  (out, lse), vjp = jax.vjp(fn, q, k, v, bias, mask)
  (ref_out, ref_lse), ref_vjp = jax.vjp(ref, q, k, v, bias, mask)
  assert lse.shape == (B, T, N) and lse.dtype == jnp.float32
  _close(out, ref_out, 2e-5)
  _close(lse, ref_lse, 2e-5)
  grads, ref_grads = vjp((g, g_lse)), ref_vjp((g, g_lse))
  _close(grads[0], ref_grads[0], 2e-5)
  _close(grads[1], ref_grads[1], 2e-5)
  _close(grads[2], ref_grads[2], 2e-5)
  _close(grads[3], ref_grads[3], 2e-5)


def test_residual_is_the_float64_logsumexp_and_minus_inf_when_empty():
  q, k, v, bias, _ = _inputs()
  lengths = jnp.array([5, 0])            # batch row 1 sees no key at all
  out, lse = _chunked(q, k, v, bias, key_value_seq_lengths=lengths,
                      return_residual=True)
  logits = np.einsum("btnh,bsnh->bnts", np.float64(q),
                     np.float64(jnp.repeat(k, G, 2))) / np.sqrt(H)
  logits = logits + np.float64(bias)
  want = np.log(np.exp(logits[0, :, :, :5]).sum(-1)).transpose(1, 0)
  _close(lse[0], want, 1e-5)
  assert np.all(np.asarray(lse[1]) == -np.inf)
  assert np.all(np.asarray(out[1]) == 0)


# ---------------------------------------------------------------------------
# logits_soft_cap


def _directional(f, x, u, eps=1e-5):
  return (f(x + eps * u) - f(x - eps * u)) / (2 * eps)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_soft_cap_forward_and_gradients_match_float64(name):
  """Against c·tanh(x/c) in float64; gradients by central differences."""
  cap = 2.0
  q, k, v, bias, g = _inputs(1)
  q = 3 * q                              # push logits into tanh's bend
  kernel = functools.partial(KERNELS[name], is_causal=True,
                             logits_soft_cap=cap)
  causal = np.tril(np.ones((T, S), bool))
  np_args = [np.float64(x) for x in (q, k, v, bias)]
  w = np.float64(g)

  def ref_loss(q_, k_, v_, b_):
    out, _ = reference_attention(q_, k_, v_, bias=b_, mask=causal,
                                 soft_cap=cap)
    return np.sum(out * w)

  out = jax.jit(kernel)(q, k, v, bias)
  _close(out, reference_attention(*np_args[:3], bias=np_args[3], mask=causal,
                                  soft_cap=cap)[0], 2e-5)
  uncapped = jax.jit(functools.partial(kernel, logits_soft_cap=None))
  assert not np.allclose(out, uncapped(q, k, v, bias), atol=1e-2)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(kernel(*a) * g),
                           argnums=(0, 1, 2, 3)))(q, k, v, bias)
  rng = np.random.default_rng(0)
  for i, grad in enumerate(grads):
    u = rng.normal(size=np_args[i].shape)

    def along(x, i=i):
      args = list(np_args)
      args[i] = x
      return ref_loss(*args)

    want = _directional(along, np_args[i], u)
    got = float(np.sum(np.float64(grad) * u))
    assert abs(got - want) <= 1e-4 * (1 + abs(want)), (i, got, want)


def test_soft_cap_is_validated():
  q, k, v, *_ = _inputs()
  with pytest.raises(ValueError, match="logits_soft_cap"):
    _chunked(q, k, v, logits_soft_cap=-1.0)


# ---------------------------------------------------------------------------
# precision


def _dot_precisions(fn, *args):
  """The precision config of every dot_general in ``fn``'s jaxpr."""
  return [eqn.params["precision"]
          for eqn in equations(jax.make_jaxpr(fn)(*args).jaxpr)
          if eqn.primitive.name == "dot_general"]


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_precision_reaches_every_einsum(name):
  q, k, v, bias, g = _inputs()
  highest = jax.lax.Precision.HIGHEST
  kernel = functools.partial(KERNELS[name], precision=highest)

  def loss(q, k, v, bias):
    return jnp.sum(kernel(q, k, v, bias) * g)

  precisions = _dot_precisions(jax.grad(loss, argnums=(0, 1, 2, 3)),
                               q, k, v, bias)
  assert len(precisions) >= 6          # 2 forward + 4 backward block matmuls
  assert all(p == (highest, highest) for p in precisions), precisions
  assert not any(p == (highest, highest) for p in _dot_precisions(
      jax.grad(lambda *a: jnp.sum(KERNELS[name](*a) * g)), q, k, v, bias))


# ---------------------------------------------------------------------------
# Huge and infinite biases


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("big", [1e7, 1e9, 1e30])
def test_a_row_of_huge_negative_bias_matches_jax_nn(name, big):
  """The usual additive padding mask: forward and all four gradients.

  The saved statistics used to be one float32 ``m + log l``, which drops
  ``log l`` at this magnitude: dv came out ``S`` times too large.
  """
  q, k, v, bias, g = _inputs(2)
  bias = bias.at[:, :, 3, :].set(-big).at[0, :, 5, :].set(-big)
  out, vjp = jax.vjp(JITTED[name], q, k, v, bias)
  ref_out, ref_vjp = jax.vjp(jax.jit(_jax_nn), q, k, v, bias)
  _close(out, ref_out, 2e-5)
  grads, ref_grads = vjp(g), ref_vjp(g)
  _close(grads[0], ref_grads[0], 2e-5)
  _close(grads[1], ref_grads[1], 2e-5)
  _close(grads[2], ref_grads[2], 2e-5)
  _close(grads[3], ref_grads[3], 2e-5)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_a_row_of_minus_inf_bias_is_a_fully_masked_row(name):
  """Zeros forward and zero, finite gradients for the row; others exact."""
  q, k, v, bias, g = _inputs(3)
  bias = bias.at[:, :, 4, :].set(-jnp.inf)
  row_live = jnp.ones((T,)).at[4].set(0.0)[None, :, None, None]
  out, vjp = jax.vjp(JITTED[name], q, k, v, bias)
  grads = vjp(g)
  assert np.all(np.asarray(out[:, 4]) == 0)
  for grad in grads:
    assert np.all(np.isfinite(np.asarray(grad)))
  assert np.all(np.asarray(grads[0][:, 4]) == 0)
  assert np.all(np.asarray(grads[3][:, :, 4]) == 0)
  # Elsewhere: jax.nn with the row masked instead (its value for the empty
  # row differs by design, so that row's cotangent is zero there).
  finite = jnp.isfinite(bias)
  ref_out, ref_vjp = jax.vjp(
      lambda q, k, v: _jax_nn(q, k, v, jnp.where(finite, bias, 0.0), finite),
      q, k, v)
  _close(out * row_live, ref_out * row_live, 2e-5)
  ref_grads = ref_vjp(g * row_live)
  _close(grads[0], ref_grads[0], 2e-5)
  _close(grads[1], ref_grads[1], 2e-5)
  _close(grads[2], ref_grads[2], 2e-5)
