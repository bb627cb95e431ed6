"""implementation="tokamax": delegation with our validation and row rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.kernels import tokamax_adapter


def _inputs(B=2, T=8, S=8, N=2, K=1, H=4):
  r = np.random.default_rng(0)
  return [jnp.asarray(r.normal(size=s), jnp.float32)
          for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H))]


def test_not_installed_says_pip_install(monkeypatch):
  monkeypatch.setattr(tokamax_adapter, "available", lambda: False)
  with pytest.raises(ValueError, match="pip install tokamax"):
    attn.dot_product_attention(*_inputs(), implementation="tokamax")


def test_bad_input_is_our_value_error(monkeypatch):
  # Our validation runs first, whether or not tokamax is installed.
  monkeypatch.setattr(tokamax_adapter, "available", lambda: False)
  q, k, v = _inputs()
  with pytest.raises(ValueError, match="multiple of key/value heads"):
    attn.dot_product_attention(q, k[:, :, :0], v[:, :, :0],
                               implementation="tokamax")


def test_matches_xla_forward_and_gradients_with_empty_row():
  pytest.importorskip("tokamax")   # optional extra; CI installs '.[test]'
  q, k, v = _inputs()
  seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)
  mask = jnp.ones((2, 1, 8, 8), bool).at[0, 0, 2].set(False)
  kw = {"segment_ids": seg, "mask": mask, "is_causal": True,
            "key_value_seq_lengths": jnp.asarray([6, 8])}

  def f(impl):
    def loss(q, k, v):
      out = attn.dot_product_attention(q, k, v, implementation=impl, **kw)
      return jnp.sum(out * jnp.sin(out)), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  (_, out), g = f("tokamax")
  (_, ref), ref_g = f("xla")
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(out)[0, 2] == 0)
  for a, b in zip(g, ref_g):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
