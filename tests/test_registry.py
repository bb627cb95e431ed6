"""Tests for ``attn.registry``: spec strings, lookup, errors, Flax wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import registry


@pytest.fixture
def temp_registry():
  """Registers test-only kernels and removes them afterwards."""
  added = []

  def register(name, fn, aliases=(), **kwargs):
    registry.register_attention(name, aliases=aliases, **kwargs)(fn)
    added.append((name, aliases))
    return fn

  yield register
  for name, aliases in added:
    registry._REGISTRY.pop(name, None)  # pylint: disable=protected-access
    for alias in aliases:
      registry._ALIASES.pop(alias, None)  # pylint: disable=protected-access


def _qkv(T=4, S=4):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((2, T, 2, 4)), jnp.float32),
          jnp.asarray(rng.standard_normal((2, S, 2, 4)), jnp.float32),
          jnp.asarray(rng.standard_normal((2, S, 2, 4)), jnp.float32))


@pytest.mark.parametrize("spec, want", [
    ("softmax", ("softmax", {})),
    (" chunked(block_q=256, block_k=512) ",
     ("chunked", {"block_q": 256, "block_k": 512})),
    ("x(a='s', b=(1, 2), c=True, d=-1.5, e=None)",
     ("x", {"a": "s", "b": (1, 2), "c": True, "d": -1.5, "e": None})),
    ("x()", ("x", {})),
])
def test_parse_spec(spec, want):
  assert registry.parse_spec(spec) == want


@pytest.mark.parametrize("spec, match", [
    ("", "non-empty string"), (3, "non-empty string"),
    ("x(", "cannot parse"), ("x(1)", "keyword options only"),
    ("a.b", "keyword options only"), ("x(**o)", r"'\*\*' is not allowed"),
    ("x(a=foo)", "option a must be a literal.*foo"),
    ("softmax(block_q=1, block_q=2)", "option block_q is given more than once"),
    ("x(a={[1]: 2})", r"option a must be a literal.*\{\[1\]: 2\}"),
    ("x(a={1, [2]})", "option a must be a literal"),
])
def test_parse_spec_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    registry.parse_spec(spec)


def test_list_attention_names_exact_kernels():
  names = attn.list_attention()
  assert names == sorted(names)
  assert {"softmax", "xla", "chunked", "cudnn"} <= set(names)
  assert "exact" not in names and "flash" not in names     # aliases
  for name in ("softmax", "xla", "chunked", "cudnn"):
    assert registry.get_entry(name).exact


def test_get_attention_by_name_alias_and_options_match_entry_point():
  q, k, v = _qkv()
  want = attn.dot_product_attention(q, k, v, is_causal=True)
  for spec in ("softmax", "exact", "xla", "softmax(implementation='xla')",
               "softmax(implementation=('cudnn', 'xla'))"):
    got = attn.get_attention(spec)(q, k, v, is_causal=True)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=spec)


def test_get_attention_returns_callables_unchanged():
  fn = jax.nn.dot_product_attention
  assert attn.get_attention(fn) is fn


def test_unknown_name_lists_registered_names_and_aliases():
  with pytest.raises(ValueError) as e:
    attn.get_attention("softmaxx(block_q=2)")
  msg = str(e.value)
  assert "unknown attention 'softmaxx'" in msg
  for name in ("chunked", "softmax", "xla", "exact", "flash"):
    assert name in msg


def test_unknown_option_lists_the_kernels_options():
  with pytest.raises(ValueError, match=r"'softmax' has no option\(s\) "
                     r"\['num_features'\]; its options are: \['implementation'"
                     r", 'block_q', 'block_k', 'scale'\]"):
    attn.get_attention("softmax(num_features=3)")
  with pytest.raises(ValueError, match=r"options are: \['scale'\]"):
    attn.get_attention("xla(block_q=3)")
  # Runtime keyword arguments are per call, never spec options.
  with pytest.raises(ValueError, match=r"no option\(s\) \['is_causal'\]"):
    attn.get_attention("softmax(is_causal=True)")


def test_register_options_and_param_shapes(temp_registry):
  calls = []

  def echo(query, key, value, bias=None, mask=None, *, width=1, params=None,
           is_causal=False):
    calls.append((width, is_causal, params))
    return jnp.zeros(query.shape[:-1] + value.shape[-1:], query.dtype) + width

  def shapes(query_shape, key_shape, width=1):
    return {"proj": ((key_shape[1], width), jax.nn.initializers.zeros)}

  temp_registry("_test_echo", echo, aliases=("_test_echo_alias",),
                metadata={"param_shapes": shapes})
  assert registry.get_entry("_test_echo").options == ("width",)
  assert "_test_echo" in attn.list_attention()
  q, k, v = _qkv(S=6)
  fn = attn.get_attention("_test_echo_alias(width=3)")
  out = fn(q, k, v, is_causal=True, params={"p": 1})
  np.testing.assert_array_equal(out, 3.0)
  assert calls == [(3, True, {"p": 1})]
  got = registry.attention_param_shapes("_test_echo(width=5)", q.shape,
                                        k.shape)
  assert list(got) == ["proj"] and got["proj"][0] == (6, 5)
  assert registry.attention_param_shapes("softmax", q.shape, k.shape) == {}
  assert registry.attention_param_shapes(echo, q.shape, k.shape) == {}


def test_duplicate_names_and_aliases_are_rejected(temp_registry):
  fn = lambda query, key, value, bias=None, mask=None: query  # noqa: E731
  with pytest.raises(ValueError, match=r"\['softmax'\] already registered"):
    registry.register_attention("softmax")(fn)
  with pytest.raises(ValueError, match=r"\['flash'\] already registered"):
    registry.register_attention("_test_new", aliases=("flash",))(fn)
  assert "_test_new" not in attn.list_attention()


class TestFlaxCompatibleWrapper:
  """``get_attention`` wraps kernels so Flax's keyword arguments work."""

  def test_dropout_follows_deterministic_flag(self):
    q, k, v = _qkv()
    fn = attn.get_attention("softmax")
    rng = jax.random.PRNGKey(0)
    plain = attn.dot_product_attention(q, k, v)
    det = fn(q, k, v, dropout_rate=0.5, dropout_rng=rng, deterministic=True)
    np.testing.assert_array_equal(det, plain)
    dropped = fn(q, k, v, dropout_rate=0.5, dropout_rng=rng,
                 broadcast_dropout=False)
    want = attn.dot_product_attention(q, k, v, dropout_rate=0.5,
                                      dropout_rng=rng)
    np.testing.assert_array_equal(dropped, want)
    assert np.any(dropped != plain)
    with pytest.raises(ValueError, match="dropout_rng"):
      fn(q, k, v, dropout_rate=0.5)

  def test_kernel_without_dropout_or_weights(self, temp_registry):
    seen = {}

    def plain(query, key, value, bias=None, mask=None, *, deterministic=True):
      seen["deterministic"] = deterministic
      return value

    temp_registry("_test_plain", plain)
    with pytest.raises(ValueError, match="options are: none"):
      attn.get_attention("_test_plain(deterministic=False)")
    fn = attn.get_attention("_test_plain")
    q, k, v = _qkv()
    fn(q, k, v, dropout_rate=0.1, deterministic=True, is_causal=False,
       dtype=jnp.float32, precision=None)         # no-ops are dropped
    assert seen["deterministic"] is True
    with pytest.raises(ValueError, match="'_test_plain' does not support "
                       "dropout"):
      fn(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0),
         deterministic=False)
    with pytest.raises(ValueError, match="does not accept is_causal"):
      fn(q, k, v, is_causal=True)

    class Recorder:
      def __init__(self):
        self.sown = []

      def sow(self, *args):
        self.sown.append(args)

    module = Recorder()
    np.testing.assert_array_equal(fn(q, k, v, module=module), v)
    assert not module.sown          # no return_weights argument: nothing sown
    out = attn.get_attention("xla")(q, k, v, module=module)
    assert [a[:2] for a in module.sown] == [
        ("intermediates", "attention_weights")]
    np.testing.assert_allclose(
        module.sown[0][2], attn.dot_product_attention(
            q, k, v, return_weights=True)[1], rtol=1e-6)
    np.testing.assert_allclose(out, attn.dot_product_attention(q, k, v),
                               rtol=1e-6)


def _attn_import_graph():
  """``{module: {imported attn modules}}`` over every module of ``attn/``.

  Counts ``import attn...`` and ``from attn... import ...`` statements at any
  depth (top level and inside functions); ``from attn.x import y`` is an edge
  to ``attn.x.y`` when that is a module, else to ``attn.x``.
  """
  import ast  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(attn.__file__).parent
  files = {}
  for path in root.rglob("*.py"):
    parts = path.relative_to(root.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    files[name] = path
  graph = {}
  for name, path in files.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        edges.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        for a in node.names:
          sub = f"{node.module}.{a.name}"
          edges.add(sub if sub in files else node.module)
    graph[name] = {e for e in edges if e in files and e != name}
  return graph


def test_no_import_cycles_inside_attn():
  graph = _attn_import_graph()
  assert "attn.registry" in graph and "attn.kernels.exact" in graph
  # The arrow between the registry and the kernels runs one way.
  assert not any(m.startswith("attn.kernels") for m in graph["attn.registry"])
  assert "attn.registry" in graph["attn.kernels.exact"]
  assert "attn.kernels" in graph["attn"]
  state = {}   # module -> "open" while on the DFS stack, "done" after

  def visit(module, stack):
    state[module] = "open"
    for dep in sorted(graph[module]):
      if state.get(dep) == "open":
        cycle = stack[stack.index(dep):] + [dep]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep, stack + [dep])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


def test_builtins_registered_on_import_attn():
  names = attn.list_attention()
  for name in ("softmax", "xla", "chunked", "cudnn", "ring"):
    assert name in names


# Option validation. Values a user could plausibly type that each option must
# refuse: wrong type, zero / negative where not allowed, bools for numbers.
# Every option of every registered variant needs a row here, so a new option
# cannot arrive without its validation being tested.
_INT1 = [1.5, "a", 0, -1, True, None, (1,)]       # int >= 1
_INT1_OR_NONE = [1.5, "a", 0, -1, True, (1,)]
_INT0 = [1.5, "a", -1, True, None]               # int >= 0
_POS_FLOAT = ["a", 0, -1.0, True, None, 1e999]    # finite number > 0
_SCALE = ["a", True, 1e999, (1.0,)]               # finite number or None
BAD_OPTION_VALUES = {
    "scale": _SCALE, "block_q": _INT1_OR_NONE, "block_k": _INT1_OR_NONE,
    "chunk_size": _INT1, "seed": _INT0, "logits_soft_cap": _POS_FLOAT[:-2]
    + [1e999], "precision": ["fast-ish", 1.5, 0, True],
    "implementation": [1.5, 0, True, ()], "return_residual": [1, "yes", None],
    "bigbird.block_size": _INT1, "bigbird.num_window_blocks": _INT1,
    "bigbird.num_global_blocks": _INT0, "bigbird.num_random_blocks": _INT0,
    "hard.estimator": ["argmax", 1, None, True],
    "hard.temperature": _POS_FLOAT,
    "linformer.k": _INT1, "linformer.max_length": _INT1_OR_NONE,
    "local.window": [1.5, "a", -1, True, (1, -1), (1, 2, 3), None],
    "local.block_size": _INT1_OR_NONE,
    "local_p.window": _INT1, "local_p.hidden": _INT1,
    "longformer.window": [1.5, "a", -1, True, (1, -1), None],
    "longformer.global_tokens": [1.5, "a", -1, True, None, (0, 1.5)],
    "longformer.block_size": _INT1_OR_NONE,
    "nystrom.num_landmarks": _INT1, "nystrom.pinv_iterations": _INT0,
    "performer.num_features": _INT1,
    "reformer.n_hashes": _INT1, "reformer.n_buckets": [3, 0, -2, 1.5, "a",
                                                       True],
    "reformer.shared_qk": [1, 0, "yes", None],
    "ring.mesh": ["seq", 1], "ring.seq_axis": [None, 1, True],
    "ring.data_axis": [1, True, 1.5], "ring.model_axis": [1, True, 1.5],
    "sinkhorn.block_size": _INT1, "sinkhorn.partners": _INT1,
    "sinkhorn.n_iters": _INT0, "sinkhorn.temperature": _POS_FLOAT,
    "sinkhorn.hidden": _INT1,
    "sparse.pattern": ["diagonal", 1, None], "sparse.stride": _INT1,
    "sparse.num_summary": _INT1,
    "synthesizer.kind": ["mlp", 1, None], "synthesizer.hidden": _INT1,
    "synthesizer.trainable": [1, "no", None],
    "topk.k": _INT1,
}
# Accepted values other than the defaults (the rules must not be too strict).
GOOD_OPTION_VALUES = {
    "scale": [0.5, 2, -1.0, 0], "local.window": [0, (2, 3), [0, 5]],
    "longformer.global_tokens": [0, 3, (0, 5), [-1]],
    "reformer.n_buckets": [None, 2, 8], "implementation": ["xla",
                                                           ("xla", "chunked")],
    "precision": ["highest", ("high", "default")], "block_q": [1, 128],
    "logits_soft_cap": [None, 30, 0.5], "hard.temperature": [0.1, 3],
    "sinkhorn.n_iters": [0, 3], "bigbird.num_global_blocks": [0],
}


def _table(table, name, option):
  return table.get(f"{name}.{option}", table.get(option))


def _all_options():
  return [(n, o) for n in attn.list_attention()
          for o in registry.get_entry(n).options]


def test_every_option_has_a_rule_and_a_row_of_bad_values():
  missing_rule = [f"{n}.{o}" for n, o in _all_options()
                  if registry.get_entry(n).option_rule(o) is None]
  missing_row = [f"{n}.{o}" for n, o in _all_options()
                 if _table(BAD_OPTION_VALUES, n, o) is None]
  assert not missing_rule, f"options without option_rules: {missing_rule}"
  assert not missing_row, f"add bad values to BAD_OPTION_VALUES: {missing_row}"


@pytest.mark.parametrize("name, option", _all_options())
def test_bad_option_values_raise_one_clear_value_error(name, option):
  entry = registry.get_entry(name)
  default = entry.fn.__kwdefaults__[option]
  for good in [default] + (_table(GOOD_OPTION_VALUES, name, option) or []):
    registry.check_options(name, **{option: good})       # no error
  for bad in _table(BAD_OPTION_VALUES, name, option):
    pattern = rf"attention '{name}'.*option {option}=.*allowed: "
    with pytest.raises(ValueError, match=pattern):
      registry.check_options(name, **{option: bad})
    spec = f"{name}({option}={bad!r})"
    if bad is None or bad == float("inf"):
      spec = f"{name}({option}={'None' if bad is None else '1e999'})"
    with pytest.raises(ValueError, match=rf"option {option}="):
      registry.get_attention(spec)


@pytest.mark.parametrize("spec, match", [
    ("performer(num_features=1.5)", r"num_features=1.5 .*an int >= 1"),
    ("performer(num_features='a')", r"num_features='a' .*an int >= 1"),
    ("linformer(k=0)", r"'linformer': option k=0 .*an int >= 1"),
    ("sinkhorn(block_size=0)", r"'sinkhorn': option block_size=0"),
    ("chunked(block_q=0)", r"'chunked': option block_q=0"),
    ("softmax(block_q='a')", r"'softmax': option block_q='a'"),
    ("flash(scale='a')", r"'chunked': option scale='a'.*finite number"),
])
def test_issue_examples_are_clear_value_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    registry.get_attention(spec)
  with pytest.raises(ValueError, match=match):
    registry.attention_param_shapes(spec, (1, 4, 2, 4), (1, 4, 2, 4))


def test_decode_flag_defaults_to_exact_and_ring_has_none(temp_registry):
  for name in attn.list_attention():
    entry = registry.get_entry(name)
    assert entry.decode == (entry.exact and name != "ring"), name
  assert registry.get_entry("ring").exact
  temp_registry("_exact_no_decode", lambda q, k, v, bias=None, mask=None: v,
                exact=True, decode=False)
  temp_registry("_approx_decode", lambda q, k, v, bias=None, mask=None: v,
                decode=True)
  assert not registry.get_entry("_exact_no_decode").decode
  assert registry.get_entry("_approx_decode").decode


def test_decode_module_refuses_ring():
  from attn.modules import attention as attention_module
  cfg = dict(num_heads=2, qkv_features=8, decode=True, causal=True)
  x = jnp.ones((1, 4, 8))
  ok = attention_module.MultiHeadAttention(attention="softmax", **cfg)
  ok.init(jax.random.key(0), x)                          # builds
  with pytest.raises(ValueError, match="ring"):
    attention_module.MultiHeadAttention(attention="ring", **cfg).init(
        jax.random.key(0), x)


@pytest.mark.parametrize("spec, match", [
    ("performer(num_features=-1)", r"option num_features=-1 is invalid"),
    ("softmax(block_q=1, block_q=2)", "given more than once"),
])
def test_config_validation_rejects_bad_option_values_early(spec, match):
  from configs import copy as copy_config
  from experiments import config_validation
  config = copy_config.get_config()
  config.model.attention = spec
  with pytest.raises(config_validation.ConfigError,
                     match=rf"config.model.attention=.*{match}"):
    config_validation.validate(config)
