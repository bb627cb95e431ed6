"""What attention learned, in numbers: implied weights and batch summaries.

**Implied weights.** Kernels that never form a ``[T, S]`` matrix (performer,
linear, linformer, nystrom, reformer, chunked, ring, ...) sow no
``attention_weights``. Every registered kernel is linear in the values, so
calling it once more with one-hot values — ``V[b, s, k, :] = e_s``, the
``S × S`` identity for every kv head — returns, row by row, the weights it
applies: ``out[b, t, n, :] = A[b, n, t, :]``. :func:`implied_weights` makes
every :class:`~attn.modules.MultiHeadAttention` inside a model do that extra
call (same queries, keys, masks, bias, parameters and rng) and sow the
result as ``implied_weights``, together with ``linearity_residual``: the
largest ``|out(V) − A·V| / max|out(V)|`` over the real values ``V``. A
residual above float rounding means the kernel is not linear in ``V`` for
this call, and the map is only its answer to one-hot values.

**Summaries** (:func:`summarise`), per layer × head, over a batch:
``entropy`` (nats, mean over valid query rows), ``distance`` (mean of
``Σ_s A[t, s] |t − s|``) and, where the task has a known alignment
(:data:`ALIGNMENTS`), ``aligned_mass``: the mean weight on the correct
source position(s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from attn.modules import attention as attention_module

IMPLIED = "implied_weights"
RESIDUAL = "linearity_residual"


def _implied_fn(fn):
  """``fn`` that, given a sowing ``module``, also sows its implied weights."""

  def attention_fn(query, key, value, bias=None, mask=None, *, module=None,
                   **kwargs):
    out = fn(query, key, value, bias, mask, module=module, **kwargs)
    if module is None:
      return out
    *batch, S, K, _ = value.shape
    eye = jnp.broadcast_to(jnp.eye(S, dtype=value.dtype)[:, None, :],
                           (*batch, S, K, S))
    kw = {k: v for k, v in kwargs.items() if k != "return_weights"}
    implied_BTNS = fn(query, key, eye, bias, mask, **kw).astype(jnp.float32)
    N = implied_BTNS.shape[-2]
    v_BSNH = jnp.repeat(value.astype(jnp.float32), N // K, axis=-2)
    again = jnp.einsum("...tns,...snh->...tnh", implied_BTNS, v_BSNH)
    scale = jnp.maximum(jnp.max(jnp.abs(out.astype(jnp.float32))), 1e-30)
    residual = jnp.max(jnp.abs(again - out.astype(jnp.float32))) / scale
    module.sow("intermediates", IMPLIED, jnp.moveaxis(implied_BTNS, -2, -3))
    module.sow("intermediates", RESIDUAL, residual)
    return out

  for name in ("attn_name", "__name__", "__doc__"):
    if hasattr(fn, name):
      setattr(attention_fn, name, getattr(fn, name))
  return attention_fn


@contextlib.contextmanager
def implied_weights():
  """Inside this context every ``MultiHeadAttention`` traced with a mutable
  ``'intermediates'`` collection also sows ``implied_weights``
  ``[B, N, T, S]`` and ``linearity_residual`` (see the module docstring).

  Trace (``jax.jit`` or eager ``apply``) inside the context; outputs are
  unchanged.
  """
  original = attention_module.resolve_attention

  def resolve(attention):
    resolved = original(attention)
    return dataclasses.replace(resolved, fn=_implied_fn(resolved.fn))

  attention_module.resolve_attention = resolve
  try:
    yield
  finally:
    attention_module.resolve_attention = original


@dataclasses.dataclass
class AttentionMap:
  """One attention module's weights on a batch.

  Attributes:
    path: the module path (``decoder/layer_0/cross_attention``).
    weights: ``[B, N, T, S]`` float32.
    implied: True when read from one-hot values (the kernel sowed nothing).
    residual: the linearity residual of the implied call (``nan`` if none).
  """
  path: str
  weights: np.ndarray
  implied: bool
  residual: float = float("nan")


def _walk(tree, path, found):
  for name, sub in tree.items():
    if isinstance(sub, Mapping):
      _walk(sub, f"{path}/{name}" if path else name, found)
    else:
      found.setdefault(path, {})[name] = sub


def attention_maps(intermediates) -> list[AttentionMap]:
  """Every attention module's weights: the sown ones where the kernel forms
  them, else the implied ones (needs :func:`implied_weights` at trace time).
  Modules in the order they ran."""
  found: dict[str, dict] = {}
  _walk(intermediates.get("intermediates", intermediates), "", found)
  maps = []
  for path, leaves in found.items():
    residual = float(np.max(np.asarray(leaves[RESIDUAL]))) \
        if RESIDUAL in leaves else float("nan")
    if "attention_weights" in leaves:
      for w in leaves["attention_weights"]:
        maps.append(AttentionMap(path, np.asarray(w, np.float32), False,
                                 residual))
    elif IMPLIED in leaves:
      for w in leaves[IMPLIED]:
        maps.append(AttentionMap(path, np.asarray(w, np.float32), True,
                                 residual))
  return maps


def note(maps: list[AttentionMap], tol: float = 1e-3) -> str:
  """What a reader must know about ``maps``: implied, and/or not linear."""
  parts = []
  if any(m.implied for m in maps):
    parts.append("implied weights (kernel output for one-hot values)")
  worst = max((m.residual for m in maps if np.isfinite(m.residual)),
              default=0.0)
  if worst > tol:
    parts.append(f"NOT linear in V here (residual {worst:.2g}): the map is "
                 "only the kernel's answer to one-hot values")
  return "; ".join(parts)


# --------------------------------------------------------------------------
# Summaries


def summarise(weights_BNTS, query_valid_BT=None, key_valid_BS=None,
              aligned_BTS=None) -> dict[str, np.ndarray]:
  """Per-head means over valid queries of a batch.

  Args:
    weights_BNTS: attention weights.
    query_valid_BT / key_valid_BS: which queries count / which keys exist
      (default all). Keys outside ``key_valid`` carry no weight.
    aligned_BTS: boolean, the correct source position(s) of each query;
      queries with none are left out of ``aligned_mass``.

  Returns:
    ``{"entropy": [N], "distance": [N]}`` (+ ``"aligned_mass": [N]``).
    Entropy is in nats of ``A[t]`` (renormalised, so a row the kernel does
    not normalise is judged by its shape); distance is ``Σ_s A[t,s]|t−s|``.
  """
  w = np.asarray(weights_BNTS, np.float64)
  B, _N, T, S = w.shape
  qv = np.ones((B, T), bool) if query_valid_BT is None else np.asarray(
      query_valid_BT, bool)
  if key_valid_BS is not None:
    w = w * np.asarray(key_valid_BS, bool)[:, None, None, :]
  mass = np.abs(w).sum(-1, keepdims=True)
  p = np.abs(w) / np.maximum(mass, 1e-30)
  entropy_BNT = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-30)),
                                 0.0), -1)
  dist_TS = np.abs(np.arange(T)[:, None] - np.arange(S)[None, :])
  distance_BNT = np.sum(p * dist_TS, -1)
  rows = qv & (mass[:, 0, :, 0] > 0)

  def mean(x_BNT, valid_BT):
    n = np.maximum(valid_BT.sum(), 1)
    return np.sum(x_BNT * valid_BT[:, None], axis=(0, 2)) / n

  out = {"entropy": mean(entropy_BNT, rows),
         "distance": mean(distance_BNT, rows)}
  if aligned_BTS is not None:
    a = np.asarray(aligned_BTS, bool)
    has = rows & a.any(-1)
    out["aligned_mass"] = mean(np.sum(w * a[:, None], -1), has)
  return out


def flat_metrics(summaries: dict[str, dict[str, np.ndarray]]) -> dict:
  """``{path: {stat: [N]}}`` -> ``{"path/head_n/stat": float}``."""
  return {f"{path}/head_{n}/{stat}": float(v[n])
          for path, stats in summaries.items() for stat, v in stats.items()
          for n in range(len(v))}


# Alignments: task name -> (inputs[B, S], targets[B, T]) -> bool [B, T, S],
# the source position(s) decoder query t (which predicts targets[:, t])
# should read. Padding and EOS have none.


def _copy_alignment(inputs, targets):
  _B, S = inputs.shape
  T = targets.shape[1]
  t, s = np.arange(T)[:, None], np.arange(S)[None, :]
  n = (inputs != 0).sum(-1)[:, None, None]
  return (t == s)[None] & (t[None] < n)


def _reverse_alignment(inputs, targets):
  _B, S = inputs.shape
  T = targets.shape[1]
  t, s = np.arange(T)[:, None], np.arange(S)[None, :]
  n = (inputs != 0).sum(-1)[:, None, None]
  return (s[None] == n - 1 - t[None]) & (t[None] < n)


def _same_symbol_alignment(inputs, targets):
  """Source positions holding the symbol query t outputs (sort: where the
  t-th smallest came from; dates: the digit copied, none for month digits
  written as a name)."""
  a = targets[:, :, None] == inputs[:, None, :]
  return a & (targets[:, :, None] > 2) & (inputs[:, None, :] != 0)


ALIGNMENTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "copy": _copy_alignment, "reverse": _reverse_alignment,
    "sort": _same_symbol_alignment, "dates": _same_symbol_alignment,
}


def alignment(task_name: str, inputs, targets) -> np.ndarray | None:
  """``[B, T, S]`` correct source positions, or ``None`` (no known one)."""
  fn = ALIGNMENTS.get(task_name)
  return None if fn is None else fn(np.asarray(inputs), np.asarray(targets))


def log_images(workdir: str, paths, step: int) -> int:
  """Writes every PNG of ``paths`` to ``workdir/tensorboard`` as an image
  summary (tag = file name relative to its figures folder) at ``step``, so
  ``tensorboard --logdir`` shows the pictures next to the curves. Returns
  how many were written."""
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  pngs = [p for p in paths if str(p).endswith(".png")]
  if not pngs:
    return 0
  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  try:
    for p in pngs:
      image = matplotlib.image.imread(p)[..., :3]
      tag = "figures/" + os.path.splitext(os.path.basename(p))[0]
      writer.add_image(tag, image, int(step), dataformats="HWC")
  finally:
    writer.close()
  return len(pngs)
