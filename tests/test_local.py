"""Tests of the sliding-window kernel ``local``."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attn
from tests.reference import reference_mask, reference_output
from tests.variant_helpers import make_inputs, run


@settings(max_examples=4, deadline=None)
@given(left=st.integers(0, 9), right=st.integers(0, 9),
       block=st.sampled_from([None, 1, 3, 4, 16]), causal=st.booleans(),
       s=st.sampled_from([9, 13, 21]))
def test_local_equals_exact_with_window(left, right, block, causal, s):
  q, k, v = make_inputs(b=1, t=13, s=s, seed=left + 10 * right)
  out = run(f"local(window=({left}, {right}), block_size={block})",
             q, k, v, is_causal=causal,
             key_value_seq_lengths=jnp.array([s - 2]))
  mask = reference_mask(1, 13, s, is_causal=causal, window=(left, right),
                        kv_lengths=[s - 2])
  np.testing.assert_allclose(out, reference_output(q, k, v, mask),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_local_window_covering_everything_is_exact(causal):
  q, k, v = make_inputs(seed=9)
  out = run("local(window=16, block_size=8)", q, k, v, is_causal=causal)
  exact = attn.dot_product_attention(q, k, v, is_causal=causal,
                                     implementation="xla")
  np.testing.assert_allclose(out, exact, rtol=2e-5, atol=2e-5)


def test_local_runtime_window_intersects_option_and_segments():
  q, k, v = make_inputs(seed=10)
  seg = jnp.asarray(np.repeat([[0, 1], [0, 0]], 8, axis=1))
  out = run("local(window=(4, 1))", q, k, v, local_window_size=2,
             segment_ids=seg)
  exact = attn.dot_product_attention(q, k, v, local_window_size=(2, 1),
                                     segment_ids=seg, implementation="xla")
  np.testing.assert_allclose(out, exact, rtol=2e-5, atol=2e-5)
