"""``implementation="tokamax"``: openxla's tokamax kernel library.

``tokamax.dot_product_attention`` has ``jax.nn``'s signature (our layout,
GQA, bias, mask, causal, lengths, window, soft cap) and picks its fastest
kernel itself (Triton / Mosaic GPU / cuDNN on GPU, Mosaic on TPU, XLA
elsewhere). We validate first (:mod:`attn.kernels.canonical`), express
segment ids as a boolean mask (``[B, 1, T, S]``, materialised), and apply our
fully-masked-row rule (zeros) afterwards. Optional: ``pip install tokamax``
(or ``pip install -e '.[tokamax]'``).
"""

from __future__ import annotations

import importlib.util

import jax

from attn.kernels import canonical
from attn.kernels.canonical import AttentionInputs
from attn.kernels.pallas import zero_invalid_rows

Array = jax.Array

INSTALL_HINT = "pip install tokamax  (or pip install -e '.[tokamax]')"


def available() -> bool:
  """True when the ``tokamax`` package can be imported."""
  return importlib.util.find_spec("tokamax") is not None


def import_tokamax():
  """The ``tokamax`` module, its absl flags usable (it reads them at call
  time; unparsed flags are marked parsed so their defaults apply)."""
  import tokamax  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def unsupported(inputs: AttentionInputs, *, dropout_rate: float = 0.0,
                return_weights: bool = False) -> str | None:
  """Why ``implementation="tokamax"`` cannot serve these inputs, or None."""
  if not available():
    return f"tokamax is not installed; {INSTALL_HINT}"
  what = canonical.library_features_missing(
      dropout_rate=dropout_rate, return_weights=return_weights)
  if inputs.logits_soft_cap is not None and inputs.bias is not None:
    # tokamax caps scale·q·k + bias; attn caps scale·q·k, then adds the bias.
    what.append("logits_soft_cap together with a bias (tokamax caps the "
                "biased scores, attn caps the scores before the bias)")
  if not what:
    return None
  return ("tokamax does not support: " + ", ".join(what)
          + "; implementation='xla' does")


def tokamax_attention(inputs: AttentionInputs, *, dropout_rate: float = 0.0,
                      return_weights: bool = False, return_residual=False,
                      einsums=None, einsum_dot_general=None, **_) -> Array:
  """``[B, T, N, Dv]`` through tokamax, or ``ValueError``."""
  canonical.check_library_call(
      "tokamax", unsupported(inputs, dropout_rate=dropout_rate,
                             return_weights=return_weights),
      return_residual=return_residual, einsums=einsums,
      einsum_dot_general=einsum_dot_general)
  tokamax = import_tokamax()
  mask = inputs.mask
  if inputs.q_segment_ids is not None:
    seg = (inputs.q_segment_ids[:, None, :, None]
           == inputs.kv_segment_ids[:, None, None, :])
    mask = seg if mask is None else mask & seg
  scale = inputs.scale
  query = inputs.query
  if not isinstance(scale, (int, float)):
    query, scale = (query * scale).astype(query.dtype), 1.0
  try:
    out = tokamax.dot_product_attention(
        query, inputs.key, inputs.value, bias=inputs.bias, mask=mask,
        scale=float(scale), is_causal=inputs.is_causal,
        query_seq_lengths=inputs.q_lengths,
        key_value_seq_lengths=inputs.kv_lengths,
        local_window_size=inputs.window,
        logits_soft_cap=inputs.logits_soft_cap,
        **({} if inputs.precision is None else
           {"precision": inputs.precision}))
  except (NotImplementedError, TypeError) as e:
    raise ValueError(f"implementation='tokamax' could not run: {e}") from e
  return zero_invalid_rows(out.astype(inputs.value.dtype), inputs)
