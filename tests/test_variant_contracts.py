"""The contract every efficient variant meets, checked for each: shapes,
GQA, padding, causality, gradients, bfloat16, unsupported inputs, spec
strings, Flax drop-in. Variant-specific tests are in tests/test_<variant>.py.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.registry import (attention_param_shapes, get_attention, get_entry,
                           parse_spec)
from tests.variant_helpers import (B, T, N, K, H, DV, make_inputs, run,
                                   init_params_for_shapes, call,
                                   call_and_grads, random_params, lengths_mask,
                                   spec_id, KV_LENGTHS, Q_LENGTHS)


# Local, low-rank / kernelized and block-sparse variants: small options so
# that every pattern is really sparse / low-rank at T=16.
LOCAL_LOWRANK_SPECS = [
    "local(window=3, block_size=4)",
    "linear(chunk_size=4)",
    "performer(num_features=32, chunk_size=4)",
    "linformer(k=8)",
    "nystrom(num_landmarks=4)",
    "bigbird(block_size=4, num_window_blocks=1, num_global_blocks=1, "
    "num_random_blocks=1)",
    "longformer(window=2, global_tokens=(0, 9), block_size=4)",
]
LOCAL_LOWRANK_CAUSAL_SPECS = [s for s in LOCAL_LOWRANK_SPECS
                              if not s.startswith(("linformer", "nystrom"))]
LOCAL_LOWRANK_SEGMENT_SPECS = [s for s in LOCAL_LOWRANK_SPECS if s.startswith(
    ("local", "bigbird", "longformer"))]

# Sorted, synthetic and hard variants, with small options so that the
# sparsity is real at T=16.
SORTED_SPECS = [
    "reformer(chunk_size=4, n_buckets=4)",
    "reformer(chunk_size=4, n_buckets=4, shared_qk=True)",
    "synthesizer(hidden=8)",
    "synthesizer(kind='random')",
    "sinkhorn(block_size=4, hidden=8, partners=2)",
    "sparse(stride=4)",
    "sparse(pattern='fixed', stride=4, num_summary=2)",
    "topk(k=3)",
    "hard",
    "local_p(window=3, hidden=8)",
]
# The non-shared reformer refuses is_causal (tested below).
SORTED_CAUSAL_SPECS = [s for s in SORTED_SPECS if s != SORTED_SPECS[0]]


@pytest.mark.parametrize("spec", LOCAL_LOWRANK_SPECS, ids=spec_id)
def test_shapes_gqa(spec):
  q, k, v = make_inputs()
  out = run(spec, q, k, v)
  assert out.shape == (B, T, N, DV) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("spec", [LOCAL_LOWRANK_SPECS[i] for i in (0, 1, 3)],
                         ids=spec_id)
def test_unbatched_inputs(spec):
  """[T, N, H] inputs give [T, N, Dv] (shared canonicalize/finish path)."""
  q, k, v = make_inputs()
  np.testing.assert_allclose(run(spec, q[0], k[0], v[0]),
                             run(spec, q, k, v)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", LOCAL_LOWRANK_SPECS, ids=spec_id)
def test_cross_attention(spec):
  q, k, v = make_inputs(t=12, s=20)
  out = run(spec, q, k, v)
  assert out.shape == (B, 12, N, DV)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("spec", LOCAL_LOWRANK_SPECS, ids=spec_id)
def test_padding(spec):
  """Padded keys never matter; padded queries and empty examples give 0."""
  q, k, v = make_inputs(seed=3)
  lengths = dict(query_seq_lengths=jnp.array([T, 5]),
                 key_value_seq_lengths=jnp.array([0, 10]))
  out = np.asarray(run(spec, q, k, v, **lengths))
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(out[0], 0.0)      # no valid key at all
  np.testing.assert_array_equal(out[1, 5:], 0.0)  # padded queries
  assert np.abs(out[1, :5]).max() > 0
  k2 = k.at[:, 10:].set(5.0)
  v2 = v.at[:, 10:].set(-7.0)
  np.testing.assert_allclose(run(spec, q, k2, v2, **lengths), out,
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(run(spec, q, k2, v2), run(spec, q, k, v))


@pytest.mark.parametrize("spec", LOCAL_LOWRANK_SPECS, ids=spec_id)
def test_bfloat16(spec):
  q, k, v = make_inputs(seed=4)
  ref = run(spec, q, k, v)
  out = run(spec, *(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out, np.float32)).all()
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=5e-2,
                             atol=8e-2)


@pytest.mark.parametrize("spec", LOCAL_LOWRANK_SPECS, ids=spec_id)
def test_gradients_finite(spec):
  q, k, v = make_inputs(seed=5)
  causal = spec in LOCAL_LOWRANK_CAUSAL_SPECS
  loss = lambda q, k, v: jnp.sum(run(
      spec, q, k, v, is_causal=causal,
      key_value_seq_lengths=jnp.array([0, 9]),
      query_seq_lengths=jnp.array([T, 12])) ** 2)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    g = np.asarray(g)
    assert np.isfinite(g).all()
    assert np.abs(g).max() > 0
  np.testing.assert_array_equal(np.asarray(grads[1])[0], 0.0)  # empty ex.


@pytest.mark.parametrize("spec", LOCAL_LOWRANK_CAUSAL_SPECS, ids=spec_id)
def test_causal_future_tokens_do_not_leak(spec):
  """Changing queries/keys/values after t leaves outputs <= t unchanged.

  Cross-attention with S > T: keys past T - 1 are all in the future.
  """
  q, k, v = make_inputs(s=T + 4, seed=6)
  out = np.asarray(run(spec, q, k, v, is_causal=True))
  for t0 in (0, 5, 10, T - 1):
    k2 = k.at[:, t0 + 1:].add(2.0)
    v2 = v.at[:, t0 + 1:].multiply(-3.0)
    q2 = q.at[:, t0 + 1:].add(1.0)
    out2 = np.asarray(run(spec, q2, k2, v2, is_causal=True))
    np.testing.assert_allclose(out2[:, :t0 + 1], out[:, :t0 + 1], rtol=2e-5,
                               atol=2e-5)
    if t0 < T - 1:
      assert not np.allclose(out2[:, t0 + 1:], out[:, t0 + 1:])


@pytest.mark.parametrize("spec", LOCAL_LOWRANK_SPECS, ids=spec_id)
def test_unsupported_inputs_raise_value_error(spec):
  q, k, v = make_inputs()
  with pytest.raises(ValueError, match="bias"):
    run(spec, q, k, v, jnp.zeros((B, N, T, T)))
  with pytest.raises(ValueError, match=r"\[T, S\]"):
    run(spec, q, k, v, mask=jnp.tril(jnp.ones((T, T), bool)))
  with pytest.raises(ValueError, match="per-head"):
    run(spec, q, k, v, mask=jnp.ones((B, N, 1, T), bool))
  if spec not in LOCAL_LOWRANK_CAUSAL_SPECS:
    with pytest.raises(ValueError, match="is_causal"):
      run(spec, q, k, v, is_causal=True)
  if spec not in LOCAL_LOWRANK_SEGMENT_SPECS:
    with pytest.raises(ValueError, match="segment_ids"):
      run(spec, q, k, v, segment_ids=jnp.zeros((B, T), jnp.int32))
  with pytest.raises(ValueError, match="dropout"):
    run(spec, q, k, v, dropout_rate=0.1, deterministic=False,
         dropout_rng=jax.random.PRNGKey(0))


@pytest.mark.parametrize("spec", LOCAL_LOWRANK_SPECS, ids=spec_id)
def test_spec_string_matches_direct_call(spec):
  """get_attention(spec) traces to the same program as fn(**options)."""
  q, k, v = make_inputs(seed=7)
  name, options = parse_spec(spec)
  entry = attn.registry.get_entry(name)
  params = init_params_for_shapes(spec, q.shape, k.shape)
  extra = {"params": params} if params is not None else {}
  trace = lambda f: str(jax.make_jaxpr(f)(q, k, v))
  by_spec = trace(lambda q, k, v: get_attention(spec)(q, k, v, **extra))
  assert by_spec == trace(lambda q, k, v: entry.fn(q, k, v, **options,
                                                   **extra))
  # Different options trace differently (linformer's k is fixed by params).
  other = {"k": 8, "scale": 0.5} if name == "linformer" else {}
  assert by_spec != trace(lambda q, k, v: entry.fn(q, k, v, **other,
                                                   **extra))
  with pytest.raises(ValueError, match="no option"):
    get_attention(f"{name}(not_an_option=1)")


@pytest.mark.parametrize("spec", LOCAL_LOWRANK_SEGMENT_SPECS, ids=spec_id)
def test_segment_ids_block_attention_across_segments(spec):
  q, k, v = make_inputs(seed=8)
  seg = jnp.asarray(np.repeat([[0, 1, 2, 2], [0, 0, 1, 1]], 4, axis=1))
  out = np.asarray(run(spec, q, k, v, segment_ids=seg))
  # Each segment alone gives the same outputs as the packed sequence when
  # the pattern is built on the full positions: compare via perturbation.
  k2 = k.at[:, :4].add(4.0)          # segment 0 of both examples
  out2 = np.asarray(run(spec, q, k2, v, segment_ids=seg))
  np.testing.assert_allclose(out2[0, 4:], out[0, 4:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out2[1, 8:], out[1, 8:], rtol=1e-5, atol=1e-5)


def test_all_registered_with_metadata():
  names = attn.list_attention()
  for name in ("reformer", "synthesizer", "sinkhorn", "sparse", "topk",
               "hard", "local_p"):
    assert name in names
    entry = get_entry(name)
    assert not entry.exact and entry.causal and entry.padding and entry.cross
    assert entry.complexity and entry.description
  assert set(attention_param_shapes("sinkhorn", (1, 16, 2, 8),
                                    (1, 16, 2, 8))) == {
                                        "sort_w1", "sort_b1", "sort_w2",
                                        "sort_b2"}
  assert attention_param_shapes("sinkhorn(block_size=4)", (1, 16, 2, 8),
                                (1, 16, 2, 8))["sort_w2"][0] == (64, 4)
  assert attention_param_shapes("local_p(hidden=5)", (1, 16, 2, 8),
                                (1, 9, 2, 8))["w_p"][0] == (8, 5)
  assert attention_param_shapes("synthesizer(kind='random')", (1, 7, 3, 8),
                                (1, 9, 1, 8))["table"][0] == (3, 7, 9)
  # every registered initializer makes an array of its declared shape
  for spec in SORTED_SPECS:
    for shape, init in attention_param_shapes(spec, (B, T, N, H),
                                              (B, T, K, H)).values():
      made = jax.eval_shape(functools.partial(init, shape=shape),
                            jax.random.PRNGKey(0))
      assert made.shape == tuple(shape)


@pytest.mark.parametrize("spec,dtype", [
    (spec, dtype) for spec in SORTED_SPECS
    for dtype in (jnp.float32, jnp.bfloat16)
    if dtype == jnp.float32 or "shared_qk" not in spec])  # one bf16 reformer
def test_shape_dtype_finite(spec, dtype):
  q, k, v = make_inputs(dtype=dtype)
  out = call(spec, q, k, v, key_value_seq_lengths=KV_LENGTHS,
              query_seq_lengths=Q_LENGTHS)
  assert out.shape == (B, T, N, DV) and out.dtype == dtype
  assert np.isfinite(np.asarray(out, np.float32)).all()
  if dtype == jnp.bfloat16 and spec.startswith(("sparse", "synthesizer")):
    # no discrete choices: bf16 tracks fp32
    ref = call(spec, *(x.astype(jnp.float32) for x in (q, k, v)),
                key_value_seq_lengths=KV_LENGTHS, query_seq_lengths=Q_LENGTHS)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


@pytest.mark.parametrize("spec", SORTED_SPECS)
def test_padding_by_lengths_and_by_mask_agree_and_ignore_padding(spec):
  q, k, v = make_inputs()
  kwargs = {"query_seq_lengths": Q_LENGTHS}
  by_len = call(spec, q, k, v, key_value_seq_lengths=KV_LENGTHS, **kwargs)
  by_mask = call(spec, q, k, v,
                  mask=jnp.asarray(lengths_mask(KV_LENGTHS, T)), **kwargs)
  np.testing.assert_allclose(by_len, by_mask, atol=1e-6)
  # queries past their length output zeros
  assert not np.asarray(by_len[0, 5:]).any()
  # whatever sits in the padded key/value slots must not matter
  k2 = k.at[0, 11:].set(100.0)
  v2 = v.at[0, 11:].set(-100.0)
  np.testing.assert_allclose(
      by_len, call(spec, q, k2, v2, key_value_seq_lengths=KV_LENGTHS,
                    **kwargs), atol=1e-5)


@pytest.mark.parametrize("spec", SORTED_SPECS)
def test_gradients_finite_and_no_causal_leak(spec):
  causal = spec in SORTED_CAUSAL_SPECS
  q, k, v = make_inputs(seed=3)
  kwargs = {"is_causal": causal, "key_value_seq_lengths": jnp.array([9, 16])}
  out, grads = call_and_grads(spec, q, k, v, **kwargs)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  assert np.abs(np.asarray(grads[2])).sum() > 0  # values always matter
  if not causal:
    return
  rng = np.random.default_rng(4)
  for t0 in (0, 6, 11):
    def perturb(x):
      noise = rng.normal(size=x[:, t0 + 1:].shape)
      return x.at[:, t0 + 1:].add(jnp.asarray(noise, x.dtype))
    # shared-QK keys are derived from the queries: perturb those too
    q2 = perturb(q) if "shared_qk" in spec else q
    out2, _ = call_and_grads(spec, q2, perturb(k), perturb(v), **kwargs)
    np.testing.assert_allclose(out2[:, :t0 + 1], out[:, :t0 + 1], atol=1e-5)
    assert np.abs(np.asarray(out2[:, t0 + 1:] - out[:, t0 + 1:])).max() > 1e-3


@pytest.mark.parametrize("spec", ["reformer", "sinkhorn", "sparse", "local_p"])
def test_subquadratic_variants_reject_what_they_cannot_honour(spec):
  q, k, v = make_inputs()
  dense_mask = jnp.asarray(np.tril(np.ones((T, T), bool)))[None, None]
  with pytest.raises(ValueError, match="dense mask"):
    call(spec, q, k, v, mask=dense_mask)
  with pytest.raises(ValueError, match="bias"):
    call(spec, q, k, v, bias=jnp.zeros((1, 1, T, T)))
  with pytest.raises(ValueError, match="segment_ids"):
    call(spec, q, k, v, segment_ids=jnp.zeros((B, T), jnp.int32))
  with pytest.raises(ValueError, match="local_window_size"):
    call(spec, q, k, v, local_window_size=2)


def test_bad_options_raise_value_error():
  q, k, v = make_inputs()
  bad = [
      ("sparse(pattern='diagonal')", {}, "pattern"),
      ("sparse(pattern='fixed', stride=4, num_summary=5)", {}, "num_summary"),
      ("synthesizer(kind='mixture')", {"params": {}}, "kind"),
      ("hard(estimator='reinforce')", {}, "estimator"),
      ("hard(temperature=0.0)", {}, "temperature"),
      ("topk(k=0)", {}, "option k=0 is invalid"),
      ("reformer(n_buckets=3)", {}, "n_buckets"),
      ("reformer", {"is_causal": True}, "shared_qk"),
      ("local_p(window=0)", {}, "window"),
      ("sinkhorn(partners=0)", {}, "partners"),
  ]
  for spec, kwargs, match in bad:
    with pytest.raises(ValueError, match=match):
      call(spec, q, k, v, **kwargs)
  with pytest.raises(ValueError, match="has no option"):
    get_attention("sparse(blocksize=4)")
  for spec in ("synthesizer", "sinkhorn", "local_p"):
    with pytest.raises(ValueError, match="needs params"):
      get_attention(spec)(q, k, v)
  q3, k3, v3 = make_inputs(t=8, s=16)
  with pytest.raises(ValueError, match="T == S"):
    call("sinkhorn(block_size=4)", q3, k3, v3, is_causal=True)
  with pytest.raises(ValueError, match="self-attention"):
    call("reformer(shared_qk=True)", q3, k3, v3)
  with pytest.raises(ValueError, match="key length"):  # params too small
    call("synthesizer", *make_inputs(s=32),
         params=random_params("synthesizer", q, k))


def test_cross_attention_shapes():
  # (sparse, reformer, local_p and the random synthesizer are checked
  # against references with T != S below)
  q, k, v = make_inputs(t=8, s=20, seed=5)
  for spec in ("sinkhorn(block_size=4, hidden=8)", "topk(k=3)", "hard",
               "synthesizer(hidden=8)"):
    out = call(spec, q, k, v)
    assert out.shape == (B, 8, N, DV)
    assert np.isfinite(np.asarray(out)).all()


def test_drops_into_flax_multihead_attention():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 32)),
                  jnp.float32)
  for spec in ("topk(k=4)",):
    layer = nn.MultiHeadDotProductAttention(
        num_heads=4, attention_fn=get_attention(spec))
    variables = layer.init(jax.random.PRNGKey(0), x)
    out = layer.apply(variables, x)
    assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()


# The efficient kernels validate their own options (not only through a spec
# string): a direct call with a bad value is one ValueError naming the
# variant and the option, raised at trace time before any XLA is built.
_DIRECT_BAD_OPTIONS = [
    ("performer", "num_features", 1.5), ("performer", "num_features", "a"),
    ("performer", "chunk_size", 1.5), ("linear", "chunk_size", "a"),
    ("linformer", "k", 0), ("sinkhorn", "block_size", 0),
    ("sinkhorn", "temperature", "a"), ("nystrom", "num_landmarks", 1.5),
    ("nystrom", "pinv_iterations", True), ("bigbird", "block_size", 1.5),
    ("bigbird", "num_global_blocks", "a"), ("local", "block_size", 1.5),
    ("local_p", "window", "a"), ("longformer", "block_size", True),
    ("longformer", "global_tokens", "a"), ("reformer", "n_buckets", 3),
    ("reformer", "shared_qk", "yes"), ("sparse", "num_summary", "a"),
    ("sparse", "stride", 1.5), ("synthesizer", "hidden", 0),
    ("topk", "k", 1.5), ("hard", "temperature", 0), ("hard", "scale", "a"),
]


@pytest.mark.parametrize("name, option, bad", _DIRECT_BAD_OPTIONS)
def test_kernel_checks_its_own_option_values(name, option, bad):
  q, k, v = make_inputs(b=1, t=8, s=8)
  shapes = attention_param_shapes(name, q.shape, k.shape)
  params = {n: jnp.zeros(s) for n, (s, _) in shapes.items()} or None
  fn = get_entry(name).fn
  kwargs = {option: bad} | ({"params": params} if params else {})
  with pytest.raises(ValueError,
                     match=rf"attention '{name}': option {option}="):
    jax.eval_shape(lambda q, k, v: fn(q, k, v, **kwargs), q, k, v)


# S = 0 (no keys at all): every query row is fully masked, so the result is
# zeros with zero gradients, exactly what the exact kernel gives.
_NO_KEY_SPECS = ["linear", "performer", "nystrom", "hard", "sinkhorn",
                 "reformer", "local_p", "linformer", "synthesizer", "topk",
                 "local", "longformer", "bigbird", "sparse", "chunked"]


@pytest.mark.parametrize("spec", _NO_KEY_SPECS)
def test_no_keys_gives_zeros_like_the_exact_kernel(spec):
  q, k, v = make_inputs(b=1, t=4, s=0)
  want = attn.dot_product_attention(q, k, v)
  np.testing.assert_array_equal(np.asarray(want), 0.0)
  got = run(spec, q, k, v)
  assert got.shape == want.shape == (1, 4, N, DV) and got.dtype == q.dtype
  np.testing.assert_array_equal(np.asarray(got), 0.0)
  p = init_params_for_shapes(spec, q.shape, k.shape)
  params = {"params": p} if p else {}
  grad = jax.grad(lambda q: jnp.sum(get_attention(spec)(q, k, v, **params)))(q)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
