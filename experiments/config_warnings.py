"""Warnings for valid configs with a setting that has no effect.

A warning does not stop the run (:mod:`experiments.config_validation`
raises for what is wrong); each one is a single line saying which setting
does nothing, why, and what to set instead.

Positional encodings (``config.model.positional``, see
:func:`attn.positional.positional_kind`) act in these places only:

* ``"absolute"`` (``sinusoidal``, ``learned``): added to the token (or
  patch) embeddings of the Transformer models (``arch`` ``transformer``,
  ``vit``).
* ``"rotary"`` (``rope``) and ``"bias"`` (``alibi``, ``t5``): inside
  :class:`attn.modules.MultiHeadAttention`, and the models give them to
  their *self*-attention layers only: every layer of ``TransformerLM``,
  ``EncoderClassifier``, ``SetEncoder`` and ``ViT``, the encoder and the
  decoder self-attention of ``Seq2SeqTransformer``; its cross-attention
  gets none (``attn.models.transformer.DecoderBlock``).

So an encoding cannot act at all when:

* ``arch`` is ``rnn``, ``glimpse`` or ``nadaraya_watson``: their builders in
  :data:`experiments.problems.ARCHS` never read ``model.positional``
  (``RNNSeq2Seq`` is built with ``positional="none"``, and ``GlimpseNet``,
  a single learned query attending the tokens, and ``AttentionPooling``
  have no positional encoding and no self-attention);
* ``rope`` meets ``synthesizer(kind='random')``: RoPE rotates queries and
  keys, and that kernel reads neither (its logits are a learned table).
  Bias encodings still act there: the table's logits get the bias.

``"none"`` never warns, nor does an unknown encoding, arch or attention
spec (config validation reports those).
"""

from __future__ import annotations

import inspect

from attn import positional as positional_lib
from attn import registry

# Archs whose model builder (experiments.problems.ARCHS) ignores
# config.model.positional, and what they do instead.
POSITIONLESS_ARCHS = {
    "rnn": "RNNSeq2Seq is built with positional='none' (its GRUs read the "
           "order)",
    "glimpse": "GlimpseNet has no positional encoding and no self-attention "
               "(one learned query per context attends the tokens)",
    "nadaraya_watson": "AttentionPooling has no positional encoding (its "
                       "weights depend on query-key distances only)",
}


def _reads_queries_and_keys(spec) -> bool:
  """False for an attention spec whose kernel reads neither queries nor keys
  (``synthesizer(kind='random')``); True otherwise, or when unsure."""
  if not isinstance(spec, str):
    return True
  try:
    name, options = registry.parse_spec(spec)
    entry = registry.get_entry(name)
  except ValueError:
    return True
  if entry.name != "synthesizer":
    return True
  default = inspect.signature(entry.fn).parameters["kind"].default
  return options.get("kind", default) != "random"


def positional_warnings(config) -> list[str]:
  """One-line warnings for a ``config.model.positional`` that has no effect.

  Args:
    config: an experiment config (``ml_collections.ConfigDict`` or a dict
      of the same shape): reads ``model.arch``, ``model.positional`` and
      ``model.attention``.

  Returns:
    A list of single-line messages, empty when the encoding acts (or is
    ``"none"``, or is not a known name).
  """
  model = config["model"]
  arch, name = model["arch"], model["positional"]
  try:
    kind = positional_lib.positional_kind(name)
  except ValueError:
    return []               # config validation reports unknown names
  if kind == "none":
    return []
  fix = "set config.model.positional='none' to silence this"
  if arch in POSITIONLESS_ARCHS:
    return [f"config.model.positional={name!r} ({kind}) has no effect with "
            f"config.model.arch={arch!r}: {POSITIONLESS_ARCHS[arch]}; {fix}"]
  attention = model.get("attention", "softmax")
  if kind == "rotary" and not _reads_queries_and_keys(attention):
    return [f"config.model.positional={name!r} has no effect with "
            f"config.model.attention={attention!r}: RoPE rotates queries and "
            f"keys, which this kernel never reads; use a bias encoding "
            f"('alibi' or 't5') or an absolute one, or {fix}"]
  return []
