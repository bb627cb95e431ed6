"""Shared helpers of the efficient-variant tests (tests/test_<variant>.py).

Inputs of the standard test shape, and jitted calls of a registered kernel
by spec string that compile once per (spec, shapes, static options) so the
many small tests reuse compilations. Float64 references are in
:mod:`tests.reference`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attn.registry import attention_param_shapes, get_attention

B, T, N, K, H, DV = 2, 16, 4, 2, 8, 6
KV_LENGTHS, Q_LENGTHS = jnp.array([11, 16]), jnp.array([5, 16])


def spec_id(spec: str) -> str:
  """pytest id of a spec string: the variant name."""
  return spec.split("(")[0]


def make_inputs(b=B, t=T, s=T, n=N, k=K, h=H, dv=DV, dtype=jnp.float32,
                seed=0, scale=1.0):
  """Seeded normal ``q [b, t, n, h]``, ``k [b, s, k, h]``, ``v [b, s, k, dv]``
  (``q`` and ``k`` multiplied by ``scale``)."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, n, h)) * scale
  key = rng.normal(size=(b, s, k, h)) * scale
  v = rng.normal(size=(b, s, k, dv))
  return tuple(jnp.asarray(x, dtype) for x in (q, key, v))


def lengths_mask(lengths, s):
  """Key-padding mask ``[B, 1, 1, s]`` from valid lengths."""
  return (np.arange(s)[None, :] < np.asarray(lengths)[:, None])[:, None, None]


# ------------------------------------------- run: params from initializers


@functools.lru_cache(maxsize=None)
def init_params_for_shapes(spec, q_shape, k_shape):
  """Parameters of the registered shapes, drawn with their initializers."""
  shapes = attention_param_shapes(spec, q_shape, k_shape)
  if not shapes:
    return None
  keys = jax.random.split(jax.random.PRNGKey(42), len(shapes))
  return {name: init(key, shape)
          for key, (name, (shape, init)) in zip(keys, sorted(shapes.items()))}


def _is_array_tree(x):
  leaves = jax.tree_util.tree_leaves(x)
  return bool(leaves) and all(isinstance(l, (jax.Array, np.ndarray))
                              for l in leaves)


@functools.lru_cache(maxsize=None)
def _compiled(spec, static_items):
  """``jax.jit`` of the registered kernel with static keyword arguments."""
  fn = get_attention(spec)
  return jax.jit(lambda q, k, v, arrays: fn(q, k, v, **arrays,
                                             **dict(static_items)))


def run(spec, q, k, v, bias=None, **kwargs):
  """Calls the registered kernel of ``spec`` under jit (compiled once per
  spec, shapes and static options), with its registered params if any."""
  if "params" not in kwargs:
    shape4 = lambda x: x.shape if x.ndim == 4 else (1,) + x.shape
    params = init_params_for_shapes(spec, shape4(q), shape4(k))
    if params is not None:
      kwargs["params"] = params
  if bias is not None:
    kwargs["bias"] = bias
  arrays = {n: x for n, x in kwargs.items() if _is_array_tree(x)}
  static = tuple(sorted((n, x) for n, x in kwargs.items() if n not in arrays))
  return _compiled(spec, static)(q, k, v, arrays)


# ------------------------------- call / call_and_grads: NumPy-drawn params


def random_params(spec, q, k):
  """Random parameters of the registered shapes for inputs ``q``, ``k``."""
  return _random_params_for_shapes(spec, q.shape, k.shape)


@functools.lru_cache(maxsize=None)
def _random_params_for_shapes(spec, q_shape, k_shape):
  """Random parameters of the registered shapes (NumPy: no compilations)."""
  shapes = attention_param_shapes(spec, q_shape, k_shape)
  if not shapes:
    return None
  rng = np.random.default_rng(42)
  return {name: jnp.asarray(rng.normal(size=shape) * (
      shape[-2] ** -0.5 if len(shape) > 1 else 0.3), jnp.float32)
          for name, (shape, _) in sorted(shapes.items())}


def _split_kwargs(kwargs):
  """Python scalars/None are static (part of the cache key); arrays are not."""
  def is_static(x):
    return x is None or isinstance(x, (bool, int, float))
  static = tuple(sorted((n, x) for n, x in kwargs.items() if is_static(x)))
  arrays = {n: x for n, x in kwargs.items() if not is_static(x)}
  return static, arrays


@functools.lru_cache(maxsize=None)
def _jitted(spec, static, with_grads):
  """One compiled function per configuration: tests reuse compilations."""
  fn = get_attention(spec)

  def forward(q, k, v, arrays):
    return fn(q, k, v, **arrays, **dict(static))

  if not with_grads:
    return jax.jit(forward)

  def loss(q, k, v, arrays):
    out = forward(q, k, v, arrays)
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _with_params(spec, q, k, params, kwargs):
  params = random_params(spec, q, k) if params is None else params
  return dict(kwargs, params=params) if params is not None else kwargs


def call(spec, q, k, v, params=None, **kwargs):
  """The registered kernel of ``spec`` under jit, with random params."""
  static, arrays = _split_kwargs(_with_params(spec, q, k, params, kwargs))
  return _jitted(spec, static, False)(q, k, v, arrays)


def call_and_grads(spec, q, k, v, params=None, **kwargs):
  """``(out, (dq, dk, dv))`` of ``sum(out ** 2)``."""
  static, arrays = _split_kwargs(_with_params(spec, q, k, params, kwargs))
  (_, out), grads = _jitted(spec, static, True)(q, k, v, arrays)
  return out, grads
