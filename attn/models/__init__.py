"""Models built from :mod:`attn.modules`, each from ONE config dataclass;
attention and positional encoding are chosen by name in every one of them.

* :class:`TransformerConfig` — :class:`TransformerLM` (+ :func:`generate`),
  :class:`EncoderClassifier`, :class:`Seq2SeqTransformer` and the blocks and
  stacks they are made of (:mod:`attn.models.transformer`); :class:`ViT`,
  :func:`attention_rollout`, :func:`cls_saliency` (:mod:`attn.models.vit`);
  :class:`SetEncoder` (:mod:`attn.models.set_encoder`).
* :class:`RNNConfig` — :class:`RNNSeq2Seq`, bidirectional GRU +
  Bahdanau/Luong attention (:mod:`attn.models.rnn`).
* :class:`GlimpseConfig` — :class:`GlimpseNet`, one glimpse with a
  context-id query (:mod:`attn.models.glimpse`).
* :func:`attention_weights` collects every layer's sown weights.
"""

from attn.models.glimpse import GlimpseConfig, GlimpseNet
from attn.models.rnn import RNNConfig, RNNSeq2Seq
from attn.models.set_encoder import SetEncoder
from attn.models.transformer import (DecoderBlock, EncoderClassifier,
                                     Seq2SeqTransformer, TransformerBlock,
                                     TransformerConfig, TransformerDecoder,
                                     TransformerEncoder, TransformerLM,
                                     attention_weights, can_decode, generate)
from attn.models.vit import ViT, attention_rollout, cls_saliency

__all__ = ["DecoderBlock", "EncoderClassifier", "GlimpseConfig", "GlimpseNet",
           "RNNConfig", "RNNSeq2Seq", "Seq2SeqTransformer", "SetEncoder",
           "TransformerBlock", "TransformerConfig", "TransformerDecoder",
           "TransformerEncoder", "TransformerLM", "ViT", "attention_rollout",
           "attention_weights", "can_decode", "cls_saliency", "generate"]
