"""Pure attention kernels: ``(query, key, value, bias=None, mask=None, ...)``.

Importing this package registers every built-in kernel with
:mod:`attn.registry` (one module per variant; each registers itself; the
registry imports no kernel). :mod:`attn.kernels.exact` is the exact kernel
(``dot_product_attention``, its implementations and registry entries);
:mod:`attn.kernels.online_softmax` is the block step shared by the blockwise
exact kernels :mod:`attn.kernels.chunked` and :mod:`attn.kernels.ring`.

Shape letters, used with this one meaning in array names (``q_BTNH``,
``scores_TS``, ``s_RC``) and einops patterns (lower case) throughout the
kernels:

* ``B`` batch (any leading batch axes flattened)
* ``T`` query length; ``S`` key/value length
* ``N`` query heads; ``K`` key/value heads; ``G = N / K`` query heads per
  key/value head (grouped-query attention)
* ``H`` query/key head dim; ``Dv`` value head dim (``D`` in array-name
  suffixes such as ``v_SD``)
* Blockwise kernels (chunked, ring): ``bq`` / ``bk`` query / key block
  sizes, ``nq`` / ``nk`` numbers of query / key blocks, ``Tp`` / ``Sp``
  padded lengths; ``R`` rows of a query block and ``C`` columns of a key
  block as one head's block step sees them (``C = bk``; ``R = bq``, or
  ``G·bq`` where the ``G`` query heads of a key/value head are stacked as
  rows)
* Sparse patterns (bigbird, longformer, blocks): ``Y`` global tokens
  (keys every query sees / queries that see every key); ``W`` a
  window's width in keys
"""

# pylint: disable=unused-import
from attn.kernels import exact  # noqa: F401
from attn.kernels import chunked  # noqa: F401
from attn.kernels import local  # noqa: F401
from attn.kernels import linear  # noqa: F401
from attn.kernels import performer  # noqa: F401
from attn.kernels import linformer  # noqa: F401
from attn.kernels import nystrom  # noqa: F401
from attn.kernels import bigbird  # noqa: F401
from attn.kernels import longformer  # noqa: F401
from attn.kernels import reformer  # noqa: F401
from attn.kernels import synthesizer  # noqa: F401
from attn.kernels import sinkhorn  # noqa: F401
from attn.kernels import sparse  # noqa: F401
from attn.kernels import topk  # noqa: F401
from attn.kernels import local_p  # noqa: F401
from attn.kernels import ring  # noqa: F401
from attn.kernels.exact import dot_product_attention  # noqa: F401
