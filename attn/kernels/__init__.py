"""Pure attention kernels: ``(query, key, value, bias=None, mask=None, ...)``.

Importing this package registers every built-in kernel with
:mod:`attn.registry`. One module per variant; each registers itself.
"""

# pylint: disable=unused-import
from attn.kernels import exact_registered  # noqa: F401
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
from attn.kernels.attention import dot_product_attention  # noqa: F401
