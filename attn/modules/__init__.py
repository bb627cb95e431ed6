"""Flax (linen) modules that own parameters and call the attention kernels.

* :class:`MultiHeadAttention` — self/cross, GQA/MQA, KV-cache decoding,
  kernel chosen by registry spec (``attention="linear"``).
* :class:`AdditiveAttention`, :class:`LuongAttention`,
  :class:`GlimpseAttention` — single-head attention with classic scores.
* :class:`AttentionPooling` — Nadaraya–Watson kernel regression.
* :class:`PositionalEmbedding`, :class:`T5RelativeBias` — learned parts of
  positional encodings.
"""

from attn.modules.attention import MultiHeadAttention, resolve_attention
from attn.modules.classic import (AdditiveAttention, GlimpseAttention,
                                  LuongAttention)
from attn.modules.embeddings import PositionalEmbedding, T5RelativeBias
from attn.modules.pooling import (AttentionPooling, NadarayaWatson,
                                  nadaraya_watson)

__all__ = ["AdditiveAttention", "AttentionPooling", "GlimpseAttention",
           "LuongAttention", "MultiHeadAttention", "NadarayaWatson",
           "PositionalEmbedding", "T5RelativeBias", "nadaraya_watson",
           "resolve_attention"]
