"""Dates -> ISO 8601 with a GRU encoder-decoder and Bahdanau attention.

    python -m experiments.main --config=configs/dates_rnn.py
"""

from configs import dates


def get_config():
  c = dates.get_config()
  c.model.arch = "rnn"
  c.model.score = "additive"        # Bahdanau
  c.model.positional = "none"
  c.model.options.style = "bahdanau"
  c.num_train_steps = 1500
  return c
