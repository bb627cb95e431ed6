"""attn: attention mechanisms in JAX/Flax.

Layers, from the bottom up (nothing imports upwards):

* :mod:`attn.kernels` — pure functions ``(query, key, value, bias, mask)``;
  :func:`attn.dot_product_attention` is the exact entry point.
* :mod:`attn.scores` — the classic score functions (dot, general, additive,
  cosine, location).
* :mod:`attn.registry` — ``get_attention("performer(num_features=64)")``
  turns a config string into a kernel; ``list_attention()`` lists them.

Layout everywhere is ``[batch, length, heads, head_dim]``.
"""

from attn import scores
from attn.kernels.attention import dot_product_attention
from attn.registry import get_attention, list_attention, register_attention

__all__ = ["dot_product_attention", "get_attention", "list_attention",
           "register_attention", "scores"]
__version__ = "0.1.0"
