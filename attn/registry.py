"""One registry: attention name or spec string -> kernel.

A spec is a name, optionally with keyword options in call syntax::

    get_attention("softmax")
    get_attention("chunked(block_q=256, block_k=512)")
    get_attention("performer(num_features=128)")

The returned callable follows the Flax ``attention_fn`` contract
``fn(query, key, value, bias=None, mask=None, **kwargs) -> [B, T, N, Dv]`` and
drops into ``flax.linen.MultiHeadDotProductAttention(attention_fn=...)`` and
``flax.nnx.MultiHeadAttention(attention_fn=...)``: Flax's keyword arguments
(``dropout_rng``, ``dropout_rate``, ``deterministic``, ``broadcast_dropout``,
``dtype``, ``precision``, ``module``) are understood, and when ``module`` is
given (``sow_weights=True``) the weights are sown to
``intermediates/attention_weights``.

Adding a variant: write ``kernel(query, key, value, bias=None, mask=None, *,
<options>, <runtime kwargs>)`` and decorate it with :func:`register_attention`.

The arrow runs one way: kernels import this module, this module imports no
kernel. The built-in kernels are registered by ``import attn`` (which
imports :mod:`attn.kernels`), so they are present whenever this module is.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, Tuple

_CORE_ARGS = ("query", "key", "value", "bias", "mask")
# Keyword arguments supplied per call (by modules or Flax), never options.
RUNTIME_KWARGS = frozenset({
    "is_causal", "query_seq_lengths", "key_value_seq_lengths",
    "segment_ids", "dropout_rate", "dropout_rng", "broadcast_dropout",
    "return_weights", "deterministic", "rng", "params", "local_window_size",
})


@dataclasses.dataclass(frozen=True)
class AttentionEntry:
  """A registered attention kernel and what it supports.

  Attributes:
    name: registry name.
    fn: the kernel.
    exact: equals softmax attention (to float tolerance).
    causal / padding / cross: supports causal masks, padding (boolean) masks,
      and key length != query length.
    complexity: time/memory in T (query) and S (key) length, for the docs.
    description: one line, what it computes or approximates.
    metadata: anything else a module needs (e.g. parameter shapes).
  """
  name: str
  fn: Callable[..., Any]
  exact: bool = False
  causal: bool = True
  padding: bool = True
  cross: bool = True
  complexity: str = "O(T·S)"
  description: str = ""
  metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def options(self) -> Tuple[str, ...]:
    """Names of the keyword options a spec string may set."""
    sig = inspect.signature(self.fn)
    return tuple(
        p.name for p in sig.parameters.values()
        if p.name not in _CORE_ARGS and p.name not in RUNTIME_KWARGS
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


_REGISTRY: Dict[str, AttentionEntry] = {}
_ALIASES: Dict[str, str] = {}


def register_attention(name: str, *, aliases: Tuple[str, ...] = (),
                       **entry_kwargs):
  """Decorator registering ``fn`` under ``name`` (and ``aliases``).

  ``entry_kwargs`` are the remaining :class:`AttentionEntry` fields
  (``exact``, ``causal``, ``padding``, ``cross``, ``complexity``,
  ``description``, ``metadata``). Returns ``fn`` unchanged.

  Raises:
    ValueError: if ``name`` or an alias is already taken.
  """
  def decorator(fn):
    taken = [n for n in (name,) + tuple(aliases)
             if n in _REGISTRY or n in _ALIASES]
    if taken:
      raise ValueError(f"attention name(s) {taken} already registered")
    _REGISTRY[name] = AttentionEntry(name=name, fn=fn, **entry_kwargs)
    for alias in aliases:
      _ALIASES[alias] = name
    return fn
  return decorator


def list_attention() -> list[str]:
  """Sorted names of every registered attention kernel (aliases excluded)."""
  return sorted(_REGISTRY)


def get_entry(name: str) -> AttentionEntry:
  """The :class:`AttentionEntry` for a name or alias."""
  name = _ALIASES.get(name, name)
  if name not in _REGISTRY:
    raise ValueError(f"unknown attention {name!r}; registered: "
                     f"{', '.join(sorted(_REGISTRY))}"
                     + (f" (aliases: {', '.join(sorted(_ALIASES))})"
                        if _ALIASES else ""))
  return _REGISTRY[name]


def parse_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
  """``"name(a=1, b='x')"`` -> ``("name", {"a": 1, "b": "x"})``."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"attention spec must be a non-empty string, got "
                     f"{spec!r}")
  try:
    tree = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse attention spec {spec!r}: {e.msg}") from None
  if isinstance(tree, ast.Name):
    return tree.id, {}
  if (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)
      and not tree.args):
    options = {}
    for kw in tree.keywords:
      if kw.arg is None:
        raise ValueError(f"attention spec {spec!r}: '**' is not allowed")
      try:
        options[kw.arg] = ast.literal_eval(kw.value)
      except ValueError:
        raise ValueError(
            f"attention spec {spec!r}: option {kw.arg} must be a literal "
            f"(number, string, bool, tuple), got {ast.unparse(kw.value)}"
        ) from None
    return tree.func.id, options
  raise ValueError(f"attention spec {spec!r} must look like 'name' or "
                   "'name(option=value, ...)' with keyword options only")


def _accepts(fn, name: str) -> bool:
  """Whether ``fn`` takes keyword ``name`` (by name or through ``**kwargs``)."""
  params = inspect.signature(fn).parameters
  return name in params or any(
      p.kind == p.VAR_KEYWORD for p in params.values())


def flax_compatible(kernel: Callable[..., Any], name: str = "attention"):
  """Wraps a kernel so Flax's ``attention_fn`` keyword arguments work.

  The wrapper has the signature Flax inspects (``dropout_rng``,
  ``dropout_rate``, ``broadcast_dropout``, ``deterministic``, ``module``,
  ``dtype``, ``precision``, ...) and:

  * applies dropout only when ``dropout_rate > 0`` and not ``deterministic``
    (as ``flax.linen.dot_product_attention`` does), and raises ``ValueError``
    if the kernel cannot do dropout;
  * passes ``deterministic`` on only to kernels that name it;
  * turns Flax's float 0/1 masks (``nn.make_causal_mask`` & co.) into the
    boolean masks kernels take;
  * ignores ``dtype``/``precision``/``force_fp32_for_softmax``/custom einsums
    (kernels compute in float32 and return the input dtype);
  * drops other keyword arguments the kernel does not take when they are
    ``None``/``False`` and raises ``ValueError`` otherwise;
  * with ``module`` given (Flax's ``sow_weights=True``), calls a kernel that
    takes ``return_weights`` with ``return_weights=True`` and sows the
    ``[B, N, T, S]`` weights as ``intermediates/attention_weights``; kernels
    without that argument never materialise weights and sow nothing.
  """

  def attention_fn(query, key, value, bias=None, mask=None, *,
                   dropout_rng=None, dropout_rate: float = 0.0,
                   broadcast_dropout: bool = True, deterministic: bool = False,
                   module=None, dtype=None, precision=None,
                   force_fp32_for_softmax=None, qk_attn_weights_einsum=None,
                   attn_weights_value_einsum=None, **kwargs):
    del dtype, precision, force_fp32_for_softmax
    del qk_attn_weights_einsum, attn_weights_value_einsum
    if mask is not None and getattr(mask, "dtype", None) != bool:
      mask = mask != 0              # Flax's make_*_mask return float 0/1
    if "deterministic" in inspect.signature(kernel).parameters:
      kwargs["deterministic"] = deterministic
    if dropout_rate > 0.0 and not deterministic:
      if not _accepts(kernel, "dropout_rate"):
        raise ValueError(f"attention {name!r} does not support dropout on "
                         "attention weights; set dropout_rate=0")
      kwargs.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng)
      if _accepts(kernel, "broadcast_dropout"):
        kwargs["broadcast_dropout"] = broadcast_dropout
    for k in list(kwargs):
      if not _accepts(kernel, k):
        if kwargs[k] is None or kwargs[k] is False:
          del kwargs[k]
        else:
          raise ValueError(f"attention {name!r} does not accept {k}=...")
    if (module is None or kwargs.get("return_weights", False)
        or not _accepts(kernel, "return_weights")):
      return kernel(query, key, value, bias, mask, **kwargs)
    out, weights = kernel(query, key, value, bias, mask, return_weights=True,
                          **kwargs)
    module.sow("intermediates", "attention_weights", weights)
    return out

  # No functools.wraps: Flax reads *this* signature to pick its kwargs.
  attention_fn.__name__ = f"attention_fn[{name}]"
  attention_fn.__doc__ = getattr(kernel, "__doc__", None)
  attention_fn.attn_name = name
  return attention_fn


def get_attention(spec) -> Callable[..., Any]:
  """Kernel for a name, spec string or callable (Flax ``attention_fn``).

  A name or spec string gives the registered kernel with its options bound,
  wrapped by :func:`flax_compatible`. A callable is returned unchanged (so
  ``flax.linen.dot_product_attention`` or any hand-written function can be
  passed wherever a spec is expected).

  Raises:
    ValueError: unknown name, unknown option, or a malformed spec; the
      message lists what exists.
  """
  if callable(spec):
    return spec
  name, options = parse_spec(spec)
  entry = get_entry(name)
  allowed = entry.options
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"attention {entry.name!r} has no option(s) {unknown}; "
                     f"its options are: {list(allowed) or 'none'}")
  kernel = functools.partial(entry.fn, **options) if options else entry.fn
  return flax_compatible(kernel, name=spec)


def attention_param_shapes(spec, query_shape, key_shape) -> Dict[str, Any]:
  """Parameters a variant needs from its owning module.

  Parameterised variants (Linformer projections, Synthesizer tables, ...)
  register ``metadata={"param_shapes": f}`` with
  ``f(query_shape, key_shape, **options) -> {name: (shape, initializer)}``
  where ``query_shape = (B, T, N, H)``, ``key_shape = (B, S, K, H)`` and
  ``initializer`` is a ``jax.nn.initializers`` function. The module creates
  these parameters and passes them to the kernel as ``params={name: array}``.
  Returns ``{}`` for variants without parameters and for callables.
  """
  if callable(spec):
    return {}
  name, options = parse_spec(spec)
  entry = get_entry(name)
  fn = entry.metadata.get("param_shapes")
  if fn is None:
    return {}
  return fn(tuple(query_shape), tuple(key_shape), **options)
