"""Every registered exact kernel works as a Flax ``attention_fn``.

Each kernel from ``attn.get_attention(name)`` is dropped into
``flax.linen.MultiHeadDotProductAttention`` and ``flax.nnx.MultiHeadAttention``
and must give the same output as Flax's own ``dot_product_attention`` with the
same parameters: without a mask, with a causal + key-padding mask, with
dropout (our dropout draws the same keep-mask as Flax's for the same key), and
with ``sow_weights`` (the sown weights equal Flax's; kernels that never
materialise weights sow nothing). Everything runs inside a
one-device mesh so that sequence-parallel kernels (``ring``) find their axis. Kernels that cannot do
dropout must refuse it with a ``ValueError``; the ``softmax`` and ``xla``
kernels must support everything.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import attn
from attn import registry
from attn.parallel import make_mesh

B, T, F, HEADS = 2, 5, 16, 4
FULL_SUPPORT = ("softmax", "xla")


def _exact_names():
  names = [n for n in attn.list_attention() if registry.get_entry(n).exact]
  if jax.devices()[0].platform != "gpu":
    names.remove("cudnn")                        # GPU only
  return names


EXACT = _exact_names()


def test_exact_kernels_are_found():
  assert set(FULL_SUPPORT) <= set(EXACT)


@pytest.fixture(autouse=True)
def one_device_mesh():
  """Sequence-parallel kernels (ring) need an ambient mesh with a 'seq' axis;
  a one-device mesh leaves every other kernel unchanged."""
  with jax.set_mesh(make_mesh(data=1, seq=1, model=1,
                              devices=jax.devices()[:1])):
    yield


def _x():
  return jnp.asarray(np.random.default_rng(0).standard_normal((B, T, F)),
                     jnp.float32)


def _masks(x):
  key_valid = jnp.asarray([[1] * T, [1, 1, 1, 0, 0]])
  return {"none": None,
          "padding+causal": nn.combine_masks(
              nn.make_causal_mask(x[..., 0]),
              nn.make_attention_mask(jnp.ones((B, T)), key_valid))}


def _jit_apply(module):
  """``module.apply`` under ``jax.jit``: one program per call (applied
  eagerly, every operation of the kernel compiles on its own)."""
  return jax.jit(module.apply,
                 static_argnames=("deterministic", "sow_weights", "mutable"))


def _nnx_call(module, x, **kwargs):
  """``module(x, **kwargs)`` under ``nnx.jit`` (``deterministic`` and
  ``sow_weights`` static)."""
  static = {k: kwargs.pop(k) for k in ("deterministic", "sow_weights")
            if k in kwargs}
  return nnx.jit(lambda m, x, kw: m(x, **kw, **static))(module, x, kwargs)


def _refuses(name, fn, what):
  """Runs ``fn``; a kernel without support must raise ValueError(what)."""
  if name in FULL_SUPPORT:
    return fn()
  try:
    return fn()
  except ValueError as e:
    assert what in str(e), str(e)
    return None


@pytest.mark.parametrize("name", EXACT)
def test_linen_multi_head_attention(name):
  x = _x()

  def module(attention_fn, dropout_rate=0.0):
    return nn.MultiHeadDotProductAttention(
        num_heads=HEADS, qkv_features=F, dropout_rate=dropout_rate,
        attention_fn=attention_fn)

  ours, flax_default = module(attn.get_attention(name)), module(
      nn.dot_product_attention)
  params = flax_default.init(jax.random.PRNGKey(0), x)
  for label, mask in _masks(x).items():
    np.testing.assert_allclose(
        _jit_apply(ours)(params, x, mask=mask),
        _jit_apply(flax_default)(params, x, mask=mask), rtol=1e-5,
        atol=1e-5, err_msg=label)

  # Dropout: deterministic -> no dropout; otherwise Flax's exact keep-mask.
  ours, flax_default = (module(attn.get_attention(name), 0.3),
                        module(nn.dot_product_attention, 0.3))
  mask = _masks(x)["padding+causal"]
  kept = _jit_apply(ours)(params, x, mask=mask, deterministic=True)
  np.testing.assert_allclose(
      kept, _jit_apply(flax_default)(params, x, mask=mask,
                                     deterministic=True),
      rtol=1e-5, atol=1e-5)
  rngs = {"dropout": jax.random.PRNGKey(7)}
  want = _jit_apply(flax_default)(params, x, mask=mask, deterministic=False,
                                  rngs=rngs)
  got = _refuses(name, lambda: _jit_apply(ours)(
      params, x, mask=mask, deterministic=False, rngs=rngs), "dropout")
  if got is not None:
    if name != "chunked":   # chunked draws its keep-mask per block, by design
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got - kept)).max() > 1e-3

  # sow_weights: the weights land where Flax's default puts them.
  def sown(m):
    _, state = _jit_apply(m)(params, x, mask=mask, sow_weights=True,
                             deterministic=True, mutable=("intermediates",))
    return state.get("intermediates", {}).get("attention_weights")

  want = sown(flax_default)
  got = sown(ours)
  assert got is not None or name not in FULL_SUPPORT
  if got is not None:
    assert len(got) == 1 and got[0].shape == (B, HEADS, T, T)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", EXACT)
def test_nnx_multi_head_attention(name):
  x = _x()

  def module(attention_fn, dropout_rate=0.0):
    return nnx.MultiHeadAttention(
        num_heads=HEADS, in_features=F, qkv_features=F, decode=False,
        dropout_rate=dropout_rate, attention_fn=attention_fn,
        rngs=nnx.Rngs(0))                        # same seed -> same params

  ours = module(attn.get_attention(name), 0.3)
  flax_default = module(nnx.dot_product_attention, 0.3)
  for label, mask in _masks(x).items():
    np.testing.assert_allclose(
        _nnx_call(ours, x, mask=mask, deterministic=True),
        _nnx_call(flax_default, x, mask=mask, deterministic=True),
        rtol=1e-5, atol=1e-5, err_msg=label)

  mask = _masks(x)["padding+causal"]
  want = _nnx_call(flax_default, x, mask=mask, deterministic=False,
                   rngs=nnx.Rngs(dropout=3))
  got = _refuses(name, lambda: _nnx_call(
      ours, x, mask=mask, deterministic=False, rngs=nnx.Rngs(dropout=3)),
                 "dropout")
  if got is not None and name != "chunked":  # chunked: per-block keep-mask
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def sown(m):
    _, state = nnx.capture(m, nnx.Intermediate)(
        x, mask=mask, deterministic=True, sow_weights=True)
    return state.get("attention_weights")

  want = sown(flax_default)
  got = sown(ours)
  assert got is not None or name not in FULL_SUPPORT
  if got is not None:
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == 1 and got[0].shape == (B, HEADS, T, T)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
