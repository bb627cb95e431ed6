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
import math
import numbers
from typing import Any, Callable, Dict, Optional, Tuple

_CORE_ARGS = ("query", "key", "value", "bias", "mask")
# Keyword arguments supplied per call (by modules or Flax), never options.
RUNTIME_KWARGS = frozenset({
    "is_causal", "query_seq_lengths", "key_value_seq_lengths",
    "segment_ids", "dropout_rate", "dropout_rng", "broadcast_dropout",
    "return_weights", "deterministic", "rng", "params", "local_window_size",
})


@dataclasses.dataclass(frozen=True)
class OptionRule:
  """What values a kernel option accepts.

  Attributes:
    allowed: human description, used in the error (``"an int >= 1"``).
    ok: ``value -> bool``.
  """
  allowed: str
  ok: Callable[[Any], bool]


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return (isinstance(x, numbers.Real) and not isinstance(x, bool)
          and math.isfinite(x))


def int_option(minimum: int = 0, *, none: bool = False) -> OptionRule:
  """An int (not a bool) ``>= minimum``; ``None`` too when ``none``."""
  return OptionRule(
      f"an int >= {minimum}" + (" or None" if none else ""),
      lambda x: (none and x is None) or (_is_int(x) and x >= minimum))


def float_option(*, positive: bool = False, minimum: Optional[float] = None,
                 none: bool = False) -> OptionRule:
  """A finite real number (``> 0`` when ``positive``, ``>= minimum``)."""
  text = ("a finite number" + (" > 0" if positive else "")
          + (f" >= {minimum}" if minimum is not None else "")
          + (" or None" if none else ""))
  return OptionRule(text, lambda x: (none and x is None) or (
      _is_real(x) and (not positive or x > 0)
      and (minimum is None or x >= minimum)))


def bool_option() -> OptionRule:
  """``True`` or ``False``."""
  return OptionRule("True or False", lambda x: isinstance(x, bool))


def choice_option(*choices, none: bool = False) -> OptionRule:
  """One of ``choices`` (compared with ``==``, type included)."""
  allowed = tuple(choices) + ((None,) if none else ())
  return OptionRule(f"one of {allowed}", lambda x: any(
      type(x) is type(c) and x == c for c in allowed))


def _window_ok(x) -> bool:
  if isinstance(x, (tuple, list)):
    return len(x) == 2 and all(_is_int(w) and w >= 0 for w in x)
  return _is_int(x) and x >= 0


def _is_precision(x) -> bool:
  if x is None:
    return True
  import jax  # lazy: this module imports no jax at load time
  if isinstance(x, jax.lax.Precision):
    return True
  try:
    return isinstance(x, str) and bool(jax.lax.Precision(x))
  except (ValueError, TypeError, KeyError):
    return False


WINDOW_OPTION = OptionRule(
    "an int >= 0 or a (left, right) pair of ints >= 0", _window_ok)

# Rules for option names that mean the same in every kernel; a variant's own
# ``option_rules`` take precedence.
COMMON_OPTION_RULES: Dict[str, OptionRule] = {
    "scale": float_option(none=True),
    "block_q": int_option(1, none=True),
    "block_k": int_option(1, none=True),
    "chunk_size": int_option(1),
    "seed": int_option(0),
    "logits_soft_cap": float_option(positive=True, none=True),
    "return_residual": bool_option(),
    "precision": OptionRule(
        "None, a precision name ('default', 'high', 'highest', ...), a "
        "jax.lax.Precision or a pair of them",
        lambda x: _is_precision(x) or (
            isinstance(x, (tuple, list)) and len(x) == 2
            and all(_is_precision(p) for p in x))),
    "implementation": OptionRule(
        "None, a name ('xla', 'chunked', 'cudnn') or a tuple of names",
        lambda x: x is None or isinstance(x, str) or (
            isinstance(x, (tuple, list)) and len(x) > 0
            and all(isinstance(i, str) for i in x))),
}


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
    decode: can run the one-token KV-cache decode path (default: ``exact``;
      ring attention is exact but cannot).
    option_rules: ``{option: OptionRule}``, what each option accepts (on
      top of :data:`COMMON_OPTION_RULES`); checked by :func:`check_options`.
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
  decode: Optional[bool] = None
  option_rules: Dict[str, OptionRule] = dataclasses.field(
      default_factory=dict)

  def __post_init__(self):
    if self.decode is None:
      object.__setattr__(self, "decode", self.exact)

  def option_rule(self, option: str) -> Optional[OptionRule]:
    """The rule for ``option`` (its own, else the common one, else None)."""
    return self.option_rules.get(option, COMMON_OPTION_RULES.get(option))

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
  ``description``, ``metadata``, ``decode``, ``option_rules``). Returns
  ``fn`` unchanged.

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


def check_options(variant: str, **values) -> None:
  """Raises one ``ValueError`` if an option value breaks its rule.

  Kernels call it first thing with their option values, and
  :func:`get_attention` with the options of a spec, so a bad value is
  reported as ``attention 'performer': option num_features=1.5 is invalid;
  allowed: an int >= 1`` instead of failing somewhere inside the kernel.
  Options without a rule are not checked.
  """
  entry = get_entry(variant)
  for option, value in values.items():
    rule = entry.option_rule(option)
    if rule is None:
      continue
    try:
      good = bool(rule.ok(value))
    except Exception:  # a value the rule cannot even compare
      good = False
    if not good:
      raise ValueError(f"attention {entry.name!r}: option {option}="
                       f"{value!r} is invalid; allowed: {rule.allowed}")


def parse_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
  """``"name(a=1, b='x')"`` -> ``("name", {"a": 1, "b": "x"})``.

  Raises:
    ValueError: for anything but a name or a call with keyword options
      whose values are Python literals, and for an option given twice.
  """
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
      if kw.arg in options:
        raise ValueError(f"attention spec {spec!r}: option {kw.arg} is given "
                         "more than once")
      try:
        options[kw.arg] = ast.literal_eval(kw.value)
      except (ValueError, TypeError, SyntaxError, MemoryError,
              RecursionError):  # not a literal, or e.g. {[1]: 2}
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


_FLAX_EINSUM_KWARGS = ("precision", "einsum_dot_general",
                       "qk_attn_weights_einsum", "attn_weights_value_einsum")


def _takes(kernel) -> list:
  """Keyword names ``kernel`` takes (for error messages)."""
  return [p.name for p in inspect.signature(kernel).parameters.values()
          if p.name not in _CORE_ARGS and p.kind in (p.KEYWORD_ONLY,
                                                     p.POSITIONAL_OR_KEYWORD)]


def _weights_dtype(query_dtype, force_fp32_for_softmax):
  """Flax's rule for the sown weights: float32 with
  ``force_fp32_for_softmax``, else the (promoted) input dtype."""
  import jax.numpy as jnp
  return jnp.float32 if force_fp32_for_softmax else query_dtype


def flax_compatible(kernel: Callable[..., Any], name: str = "attention"):
  """Wraps a kernel so Flax's ``attention_fn`` keyword arguments work.

  The wrapper has the signature Flax inspects (``dropout_rng``,
  ``dropout_rate``, ``broadcast_dropout``, ``deterministic``, ``module``,
  ``dtype``, ``precision``, ...) and:

  * casts ``query``/``key``/``value`` to ``dtype`` when given (else to their
    common dtype), as ``flax.linen.dot_product_attention`` does;
  * applies dropout only when ``dropout_rate > 0`` and not ``deterministic``
    (as ``flax.linen.dot_product_attention`` does), and raises ``ValueError``
    if the kernel cannot do dropout (after the kernel's own shape checks);
  * passes ``deterministic`` on only to kernels that name it;
  * turns Flax's float 0/1 masks (``nn.make_causal_mask`` & co.) into the
    boolean masks kernels take;
  * applies Flax's rules to ``precision``, ``einsum_dot_general``,
    ``qk_attn_weights_einsum``, ``attn_weights_value_einsum`` (the two
    einsums together; not with the other two) and passes them to kernels
    that take them (``softmax``/``xla`` honour all four, ``chunked``
    ``precision`` only); a kernel that does not take a given one raises
    ``ValueError`` rather than silently running plain einsums;
  * raises ``ValueError`` for other keyword arguments the kernel does not
    take (dropping them when ``None``/``False``), listing what it takes;
  * with ``module`` given (Flax's ``sow_weights=True``), calls a kernel that
    takes ``return_weights`` with ``return_weights=True`` and sows the
    ``[*B, N, T, S]`` weights as ``intermediates/attention_weights``, in
    float32 when ``force_fp32_for_softmax`` else in the input dtype (Flax's
    rule; softmax itself is always float32); kernels without that argument
    never materialise weights and sow nothing.
  """

  def attention_fn(query, key, value, bias=None, mask=None, *,
                   dropout_rng=None, dropout_rate: float = 0.0,
                   broadcast_dropout: bool = True, deterministic: bool = False,
                   module=None, dtype=None, precision=None,
                   force_fp32_for_softmax=False, einsum_dot_general=None,
                   qk_attn_weights_einsum=None,
                   attn_weights_value_einsum=None, **kwargs):
    import jax.numpy as jnp        # lazy: this module imports no JAX code
    if bool(qk_attn_weights_einsum) != bool(attn_weights_value_einsum):
      raise ValueError("qk_attn_weights_einsum and attn_weights_value_einsum "
                       "must be specified together")
    if (precision or einsum_dot_general) and qk_attn_weights_einsum:
      raise ValueError(
          "precision/einsum_dot_general and qk_attn_weights_einsum/"
          "attn_weights_value_einsum are mutually exclusive; give only one")
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    common = dtype if dtype is not None else jnp.result_type(
        query, key, value)
    query, key, value = (x.astype(common) for x in (query, key, value))
    if mask is not None and getattr(mask, "dtype", None) != bool:
      mask = jnp.asarray(mask) != 0   # Flax's make_*_mask return float 0/1
    for k, v in zip(_FLAX_EINSUM_KWARGS,
                    (precision, einsum_dot_general, qk_attn_weights_einsum,
                     attn_weights_value_einsum)):
      if v is None:
        continue
      if not _accepts(kernel, k):
        raise ValueError(
            f"attention {name!r} cannot honour {k}=...; 'xla' and "
            "'softmax' honour precision, einsum_dot_general and custom "
            "einsums ('chunked': precision only)")
      kwargs[k] = v
    if "deterministic" in inspect.signature(kernel).parameters:
      kwargs["deterministic"] = deterministic
    for k in list(kwargs):
      if not _accepts(kernel, k):
        if kwargs[k] is None or kwargs[k] is False:
          del kwargs[k]
        else:
          raise ValueError(f"attention {name!r} does not accept {k}=...; it "
                           f"takes: {', '.join(_takes(kernel)) or 'nothing'}")
    if dropout_rate > 0.0 and not deterministic:
      if not _accepts(kernel, "dropout_rate"):
        import jax                # shape errors first, then the refusal
        jax.eval_shape(lambda: kernel(query, key, value, bias, mask,
                                      **kwargs))
        raise ValueError(f"attention {name!r} does not support dropout on "
                         "attention weights; set dropout_rate=0")
      kwargs.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng)
      if _accepts(kernel, "broadcast_dropout"):
        kwargs["broadcast_dropout"] = broadcast_dropout
    if (module is None or kwargs.get("return_weights", False)
        or not _accepts(kernel, "return_weights")):
      return kernel(query, key, value, bias, mask, **kwargs)
    out, weights = kernel(query, key, value, bias, mask, return_weights=True,
                          **kwargs)
    module.sow("intermediates", "attention_weights",
               weights.astype(_weights_dtype(query.dtype,
                                             force_fp32_for_softmax)))
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
    ValueError: unknown name, unknown option, an option value its rule
      rejects (:func:`check_options`), or a malformed spec; the message
      lists what exists or what is allowed.
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
  check_options(entry.name, **options)
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
  check_options(entry.name, **options)
  fn = entry.metadata.get("param_shapes")
  if fn is None:
    return {}
  return fn(tuple(query_shape), tuple(key_shape), **options)
