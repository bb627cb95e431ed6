"""Reversal at length 24 with a GRU encoder-decoder and Bahdanau attention.

    python -m experiments.main --config=configs/reverse_rnn.py
    # the same RNN without attention (uniform weights over the source):
    python -m experiments.main --config=configs/reverse_rnn.py \
        --config.model.score=uniform
"""

from configs import base


def get_config():
  c = base.get_base_config()
  c.task.name = "reverse"
  c.task.options.length = 24        # symbols per sequence
  c.task.options.vocab_size = 10    # distinct symbols
  c.model.arch = "rnn"
  c.model.score = "additive"        # Bahdanau; dot|general|location|uniform
  c.model.positional = "none"       # the RNN reads positions itself
  c.model.emb_dim = 64              # embedding and GRU width
  c.model.options.style = "bahdanau"  # bahdanau | luong
  c.batch_size = 64
  c.num_train_steps = 1000          # ~99% valid sequence accuracy by 500
  c.learning_rate = 3e-3
  c.warmup_steps = 100
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250
  c.num_eval_examples = 512
  return c
