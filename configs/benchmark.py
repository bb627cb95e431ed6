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
# tokamax"). block_matmuls (the kernel's matmuls alone) gives the floor
# columns.
PEERS = {
    "variants": "softmax",
    "baselines": ("jax_nn,torch_sdpa,tokamax,tokamax_xla_chunked,"
                  "block_matmuls"),
    "seq_lens": (1024, 4096, 16384),
    "dtypes": ("fp32", "bf16"),
    "causal": (False, True),
    "modes": ("fwd", "fwd_bwd"),
    "output_dir": "runs/benchmark_peers",
}
# The ``training`` preset: TransformerLM training steps (text_lm) for
# attention variants, step time, tokens/s, MFU and loop overhead
# (experiments.bench.training).
TRAINING = {
    "kind": "training",
    "variants": "softmax,linear,performer,local",
    "seq_lens": (512, 1024, 2048, 4096, 8192),
    "repeats": 3,
    "output_dir": "runs/benchmark_training",
}
PRESETS = {"quick": QUICK, "peers": PEERS, "training": TRAINING}


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  """Benchmark settings; ``preset`` is ``""`` (full CPU sweep), ``quick``,
  ``peers`` or ``training``."""
  c = ml_collections.ConfigDict()
  # "kernels": attention kernels alone (the fields below); "training":
  # TransformerLM training steps per variant and T (c.training; uses
  # variants, seq_lens, repeats, output_dir, progress).
  c.kind = "kernels"
  c.training = ml_collections.ConfigDict()
  c.training.experiment = "text_lm"   # configs/<name>.py, an LM config
  c.training.tokens_per_step = 8192   # batch = max(1, this // T)
  c.training.steps = 5                # steps per timing window
  c.training.matmul_n = 2048          # square fp32 matmul for MFU
  # Experiment config fields set in every cell, comma-separated
  # "path=value" ("model.num_layers=4,model.emb_dim=256"; values are Python
  # literals, else strings).
  c.training.overrides = ""
  # Comma-separated spec strings ("softmax,performer(num_features=128)"),
  # baseline names (jax_nn, jax_nn_cudnn, flax_linen, torch_sdpa, tokamax,
  # tokamax_xla_chunked, block_matmuls: the chunked kernel's matmuls alone,
  # a timing floor) or "all" (every registered variant plus the baselines).
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
  # > 0: the sweep runs the shortest T first, and a cell it reaches after
  # this many seconds is not run: "skipped: time budget".
  c.time_budget_s = 0.0
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
