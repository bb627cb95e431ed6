"""Copy a sequence of 16 symbols (vocabulary 10) with a Transformer.

Everything but the task is configs/reverse.py.

    python -m experiments.main --config=configs/copy.py
    python -m experiments.main --config=configs/copy.py \
        --config.model.positional=none      # fails: no notion of order
"""

from configs import reverse


def get_config():
  c = reverse.get_config()
  c.task.name = "copy"
  return c
