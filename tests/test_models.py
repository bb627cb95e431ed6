"""Tests for attn.models: shapes, causality, caching, padding, variants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import registry
from attn.models import (EncoderClassifier, RNNConfig, RNNSeq2Seq,
                         Seq2SeqTransformer, TransformerConfig,
                         TransformerEncoder, TransformerLM, ViT,
                         attention_rollout, attention_weights, cls_saliency)

KEY = jax.random.key(0)
# Tiny shared shapes: eager JAX compiles each op once per shape.
B, T, D, V = 2, 6, 16, 11
TINY = dict(emb_dim=D, num_heads=2, num_layers=1, mlp_dim=32)


def cfg(**kw):
  """A tiny :class:`TransformerConfig` (``kw`` overrides)."""
  return TransformerConfig(**{**TINY, **kw})


def tokens(seed, shape=(B, T)):
  """NumPy-made ids: jax.random would compile a sampler per shape."""
  return jnp.asarray(np.random.RandomState(seed).randint(1, V, shape),
                     jnp.int32)


def count(tree):
  return sum(a.size for a in jax.tree.leaves(tree))


def tiny_lm(**kw):
  return TransformerLM(cfg(vocab_size=V, max_len=12, **kw))


# --------------------------------------------------------------------------
# TransformerLM: one model shared by the tests below (GQA, RoPE, 2 layers).


@pytest.fixture(scope="module")
def lm_and_variables():
  lm = tiny_lm(num_layers=2, num_kv_heads=1, positional="rope")
  return lm, lm.init(KEY, tokens(0))


def test_lm_parameter_count_and_shapes(lm_and_variables):
  lm, variables = lm_and_variables
  attention = 2 * (D * D + D) + 2 * (D * 8 + 8)  # q, out; k, v: one kv head
  layer = attention + 2 * 2 * D + (D * 32 + 32) + (32 * D + D)
  assert count(variables) == V * D + 2 * layer + 2 * D + D * V + V
  logits = lm.apply(variables, tokens(0))
  chex.assert_shape(logits, (B, T, V))
  assert logits.dtype == jnp.float32
  learned = tiny_lm(positional="learned").init(KEY, tokens(0))
  assert learned["params"]["embedding"]["positional"]["embedding"].shape == (
      12, D)


def test_lm_output_at_t_ignores_later_tokens(lm_and_variables):
  lm, variables = lm_and_variables
  x = tokens(1)
  y = x.at[:, 4:].set((x[:, 4:] + 3) % V)
  a, b = lm.apply(variables, x), lm.apply(variables, y)
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
  assert not np.allclose(a[:, 4:], b[:, 4:], atol=1e-3)


def test_lm_cached_decoding_gives_full_forward_logits(lm_and_variables):
  lm, variables = lm_and_variables
  x = tokens(2)
  full = lm.apply(variables, x)
  decoder = lm.clone(config=lm.config.replace(decode=True))
  cache = decoder.init(KEY, x)["cache"]
  step = jax.jit(lambda c, t: decoder.apply(  # pylint: disable=g-long-lambda
      {"params": variables["params"], "cache": c}, t, mutable=["cache"]))
  outs = []
  for t in range(T):
    logits, upd = step(cache, x[:, t:t + 1])
    cache = upd["cache"]
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)


def test_generate_greedy_and_top_k_against_full_forward(lm_and_variables):
  lm, variables = lm_and_variables
  prompt = tokens(3, (B, 3))
  # temperature is traced and top_k static: one compilation for both calls.
  greedy = lm.generate(variables["params"], prompt, 3, KEY, temperature=0.0,
                       top_k=3)
  chex.assert_shape(greedy, (B, T))
  np.testing.assert_array_equal(greedy[:, :3], prompt)
  logits = lm.apply(variables, greedy)
  np.testing.assert_array_equal(greedy[:, 3:],
                                jnp.argmax(logits[:, 2:-1], -1))
  sample = lambda seed: lm.generate(  # pylint: disable=g-long-lambda
      variables, prompt, 3, jax.random.key(seed), top_k=3, temperature=2.0)
  sampled = sample(8)
  np.testing.assert_array_equal(sampled, sample(8))
  assert not all(np.array_equal(sampled, sample(s)) for s in range(9, 13))
  logits = np.asarray(lm.apply(variables, sampled))
  top3 = np.argsort(logits[:, 2:-1], axis=-1)[..., -3:]
  assert np.all((top3 == np.asarray(sampled)[:, 3:, None]).any(-1))


def test_generate_without_cache_matches_the_cached_path(lm_and_variables):
  lm, variables = lm_and_variables
  prompt = tokens(5, (B, 2))
  for temperature in (0.0, 1.5):
    cached, full = (lm.generate(variables, prompt, 4, jax.random.key(2),
                                temperature=temperature, use_cache=use)
                    for use in (True, False))
    np.testing.assert_array_equal(cached, full)
  # performer cannot decode with a cache: the default takes the full-prefix
  # path, whose greedy tokens are the argmax of a full forward pass.
  performer = TransformerLM(cfg(vocab_size=V, max_len=T,
                                attention="performer"))
  assert not attn.models.can_decode("performer")
  assert attn.models.can_decode("softmax")
  params = performer.init(KEY, tokens(0))
  greedy = performer.generate(params, prompt, 4, KEY, temperature=0.0)
  logits = performer.apply(params, greedy)
  np.testing.assert_array_equal(greedy[:, 2:],
                                jnp.argmax(logits[:, 1:-1], -1))
  with pytest.raises(ValueError, match="decoding with a KV cache"):
    performer.generate(params, prompt, 4, KEY, use_cache=True)


def test_generate_rejects_bad_arguments(lm_and_variables):
  lm, variables = lm_and_variables
  prompt = tokens(0, (B, 3))
  with pytest.raises(ValueError, match="max_len"):
    lm.generate(variables, prompt, 10, KEY)
  with pytest.raises(ValueError, match="top_k"):
    lm.generate(variables, prompt, 2, KEY, top_k=0)
  with pytest.raises(ValueError, match="temperature"):
    lm.generate(variables, prompt, 2, KEY, temperature=-1.0)


def test_lm_sows_causal_weights_for_every_layer(lm_and_variables):
  lm, variables = lm_and_variables
  x = tokens(4)
  _, state = lm.apply(variables, x, mutable=["intermediates"])
  found = attention_weights(state)
  assert [path for path, _ in found] == ["decoder/layer_0/attention",
                                         "decoder/layer_1/attention"]
  for _, w in found:
    chex.assert_shape(w, (B, 2, T, T))
    np.testing.assert_allclose(np.sum(w, -1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.triu(np.asarray(w), 1), 0.0)


def test_lm_dropout_only_in_training(lm_and_variables):
  lm, variables = lm_and_variables
  lm = lm.clone(config=lm.config.replace(dropout_rate=0.3,
                                         attention_dropout_rate=0.3))
  x = tokens(5)
  eval_logits = lm.apply(variables, x)
  train = jax.jit(lambda seed: lm.apply(  # pylint: disable=g-long-lambda
      variables, x, train=True, rngs={"dropout": jax.random.key(seed)}))
  np.testing.assert_array_equal(train(1), train(1))
  assert not np.allclose(train(1), eval_logits)
  assert not np.allclose(train(1), train(2))


def test_lm_post_ln_in_bfloat16(lm_and_variables):
  lm, variables = lm_and_variables
  lm = lm.clone(config=lm.config.replace(pre_ln=False))
  x = tokens(6)
  params = {"params": {**variables["params"], "decoder": {
      k: v for k, v in variables["params"]["decoder"].items()
      if k != "final_norm"}}}
  chex.assert_trees_all_equal_structs(params, lm.init(KEY, x))
  logits = lm.apply(params, x)
  bf16 = jax.jit(lm.clone(config=lm.config.replace(dtype=jnp.bfloat16))
                 .apply)(params, x)
  assert bf16.dtype == jnp.float32 and np.all(np.isfinite(bf16))
  np.testing.assert_allclose(bf16, logits, atol=0.25)
  assert not np.allclose(logits, lm_and_variables[0].apply(variables, x),
                         atol=1e-2)


@pytest.mark.parametrize("transform", [jax.jit, lambda f: f],
                         ids=["jit", "eager"])
def test_lm_under_jit_and_eager(lm_and_variables, transform):
  lm, variables = lm_and_variables
  x = tokens(7)
  np.testing.assert_allclose(transform(lm.apply)(variables, x),
                             lm.apply(variables, x), atol=1e-5)


# --------------------------------------------------------------------------
# Encoders, classifier, seq2seq


@pytest.mark.parametrize("positional,equivariant", [("none", True),
                                                    ("rope", False)])
def test_encoder_permutation_equivariance(positional, equivariant):
  enc = TransformerEncoder(TransformerConfig(num_layers=2, num_heads=2,
                                             mlp_dim=32,
                                             positional=positional))
  x = jnp.asarray(np.random.RandomState(0).randn(B, T, D), jnp.float32)
  perm = np.array([3, 0, 5, 1, 4, 2])
  variables = enc.init(KEY, x)
  diff = np.max(np.abs(enc.apply(variables, x)[:, perm]
                       - enc.apply(variables, x[:, perm])))
  assert (diff < 1e-5) == equivariant, diff


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_padding_does_not_leak(pooling):
  clf = EncoderClassifier(cfg(vocab_size=V, max_len=8), num_classes=3,
                          pooling=pooling)
  x = tokens(8)
  valid = jnp.array([[True] * T, [True] * 4 + [False] * 2])
  variables = clf.init(KEY, x, padding_mask=valid)
  logits = clf.apply(variables, x, padding_mask=valid)
  chex.assert_shape(logits, (B, 3))
  changed_pad = x.at[1, 4:].set((x[1, 4:] + 1) % V)
  np.testing.assert_allclose(clf.apply(variables, changed_pad,
                                       padding_mask=valid), logits, atol=1e-6)
  changed_real = x.at[1, 0].set((x[1, 0] + 1) % V)
  assert not np.allclose(clf.apply(variables, changed_real,
                                   padding_mask=valid)[1], logits[1])


def test_seq2seq_causal_decoder_cross_attention_and_padding():
  model = Seq2SeqTransformer(cfg(vocab_size=V, output_vocab_size=7,
                                 max_len=8))
  src, dec = tokens(9), tokens(10) % 7
  valid = jnp.array([[True] * T, [True] * 3 + [False] * 3])
  variables = model.init(KEY, src, dec, padding_mask=valid)
  assert {"encoder", "decoder"} <= set(variables["params"])
  logits = model.apply(variables, src, dec, padding_mask=valid)
  chex.assert_shape(logits, (B, T, 7))
  later = dec.at[:, 3:].set((dec[:, 3:] + 1) % 7)
  np.testing.assert_allclose(model.apply(variables, src, later,
                                         padding_mask=valid)[:, :3],
                             logits[:, :3], atol=1e-6)
  pad_changed = src.at[1, 3:].set((src[1, 3:] + 1) % V)
  np.testing.assert_allclose(model.apply(variables, pad_changed, dec,
                                         padding_mask=valid), logits,
                             atol=1e-6)
  src_changed = src.at[:, 0].set((src[:, 0] + 1) % V)
  assert not np.allclose(model.apply(variables, src_changed, dec,
                                     padding_mask=valid), logits)
  _, state = model.apply(variables, src, dec, padding_mask=valid,
                         mutable=["intermediates"])
  paths = [p for p, _ in attention_weights(state)]
  assert paths == ["encoder/layer_0/attention",
                   "decoder/layer_0/self_attention",
                   "decoder/layer_0/cross_attention"]


# --------------------------------------------------------------------------
# ViT and attention rollout


def np_rollout(weights):
  out = np.eye(weights[0].shape[-1])[None]
  for w in weights:
    a = np.asarray(w, np.float64).mean(1)
    a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
    a /= a.sum(-1, keepdims=True)
    out = np.einsum("bij,bjk->bik", a, out)
  return out


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_vit_shapes_weights_and_rollout(positional):
  vit = ViT(cfg(positional=positional, num_layers=2), num_classes=3,
            patch_size=2)
  images = IMAGES
  variables = vit.init(KEY, images)
  n_pos = 6 * D if positional == "learned" else 0
  assert count(variables) - n_pos == count(
      ViT(cfg(positional="none", num_layers=2), num_classes=3,
          patch_size=2).init(KEY, images))
  logits, state = vit.apply(variables, images, mutable=["intermediates"])
  chex.assert_shape(logits, (B, 3))
  weights = [w for _, w in attention_weights(state)]
  assert len(weights) == 2
  chex.assert_shape(weights, (B, 2, 7, 7))
  rollout = attention_rollout(weights)
  np.testing.assert_allclose(rollout, np_rollout(weights), atol=1e-5)
  np.testing.assert_allclose(np.sum(rollout, -1), 1.0, atol=1e-5)
  saliency = cls_saliency(rollout, (2, 3))
  np.testing.assert_allclose(saliency.reshape(B, 6), rollout[:, 0, 1:])


def test_vit_rejects_bad_patch_size():
  with pytest.raises(ValueError, match="patch_size"):
    ViT(cfg(), num_classes=3, patch_size=4).init(KEY,
                                                 jnp.zeros((1, 6, 6, 3)))


# --------------------------------------------------------------------------
# RNN encoder-decoder


@pytest.mark.parametrize("style,attention,mode", [
    ("bahdanau", "additive", "global"), ("luong", "dot", "local_p")])
def test_rnn_seq2seq_causal_and_padding(style, attention, mode):
  model = RNNSeq2Seq(RNNConfig(vocab_size=V, emb_dim=8, hidden_dim=D,
                               style=style, attention=attention,
                               luong_mode=mode))
  src, dec = tokens(11), tokens(12)
  valid = jnp.array([[True] * T, [True] * 4 + [False] * 2])
  variables = jax.jit(model.init)(KEY, src, dec, padding_mask=valid)
  # One compilation: eager nn.scan/nn.RNN would recompile on every call.
  apply = jax.jit(lambda s, d: model.apply(  # pylint: disable=g-long-lambda
      variables, s, d, padding_mask=valid, mutable=["intermediates"]))
  logits, state = apply(src, dec)
  chex.assert_shape(logits, (B, T, V))
  (path, weights), = attention_weights(state)
  assert path.endswith(("additive", "luong"))
  np.testing.assert_array_equal(np.asarray(weights)[1, ..., 4:], 0.0)
  later = dec.at[:, 3:].set((dec[:, 3:] + 1) % V)
  np.testing.assert_allclose(apply(src, later)[0][:, :3], logits[:, :3],
                             atol=1e-6)
  pad_changed = src.at[1, 4:].set((src[1, 4:] + 1) % V)
  np.testing.assert_allclose(apply(pad_changed, dec)[0], logits, atol=1e-6)


def test_rnn_rejects_relative_positional():
  with pytest.raises(ValueError, match="absolute positional"):
    RNNSeq2Seq(RNNConfig(vocab_size=V, positional="rope")).init(
        KEY, tokens(0), tokens(1))


# --------------------------------------------------------------------------
# Every registered variant in every model


VARIANTS = [n for n in attn.list_attention()
            if not (n == "cudnn" and jax.devices()[0].platform != "gpu")]
IMAGES = jnp.asarray(np.random.RandomState(0).randn(B, 4, 6, 3), jnp.float32)
VALID = jnp.array([[True] * T, [True] * 4 + [False] * 2])

MODELS = {
    "lm": (lambda a: tiny_lm(attention=a), (tokens(0),), {}),
    "classifier": (lambda a: EncoderClassifier(
        cfg(vocab_size=V, max_len=8, attention=a), num_classes=3),
                   (tokens(0),), {"padding_mask": VALID}),
    "seq2seq": (lambda a: Seq2SeqTransformer(
        cfg(vocab_size=V, max_len=8, attention=a)),
                (tokens(0), tokens(1)), {"padding_mask": VALID}),
    "vit": (lambda a: ViT(cfg(attention=a), num_classes=3, patch_size=2),
            (IMAGES,), {}),
    "rnn": (lambda a: RNNSeq2Seq(RNNConfig(vocab_size=V, emb_dim=8,
                                           hidden_dim=D, style="luong",
                                           attention=a)),
            (tokens(0), tokens(1)), {"padding_mask": VALID}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_in_every_model(variant):
  """Traces (``eval_shape``) each model with the variant: parameters, masks,
  causal/cross checks and output shapes, without compiling. The kernels'
  numerics are tested with the kernels; models' numerics with softmax."""
  entry = registry.get_entry(variant)
  for name, (make, args, kwargs) in MODELS.items():
    must_fail = (name in ("lm", "seq2seq") and not entry.causal) or (
        name in ("seq2seq", "rnn") and not entry.cross)
    try:
      out, variables = jax.eval_shape(make(variant).init_with_output, KEY,
                                      *args, **kwargs)
    except ValueError as e:
      assert str(e), f"{variant} in {name}: empty ValueError"
      continue
    assert not must_fail, f"{variant} in {name} should raise ValueError"
    expected = {"lm": (B, T, V), "classifier": (B, 3), "seq2seq": (B, T, V),
                "vit": (B, 3), "rnn": (B, T, V)}[name]
    assert out.shape == expected and out.dtype == jnp.float32, (name, out)
    assert "params" in variables


# --------------------------------------------------------------------------
# Initialisation: a jitted init gives exactly the eager numbers.


def test_initialisers_match_flax_defaults_eagerly_and_under_jit():
  from flax.linen.linear import default_embed_init  # pylint: disable=g-import-not-at-top
  from attn.modules.embeddings import normal_init, token_embedding_init  # pylint: disable=g-import-not-at-top
  key = jax.random.key(3)
  for shape in [(13, 32), (39, 48)]:
    eager = token_embedding_init(key, shape)
    np.testing.assert_array_equal(eager, default_embed_init(key, shape))
    np.testing.assert_array_equal(
        jax.jit(token_embedding_init, static_argnums=1)(key, shape), eager)
    init = normal_init(0.02)
    eager = init(key, shape)
    np.testing.assert_array_equal(eager,
                                  jax.nn.initializers.normal(0.02)(key, shape))
    np.testing.assert_array_equal(jax.jit(init, static_argnums=1)(key, shape),
                                  eager)


# emb_dim 24: 1/sqrt(24) is inexact, so a fused product would round
# differently (with 16 the scale 1/4 is exact and nothing could differ).
@pytest.mark.parametrize("make", [
    lambda: (tiny_lm(emb_dim=24), (tokens(1),)),
    lambda: (Seq2SeqTransformer(cfg(vocab_size=V, max_len=12, emb_dim=24)),
             (tokens(2), tokens(3))),
    lambda: (ViT(cfg(positional="learned"), num_classes=3, patch_size=2),
             (IMAGES,)),
], ids=["lm", "seq2seq", "vit"])
def test_jitted_init_is_bit_identical_to_eager(make):
  model, args = make()
  eager = model.init(KEY, *args)
  jitted = jax.jit(model.init)(KEY, *args)
  jax.tree.map(np.testing.assert_array_equal, jitted, eager)
