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
