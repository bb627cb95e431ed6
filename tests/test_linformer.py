"""Tests of Linformer attention ``linformer``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.registry import attention_param_shapes, get_attention
from tests.reference import reference_output
from tests.variant_helpers import T, make_inputs, run


def test_linformer_identity_projection_is_exact():
  q, k, v = make_inputs(seed=14)
  eye = jnp.eye(T)
  out = run(f"linformer(k={T})", q, k, v, params={"E": eye, "F": eye})
  np.testing.assert_allclose(out, reference_output(q, k, v),
                             rtol=2e-5, atol=2e-5)


def test_linformer_params_shapes_and_errors():
  q, k, v = make_inputs(seed=15)
  shapes = attention_param_shapes("linformer(k=8, max_length=32)", q.shape,
                                  k.shape)
  assert {n: s for n, (s, _) in shapes.items()} == {"E": (8, 32),
                                                    "F": (8, 32)}
  e = jax.random.normal(jax.random.PRNGKey(0), (8, 32))
  f = jax.random.normal(jax.random.PRNGKey(1), (8, 32))
  fn = get_attention("linformer(k=8, max_length=32)")
  # Longer parameters: the first S columns are used.
  np.testing.assert_allclose(
      run("linformer(k=8, max_length=32)", q, k, v,
           params={"E": e, "F": f}),
      run("linformer(k=8)", q, k, v, params={"E": e[:, :T], "F": f[:, :T]}),
      rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="needs params"):
    fn(q, k, v)
  with pytest.raises(ValueError, match="must be"):
    fn(q, k, v, params={"E": e[:, :T - 1], "F": f})
  with pytest.raises(ValueError, match="exceeds max_length"):
    get_attention("linformer(k=8, max_length=8)")(q, k, v,
                                                  params={"E": e, "F": f})
