"""Sort a sequence of 16 symbols (vocabulary 10) with a Transformer.

Everything but the task is configs/reverse.py.

    python -m experiments.main --config=configs/sort.py
    python -m experiments.main --config=configs/sort.py \
        --config.model.attention=linear     # another attention variant
"""

from configs import reverse


def get_config():
  c = reverse.get_config()
  c.task.name = "sort"
  return c
