"""experiments.config_warnings: positional encodings that cannot act.

The rules are checked on configs, and the facts about the models they rest
on are checked on the models themselves, so a model change that makes a
rule wrong fails here.
"""

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from attn import positional as positional_lib
from attn import registry
from attn.models import Seq2SeqTransformer, TransformerConfig
from configs import base
from experiments import config_warnings
from experiments import problems
from experiments.data import get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(arch="transformer", positional="sinusoidal", attention="softmax",
           task="reverse"):
  c = base.get_base_config()
  c.model.arch, c.model.positional, c.model.attention = (
      arch, positional, attention)
  c.task.name = task
  return c


def experiment_configs():
  names = []
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    name = os.path.splitext(os.path.basename(path))[0]
    if name in ("__init__", "base"):
      continue
    c = importlib.import_module(f"configs.{name}").get_config()
    if "model" in c and "task" in c:
      names.append((name, c))
  return names


@pytest.mark.parametrize("name,c", experiment_configs(),
                         ids=[n for n, _ in experiment_configs()])
def test_shipped_configs_do_not_warn(name, c):
  assert config_warnings.positional_warnings(c) == [], name


@pytest.mark.parametrize("arch", sorted(config_warnings.POSITIONLESS_ARCHS))
@pytest.mark.parametrize("positional",
                         [p for p in positional_lib.POSITIONAL_ENCODINGS
                          if p != "none"])
def test_archs_without_positions_warn_once(arch, positional):
  warnings = config_warnings.positional_warnings(
      config(arch=arch, positional=positional))
  assert len(warnings) == 1
  (w,) = warnings
  assert "\n" not in w
  assert f"config.model.positional={positional!r}" in w
  assert f"config.model.arch={arch!r}" in w
  assert "positional='none'" in w
  assert config_warnings.positional_warnings(
      config(arch=arch, positional="none")) == []


@pytest.mark.parametrize("arch", ["transformer", "vit"])
@pytest.mark.parametrize("positional", positional_lib.POSITIONAL_ENCODINGS)
def test_transformers_apply_every_encoding(arch, positional):
  assert config_warnings.positional_warnings(
      config(arch=arch, positional=positional)) == []


@pytest.mark.parametrize("attention,positional,warns", [
    ("synthesizer(kind='random')", "rope", True),
    ("synthesizer(kind=\"random\", trainable=False)", "rope", True),
    ("synthesizer(kind='random')", "alibi", False),   # the bias is added
    ("synthesizer(kind='random')", "t5", False),
    ("synthesizer(kind='random')", "sinusoidal", False),
    ("synthesizer", "rope", False),                   # dense: reads queries
    ("synthesizer(kind='dense')", "rope", False),
    ("softmax", "rope", False),
    ("performer(num_features=16)", "rope", False),
])
def test_rope_with_a_kernel_that_reads_no_queries_or_keys(attention,
                                                          positional, warns):
  warnings = config_warnings.positional_warnings(
      config(positional=positional, attention=attention))
  assert len(warnings) == int(warns)
  if warns:
    assert "\n" not in warnings[0] and attention in warnings[0]


def test_invalid_configs_are_left_to_validation():
  assert config_warnings.positional_warnings(
      config(positional="no_such_encoding", arch="rnn")) == []
  assert config_warnings.positional_warnings(
      config(positional="rope", attention="no_such(kernel")) == []
  assert config_warnings.positional_warnings(
      config(positional="rope", attention="no_such_kernel")) == []
  assert config_warnings.positional_warnings({"model": {
      "arch": "rnn", "positional": "rope", "attention": "softmax"}})


# --------------------------------------------------------------------------
# The facts the rules rest on


def test_rnn_glimpse_and_pooling_builders_ignore_positional():
  rnn = problems.build_model(config(arch="rnn", positional="rope"),
                             get_task("reverse").spec())
  assert rnn.config.positional == "none"
  glimpse = problems.build_model(
      config(arch="glimpse", positional="rope", task="glimpse"),
      get_task("glimpse").spec())
  assert not hasattr(glimpse.config, "positional")
  pooling = problems.build_model(
      config(arch="nadaraya_watson", positional="rope",
             task="nadaraya_watson"), get_task("nadaraya_watson").spec())
  assert not hasattr(pooling, "positional")


def test_seq2seq_cross_attention_gets_no_positional_encoding():
  """T5's learned bias table exists in every self-attention layer and in no
  cross-attention layer."""
  model = Seq2SeqTransformer(TransformerConfig(
      vocab_size=16, emb_dim=16, num_heads=2, num_layers=1, mlp_dim=16,
      positional="t5"))
  tok = jnp.ones((1, 4), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tok, tok)["params"]
  paths = ["/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  with_bias = {p.rsplit("/relative_bias", 1)[0] for p in paths
               if "/relative_bias/" in p}
  assert with_bias == {"encoder/layer_0/attention",
                       "decoder/layer_0/self_attention"}, with_bias
  assert any("cross_attention" in p for p in paths)


def test_random_synthesizer_reads_neither_queries_nor_keys():
  spec = "synthesizer(kind='random')"
  q = jax.random.normal(jax.random.key(0), (1, 8, 2, 4))
  v = jax.random.normal(jax.random.key(1), (1, 8, 2, 4))
  shapes = registry.attention_param_shapes(spec, q.shape, q.shape)
  params = {name: init(jax.random.key(2), shape)
            for name, (shape, init) in shapes.items()}
  fn = registry.get_attention(spec)
  out = fn(q, q, v, params=params)
  other = fn(-3 * q[:, ::-1], q ** 2, v, params=params)
  assert jnp.array_equal(out, other)
