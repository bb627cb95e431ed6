"""What the benchmark measures: the baselines and the registry's variants.

A :class:`Variant` is one attention function with the call the harness
makes, ``fn(q[B,T,N,H], k[B,S,K,H], v[B,S,K,Dv], *, is_causal, rng, params)
-> [B, T, N, Dv]``. The baselines are ``jax_nn``
(``jax.nn.dot_product_attention``, its default XLA path), ``jax_nn_cudnn``
(its cuDNN path, GPU only), ``flax_linen``
(``flax.linen.dot_product_attention``), the kernels users would pick
instead (:mod:`experiments.bench.peers`: PyTorch's SDPA, tokamax) and
``block_matmuls``, the chunked kernel's matmuls alone
(:mod:`experiments.bench.floor`, a timing floor, not attention); every
registry spec string
(``performer(num_features=128)``) is a variant too.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import registry
from experiments.bench import floor, peers


@dataclasses.dataclass(frozen=True)
class Variant:
  """One benchmarked attention function.

  Attributes:
    name: label in the outputs (the spec string or baseline name).
    fn: ``fn(q[B,T,N,H], k[B,S,K,H], v[B,S,K,Dv], *, is_causal, rng, params)
      -> [B, T, N, Dv]``.
    exact: computes softmax attention exactly (FLOP/s uses the analytic
      count and the error should be float round-off).
    supports_causal: False makes causal cells "unsupported" without running.
    param_shapes: ``None`` or ``f(query_shape, key_shape) -> {name: (shape,
      initializer)}`` for variants whose parameters a module would own.
    missing: ``None`` or ``f() -> reason or None``: a reason (an optional
      package is not installed, with the command that installs it) makes
      the variant's cells ``not installed: <reason>`` without running.
    host: ``None`` for a JAX function (``fn`` is jitted). Otherwise a
      function outside JAX (another framework's kernel):
      ``host(inputs, mode=, causal=) -> (call, to_numpy)`` where ``call()``
      runs one step to completion (the timed call; ``fn`` is unused) and
      ``to_numpy(result)`` gives the output, or ``(dq, dk, dv)``, in our
      ``[B, T, N, H]`` layout for the error check.
    floor: a timing floor, not attention (``block_matmuls``): FLOP/s uses
      exact attention's analytic count and the cell has no error check.
  """
  name: str
  fn: Optional[Callable[..., Any]]
  exact: bool
  supports_causal: bool = True
  param_shapes: Optional[Callable[..., Dict[str, Any]]] = None
  missing: Optional[Callable[[], Optional[str]]] = None
  host: Optional[Callable[..., Any]] = None
  floor: bool = False


def _on_gpu() -> bool:
  return jax.devices()[0].platform == "gpu"


def _jax_nn(q, k, v, *, is_causal, rng, params):
  del rng, params
  return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)


def _jax_nn_cudnn(q, k, v, *, is_causal, rng, params):
  del rng, params
  if not _on_gpu():
    raise ValueError("jax.nn's cuDNN attention needs an NVIDIA GPU; the "
                     f"device here is {jax.devices()[0].platform!r}")
  return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                      implementation="cudnn")


def _flax_linen(q, k, v, *, is_causal, rng, params):
  del rng, params
  if k.shape[2] != q.shape[2]:
    raise ValueError("flax.linen.dot_product_attention needs as many key/"
                     f"value heads as query heads, got {k.shape[2]} and "
                     f"{q.shape[2]}")
  mask = None
  if is_causal:
    mask = nn.make_causal_mask(jnp.ones(q.shape[:2]))[:, :, :, :k.shape[1]]
  return nn.dot_product_attention(q, k, v, mask=mask, deterministic=True)


def _block_matmuls(q, k, v, *, is_causal, rng, params):
  del rng, params
  return floor.block_matmuls(q, k, v, is_causal=is_causal)


BASELINES = {
    "jax_nn": Variant("jax_nn", _jax_nn, exact=True),
    "jax_nn_cudnn": Variant("jax_nn_cudnn", _jax_nn_cudnn, exact=True),
    "flax_linen": Variant("flax_linen", _flax_linen, exact=True),
    "torch_sdpa": Variant("torch_sdpa", None, exact=True,
                          missing=peers.torch_missing, host=peers.torch_sdpa),
    "tokamax": Variant("tokamax", peers.tokamax_attention(None), exact=True,
                       missing=peers.tokamax_missing),
    "tokamax_xla_chunked": Variant(
        "tokamax_xla_chunked", peers.tokamax_attention("xla_chunked"),
        exact=True, missing=peers.tokamax_missing),
    "block_matmuls": Variant("block_matmuls", _block_matmuls, exact=False,
                             floor=True),
}


def split_specs(text: str) -> List[str]:
  """Splits ``"a,b(x=1, y=2),c"`` at top-level commas; strips blanks."""
  specs, depth, current = [], 0, []
  for ch in text:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      specs.append("".join(current).strip())
      current = []
    else:
      current.append(ch)
  specs.append("".join(current).strip())
  return [s for s in specs if s]


def registry_variant(spec: str) -> Variant:
  """A :class:`Variant` for a registry spec string such as ``performer(...)``.

  Kernels that name an ``rng`` argument get a fixed key; parameterised
  kernels get parameters made from their registered initialisers.
  """
  name, _ = registry.parse_spec(spec)
  entry = registry.get_entry(name)
  kernel = registry.get_attention(spec)
  takes_rng = "rng" in inspect.signature(entry.fn).parameters

  def fn(q, k, v, *, is_causal, rng, params):
    kwargs = {"is_causal": is_causal}
    if takes_rng:
      kwargs["rng"] = rng
    if params:
      kwargs["params"] = params
    return kernel(q, k, v, **kwargs)

  return Variant(
      name=spec, fn=fn, exact=entry.exact, supports_causal=entry.causal,
      param_shapes=functools.partial(registry.attention_param_shapes, spec))


def resolve_variants(variants: str, baselines: str) -> List[Variant]:
  """Baselines first, then the requested variants, without duplicates.

  ``variants`` is a comma-separated list of registry specs and baseline
  names, or ``all``. Raises ``ValueError`` naming what exists for unknown
  names.
  """
  specs = split_specs(baselines)
  for spec in split_specs(variants):
    if spec == "all":
      specs += list(BASELINES) + registry.list_attention()
    else:
      specs.append(spec)
  out, seen = [], set()
  for spec in specs:
    if spec in seen:
      continue
    seen.add(spec)
    if spec in BASELINES:
      out.append(BASELINES[spec])
      continue
    try:
      out.append(registry_variant(spec))
    except ValueError as e:
      raise ValueError(f"{e}; baselines: {', '.join(BASELINES)}; or 'all'"
                       ) from None
  return out

