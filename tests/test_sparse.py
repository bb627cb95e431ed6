"""Tests of the Sparse Transformer patterns ``sparse``."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference import reference_output
from tests.variant_helpers import make_inputs, call, lengths_mask


def np_sparse_mask(t, s, pattern, stride, num_summary, causal):
  i, j = np.arange(t)[:, None], np.arange(s)[None, :]
  if pattern == "strided":
    m = (np.abs(i - j) <= stride) | ((i - j) % stride == 0)
  else:
    m = (i // stride == j // stride) | (j % stride >= stride - num_summary)
  return m & (j <= i) if causal else m


@settings(max_examples=4, deadline=None)
@given(pattern=st.sampled_from(["strided", "fixed"]), causal=st.booleans(),
       t=st.integers(1, 19), s=st.integers(1, 19), stride=st.integers(1, 6),
       summary=st.integers(1, 6), length=st.integers(1, 19))
def test_sparse_equals_exact_attention_under_its_pattern(
    pattern, causal, t, s, stride, summary, length):
  summary = min(summary, stride)
  length = min(length, s)
  q, k, v = make_inputs(t=t, s=s, seed=t * 100 + s)
  out = call(f"sparse(pattern={pattern!r}, stride={stride}, "
              f"num_summary={summary})", q, k, v, is_causal=causal,
              key_value_seq_lengths=jnp.array([length, s]))
  mask = np_sparse_mask(t, s, pattern, stride, summary, causal)[None, None]
  mask = mask & lengths_mask([length, s], s)
  np.testing.assert_allclose(out, reference_output(q, k, v, mask), atol=2e-5)
