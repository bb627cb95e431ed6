"""Config for ``python -m experiments.benchmark`` (the kernel benchmark).

Use it as is (the defaults are the README's CPU sweep), with a preset
(``--config=configs/benchmark.py:quick``), and override single fields with
``--config.<field>=...``; tuple-valued fields take a Python tuple
(``--config.seq_lens='(1024,4096)' --config.causal='(False,True)'
--config.repeats=3``). That is the command's only way to set a field.
"""

import ml_collections

# The ``quick`` preset: a CI smoke test over every registered variant that
# finishes in seconds on a laptop CPU (``--config=configs/benchmark.py:quick``
# applies these on top of the defaults).
QUICK = {
    "seq_lens": (64, 128),
    "batch_size": 1,
    "num_heads": 2,
    "num_kv_heads": 0,
    "head_dims": (16,),
    "causal": (False,),
    "modes": ("fwd",),
    "warmup": 1,
    "repeats": 2,
    "roofline_max_n": 256,
    "output_dir": "runs/benchmark_quick",
}


# The ``peers`` preset: attn's automatic exact kernel against the kernels a
# user would pick instead (PyTorch's SDPA, tokamax) and jax.nn, over
# T x causal x fwd/fwd_bwd x fp32/bf16. The GQA and H=128 cells are the
# same preset with --config.num_kv_heads=2 or --config.head_dims='(128,)'
# and --config.seq_lens='(4096,)' (README, "attn against PyTorch and
# tokamax").
PEERS = {
    "variants": "softmax",
    "baselines": "jax_nn,torch_sdpa,tokamax,tokamax_xla_chunked",
    "seq_lens": (1024, 4096, 16384),
    "dtypes": ("fp32", "bf16"),
    "causal": (False, True),
    "modes": ("fwd", "fwd_bwd"),
    "output_dir": "runs/benchmark_peers",
}
PRESETS = {"quick": QUICK, "peers": PEERS}


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  """Benchmark settings; ``preset`` is ``""`` (full CPU sweep), ``quick``
  or ``peers``."""
  c = ml_collections.ConfigDict()
  # Comma-separated spec strings ("softmax,performer(num_features=128)"),
  # baseline names (jax_nn, jax_nn_cudnn, flax_linen, torch_sdpa, tokamax,
  # tokamax_xla_chunked) or "all" (every registered variant plus the
  # baselines).
  c.variants = "all"
  # Always run, first, in every cell group; ratios are against jax_nn.
  # torch_sdpa and tokamax* are optional (pip install -e '.[bench]'); when
  # missing their cells say "not installed".
  c.baselines = ("jax_nn,jax_nn_cudnn,flax_linen,torch_sdpa,tokamax,"
                 "tokamax_xla_chunked")
  c.seq_lens = (1024, 2048, 4096, 8192, 16384)  # T = S (self-attention)
  c.batch_size = 1
  c.num_heads = 8                 # query heads N
  c.num_kv_heads = 0              # key/value heads K (GQA); 0 = num_heads
  c.head_dims = (64,)             # H (= Dv); one sweep per value
  c.dtypes = ("fp32",)            # fp32 | bf16 | fp16
  c.causal = (False, True)        # one sweep per value
  c.modes = ("fwd",)              # fwd | fwd_bwd (grad w.r.t. q, k, v)
  c.warmup = 1                    # untimed calls before timing (>= 1)
  c.repeats = 5                   # timed calls; median/min/max reported
  # Cells whose XLA-estimated footprint (temp + arguments + outputs) exceeds
  # this are compiled but not run: recorded as "skipped: too large".
  c.max_memory_gib = 8.0
  c.check_error = True            # max error vs a float32 exact reference
  c.roofline_max_n = 4096         # largest square matmul for the roofline
  c.seed = 0                      # inputs, parameters and kernel rng
  c.output_dir = "runs/benchmark"
  c.progress = True               # tqdm progress bar over cells
  if preset in PRESETS:
    c.update(PRESETS[preset])
  elif preset:
    raise ValueError(f"unknown benchmark preset {preset!r}; presets: "
                     "'' (default), " + ", ".join(map(repr, PRESETS)))
  return c
