"""The kernels a user would pick instead of attn: PyTorch's SDPA, tokamax.

Both are optional (``pip install -e '.[bench]'``); without them their cells
say ``not installed`` and name that command.

* ``torch_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on
  the CPU (its flash kernel), with as many threads as the machine has
  cores. The inputs are copied once, untimed, into PyTorch's own
  ``[B, N, T, H]`` layout, the layout a PyTorch user holds. ``fwd`` runs
  under ``torch.inference_mode()``; ``fwd_bwd`` computes ``(dq, dk, dv)``
  for the same cotangent as the JAX cells. GQA uses ``enable_gqa``.
* ``tokamax`` / ``tokamax_xla_chunked``: ``tokamax.dot_product_attention``
  with its default choice of implementation and with
  ``implementation="xla_chunked"``; JAX functions, jitted like ours.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from attn.kernels import tokamax_adapter

INSTALL_HINT = "pip install -e '.[bench]'"


def _missing(module: str) -> Optional[str]:
  if importlib.util.find_spec(module) is None:
    return f"{module} is not installed; {INSTALL_HINT}"
  return None


def torch_missing() -> Optional[str]:
  """Why ``torch_sdpa`` cannot run here, or None."""
  return _missing("torch")


def tokamax_missing() -> Optional[str]:
  """Why the tokamax baselines cannot run here, or None."""
  return _missing("tokamax")


def _to_torch(x, torch):
  """A JAX ``[B, T, N, H]`` array as a contiguous torch ``[B, N, T, H]``
  tensor of the same dtype (bf16 goes through float32, losslessly)."""
  dtype = {jnp.dtype(jnp.float32): torch.float32,
           jnp.dtype(jnp.bfloat16): torch.bfloat16,
           jnp.dtype(jnp.float16): torch.float16}[jnp.dtype(x.dtype)]
  host = np.array(jnp.asarray(x, jnp.float32))   # a writable copy
  return torch.from_numpy(host).to(dtype).permute(0, 2, 1, 3).contiguous()


def _to_numpy(t) -> np.ndarray:
  """A torch ``[B, N, T, H]`` tensor as float32 NumPy ``[B, T, N, H]``."""
  return t.detach().float().permute(0, 2, 1, 3).numpy()


def torch_sdpa(inputs: Dict[str, Any], *, mode: str, causal: bool
               ) -> Tuple[Callable[[], Any], Callable[[Any], Any]]:
  """``(call, to_numpy)`` timing PyTorch's SDPA on ``inputs`` (see module
  docstring); ``call()`` returns the output or ``(dq, dk, dv)``."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  q, k, v = (_to_torch(inputs[n], torch) for n in ("q", "k", "v"))
  gqa = q.shape[1] != k.shape[1]

  def attend(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                          enable_gqa=gqa)

  if mode == "fwd":
    def call():
      with torch.inference_mode():
        return attend(q, k, v)
    return call, _to_numpy

  cotangent = _to_torch(inputs["cotangent"], torch).to(q.dtype)
  leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))

  def call_bwd():
    out = attend(*leaves)
    return torch.autograd.grad(out, leaves, grad_outputs=cotangent)
  return call_bwd, lambda grads: tuple(_to_numpy(g) for g in grads)


def tokamax_attention(implementation: Optional[str]):
  """The harness's ``fn`` for ``tokamax.dot_product_attention`` with
  ``implementation`` (None: tokamax chooses)."""
  def fn(q, k, v, *, is_causal, rng, params):
    del rng, params
    tokamax = tokamax_adapter.import_tokamax()
    return tokamax.dot_product_attention(q, k, v, is_causal=is_causal,
                                         implementation=implementation)
  return fn
