"""The default experiment: the reverse task (see configs/reverse.py)."""

from configs import reverse


def get_config():
  return reverse.get_config()
