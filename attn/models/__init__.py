"""Models built from :mod:`attn.modules`; attention and positional encoding
are chosen by name in every one of them.

* :class:`TransformerLM` (+ :func:`generate`), :class:`EncoderClassifier`,
  :class:`Seq2SeqTransformer` — :mod:`attn.models.transformer`.
* :class:`ViT`, :func:`attention_rollout`, :func:`cls_saliency` —
  :mod:`attn.models.vit`.
* :class:`RNNSeq2Seq` — bidirectional GRU + Bahdanau/Luong attention,
  :mod:`attn.models.rnn`.
* :func:`attention_weights` collects every layer's sown weights.
"""

from attn.models.rnn import RNNSeq2Seq
from attn.models.transformer import (DecoderBlock, EncoderClassifier,
                                     Seq2SeqTransformer, TransformerBlock,
                                     TransformerDecoder, TransformerEncoder,
                                     TransformerLM, attention_weights,
                                     generate)
from attn.models.vit import ViT, attention_rollout, cls_saliency

__all__ = ["DecoderBlock", "EncoderClassifier", "RNNSeq2Seq",
           "Seq2SeqTransformer", "TransformerBlock", "TransformerDecoder",
           "TransformerEncoder", "TransformerLM", "ViT", "attention_rollout",
           "attention_weights", "cls_saliency", "generate"]
