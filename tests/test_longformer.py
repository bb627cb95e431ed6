"""Tests of Longformer attention ``longformer``."""

import jax.numpy as jnp
import numpy as np
import pytest

import attn
from tests.reference import reference_mask, reference_output
from tests.variant_helpers import B, T, make_inputs, run


def test_longformer_all_global_is_exact():
  q, k, v = make_inputs(seed=20)
  for causal in (False, True):
    out = run(f"longformer(window=1, global_tokens={T})", q, k, v,
               is_causal=causal)
    np.testing.assert_allclose(
        out,
        reference_output(q, k, v, reference_mask(B, T, T, is_causal=causal)),
        rtol=2e-5, atol=2e-5)


def test_longformer_without_globals_is_exact_local_window():
  q, k, v = make_inputs(seed=21)
  out = run("longformer(window=(3, 1), global_tokens=0)", q, k, v,
             is_causal=True)
  exact = attn.dot_product_attention(q, k, v, is_causal=True,
                                     local_window_size=(3, 1),
                                     implementation="xla")
  np.testing.assert_allclose(out, exact, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_longformer_matches_brute_force_pattern(causal):
  q, k, v = make_inputs(seed=22)
  glob = (0, 6, 13)
  out = run(
      f"longformer(window=(2, 3), global_tokens={glob}, block_size=4)",
      q, k, v, is_causal=causal, key_value_seq_lengths=jnp.array([T, 11]))
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  pattern = (((s >= t - 2) & (s <= t + 3)) | np.isin(s, glob)
             | np.isin(t, glob))
  mask = pattern[None, None] & reference_mask(
      B, T, T, is_causal=causal, kv_lengths=[T, 11])
  np.testing.assert_allclose(out, reference_output(q, k, v, mask),
                             rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="outside"):
    run("longformer(global_tokens=(3, 40))", q, k, v)
