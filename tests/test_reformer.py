"""Tests of Reformer LSH attention ``reformer``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.kernels import reformer as reformer_lib
from tests.reference import reference_output
from tests.variant_helpers import (T, H, make_inputs, call, lengths_mask,
                                   KV_LENGTHS, Q_LENGTHS)


def np_reformer(q, k, v, rotations, *, chunk, shared, causal):
  """Loop reference of the documented LSH attention, one example, one head.

  q [T, H], k [S, H], v [S, D], rotations [H, R, nb/2].
  """
  t_len, s_len = len(q), len(k)
  if shared:
    k = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
  n_chunks = max(1, -(-max(t_len, s_len) // chunk))
  cq, ck = -(-t_len // n_chunks), -(-s_len // n_chunks)
  outs, lses = [], []
  for r in range(rotations.shape[1]):
    def buckets(x):
      proj = x @ rotations[:, r]
      return np.argmax(np.concatenate([proj, -proj], -1), -1)
    qb = buckets(q)
    kb = qb if shared else buckets(k)
    q_order = np.lexsort((np.arange(t_len), qb))
    k_order = q_order if shared else np.lexsort((np.arange(s_len), kb))
    q_rank = np.argsort(q_order)
    out = np.zeros((t_len, v.shape[-1]))
    lse = np.full(t_len, -np.inf)
    for i in range(t_len):
      ci = q_rank[i] // cq
      cands = [j for j in range(s_len)
               if np.where(k_order == j)[0][0] // ck in
               ({ci, (ci - 1) % n_chunks} if n_chunks > 1 else {ci})]
      if causal:
        same = [j for j in range(i + 1) if qb[j] == qb[i]]
        cands = same[-(chunk + 1):]
      if not cands:
        continue
      s = np.array([q[i] @ k[j] / np.sqrt(q.shape[1]) for j in cands])
      if shared:
        s = np.where(np.array(cands) == i, -1e5, s)
      m = s.max()
      e = np.exp(s - m)
      out[i] = e @ v[cands] / e.sum()
      lse[i] = m + np.log(e.sum())
    outs.append(out)
    lses.append(lse)
  lses = np.stack(lses)
  top = np.max(lses, 0)
  w = np.where(np.isfinite(lses), np.exp(lses - np.where(np.isfinite(top),
                                                         top, 0)), 0)
  w = w / np.where(w.sum(0) == 0, 1, w.sum(0))
  return np.einsum("rt,rtd->td", w, np.stack(outs))


@pytest.mark.parametrize("shared,causal,t,s", [
    (False, False, 10, 14), (True, False, 16, 16), (True, True, 16, 16)])
def test_reformer_matches_loop_reference(shared, causal, t, s):
  q, k, v = make_inputs(b=1, t=t, s=s, n=1, k=1, seed=19)
  spec = (f"reformer(chunk_size=4, n_buckets=4, n_hashes=3, "
          f"shared_qk={shared})")
  out = call(spec, q, k, v, is_causal=causal, rng=jax.random.PRNGKey(5))
  rotations = np.asarray(jax.random.normal(
      jax.random.PRNGKey(5), (H, 3, 2), jnp.float32), np.float64)
  want = np_reformer(*(np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v)),
                     rotations, chunk=4, shared=shared, causal=causal)
  np.testing.assert_allclose(out[0, :, 0], want, atol=2e-5)


def test_reformer_single_chunk_is_exact_attention():
  q, k, v = make_inputs(seed=20)
  lengths = jnp.array([10, 16])
  out = call("reformer(chunk_size=16, n_hashes=3)", q, k, v,
              key_value_seq_lengths=lengths)
  np.testing.assert_allclose(
      out, reference_output(q, k, v, lengths_mask(lengths, T)), atol=2e-5)


def test_reformer_is_deterministic_per_seed():
  # (the reference test above shows that a given rng seeds the rotations)
  q, k, v = make_inputs(seed=21)
  spec = "reformer(chunk_size=4, n_buckets=4)"
  kwargs = {"key_value_seq_lengths": KV_LENGTHS,
            "query_seq_lengths": Q_LENGTHS}
  a = call(spec, q, k, v, **kwargs)
  np.testing.assert_array_equal(a, call(spec, q, k, v, **kwargs))
  assert not np.allclose(a, call(spec[:-1] + ", seed=1)", q, k, v, **kwargs))


def test_reformer_more_hashes_approximate_better():
  # sharp scores: a query's mass sits on few keys, which more hash rounds
  # find more often (n_hashes=2 is the default of the spec)
  q, k, v = make_inputs(seed=1)
  kwargs = {"key_value_seq_lengths": KV_LENGTHS,
            "query_seq_lengths": Q_LENGTHS}
  exact = reference_output(q * 3, k * 3, v, lengths_mask(KV_LENGTHS, T))
  exact[0, 5:] = 0
  errors = [np.abs(call(spec, q * 3, k * 3, v, **kwargs) - exact).mean()
            for spec in ("reformer(chunk_size=4, n_buckets=4)",
                         "reformer(chunk_size=4, n_buckets=4, n_hashes=8)")]
  assert errors[1] < 0.5 * errors[0]


def test_lsh_buckets_are_angular():
  rng = np.random.default_rng(23)
  x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  rot = jnp.asarray(rng.normal(size=(8, 2, 4)), jnp.float32)
  b = reformer_lib.lsh_buckets(x, rot)
  assert b.shape == (2, 32) and int(b.min()) >= 0 and int(b.max()) < 8
  np.testing.assert_array_equal(b, reformer_lib.lsh_buckets(x * 7.0, rot))
  # the opposite vector lands in the opposite bucket
  np.testing.assert_array_equal(reformer_lib.lsh_buckets(-x, rot), (b + 4) % 8)
