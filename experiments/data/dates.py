"""``dates``: translate dates written in human formats to ISO 8601.

``"Sunday, November 22nd 2026"``, ``"11/22/26"``, ``"22.11.2026"``, ... ->
``"2026-11-22"``, character by character. Dates run from 1969-01-01 to
2068-12-31, the window in which two-digit years are unambiguous (it is the
convention of C's and Python's ``strptime``: 69-99 -> 19xx, 00-68 -> 20xx).
The formats are unambiguous together, not only one by one: slashes with the
month first always mean month/day (``11/22/26``), dots always mean day.month
(``22.11.26``), and a four-digit year first means year, month, day. Names are
English, written out here (no locale lookups).

Batches: ``inputs`` int32 ``[B, 32]`` characters of the source, padded with 0;
``targets`` int32 ``[B, 11]``: the 10 characters of the ISO date then EOS.
Splits are by date: a date's ordinal day number is hashed to train (80%),
valid or test (10% each) whatever format renders it, so no test date is ever
seen in training.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Dict, Sequence, Tuple

import numpy as np

from experiments.data.base import (BOS_ID, EOS_ID, PAD_ID, Batch, Task,
                                    Vocabulary, pad_rows, sample_in_split)

FIRST_DATE = datetime.date(1969, 1, 1)
LAST_DATE = datetime.date(2068, 12, 31)
MONTHS = ("January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
            "Saturday", "Sunday")
INPUT_LENGTH = 32
TARGET_LENGTH = 11  # "YYYY-MM-DD" + EOS


def ordinal_suffix(day: int) -> str:
  """English ordinal suffix: 1 -> "st", 2 -> "nd", 3 -> "rd", 11 -> "th"."""
  if 11 <= day % 100 <= 13:
    return "th"
  return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def _fields(d: datetime.date) -> Dict[str, str]:
  month, weekday = MONTHS[d.month - 1], WEEKDAYS[d.weekday()]
  return {
      "d": str(d.day), "dd": f"{d.day:02d}", "nth": f"{d.day}"
                                                  f"{ordinal_suffix(d.day)}",
      "m": str(d.month), "mm": f"{d.month:02d}", "month": month,
      "mon": month[:3], "weekday": weekday, "wkd": weekday[:3],
      "yyyy": f"{d.year:04d}", "yy": f"{d.year % 100:02d}",
  }


# name -> template over the fields of _fields (with .upper()/.lower() where
# the format is written in one case).
FORMATS: Dict[str, Callable[[Dict[str, str]], str]] = {
    "d_mon_yyyy": lambda f: f"{f['d']} {f['mon']} {f['yyyy']}",
    "weekday_month_nth_yyyy":
        lambda f: f"{f['weekday']}, {f['month']} {f['nth']} {f['yyyy']}",
    "mm/dd/yy": lambda f: f"{f['mm']}/{f['dd']}/{f['yy']}",
    "iso": lambda f: f"{f['yyyy']}-{f['mm']}-{f['dd']}",
    "dd.mm.yyyy": lambda f: f"{f['dd']}.{f['mm']}.{f['yyyy']}",
    "month_d_yyyy": lambda f: f"{f['month']} {f['d']}, {f['yyyy']}",
    "d_MONTH_yyyy": lambda f: f"{f['d']} {f['month'].upper()} {f['yyyy']}",
    "mon_d_yy": lambda f: f"{f['mon'].lower()} {f['d']} {f['yy']}",
    "d_month_yyyy": lambda f: f"{f['d']} {f['month']} {f['yyyy']}",
    "wkd_d_mon_yyyy":
        lambda f: f"{f['wkd']} {f['d']} {f['mon']} {f['yyyy']}",
    "yyyy/mm/dd": lambda f: f"{f['yyyy']}/{f['mm']}/{f['dd']}",
    "dd-mon-yyyy": lambda f: f"{f['dd']}-{f['mon']}-{f['yyyy']}",
    "the_nth_of_month":
        lambda f: f"the {f['nth']} of {f['month']}, {f['yyyy']}",
    "m/d/yyyy": lambda f: f"{f['m']}/{f['d']}/{f['yyyy']}",
    "mon._d_yyyy": lambda f: f"{f['mon']}. {f['d']}, {f['yyyy']}",
    "weekday_d_month_yyyy":
        lambda f: f"{f['weekday']} {f['d']} {f['month']} {f['yyyy']}",
    "yyyymmdd": lambda f: f"{f['yyyy']}{f['mm']}{f['dd']}",
    "dd.mm.yy": lambda f: f"{f['dd']}.{f['mm']}.{f['yy']}",
    "d_mon_'yy": lambda f: f"{f['d']} {f['mon']} '{f['yy']}",
    "month_nth_yyyy": lambda f: f"{f['month']} {f['nth']}, {f['yyyy']}",
    "WKD,_dd_MON_yyyy": lambda f: (f"{f['wkd'].upper()}, {f['dd']} "
                                   f"{f['mon'].upper()} {f['yyyy']}"),
}
FORMAT_NAMES = tuple(FORMATS)


def render(d: datetime.date, fmt: str) -> str:
  """``d`` written in format ``fmt`` (a key of :data:`FORMATS`)."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown date format {fmt!r}; known: {FORMAT_NAMES}")
  return FORMATS[fmt](_fields(d))


def _characters() -> Tuple[str, ...]:
  """Every character any format can produce, in code-point order."""
  names = "".join(MONTHS + WEEKDAYS)
  sample = [render(datetime.date(2024, 1, 1) + datetime.timedelta(days=i), f)
            for i in range(0, 366, 3) for f in FORMAT_NAMES]
  chars = set(names + names.upper() + names.lower() + "0123456789"
              + "".join(sample))
  return tuple(sorted(chars))


VOCAB = Vocabulary(_characters(), separator="")


class Dates(Task):
  """Human-written date -> ISO 8601 date, at the character level."""

  name = "dates"
  kind = "seq2seq"

  def _propose(self, rng: np.random.Generator, m: int):
    span = (LAST_DATE - FIRST_DATE).days + 1
    ordinals_B = FIRST_DATE.toordinal() + rng.integers(0, span, size=m)
    formats_B = rng.integers(0, len(FORMAT_NAMES), size=m)
    days = [datetime.date.fromordinal(int(o)) for o in ordinals_B]
    sources = [VOCAB.encode(render(d, FORMAT_NAMES[f]))
               for d, f in zip(days, formats_B)]
    targets = [np.append(VOCAB.encode(d.isoformat()), EOS_ID) for d in days]
    batch = {"inputs": pad_rows(sources, INPUT_LENGTH, self.name),
             "targets": pad_rows(targets, TARGET_LENGTH, self.name)}
    return batch, ordinals_B[:, None]

  def _sample(self, rng: np.random.Generator, split: str, n: int) -> Batch:
    return sample_in_split(rng, split, n, self._propose, self.name)

  def spec(self) -> Dict[str, Any]:
    return {"name": self.name, "kind": self.kind, "vocab_size": VOCAB.size,
            "input_length": INPUT_LENGTH, "target_length": TARGET_LENGTH,
            "pad_id": PAD_ID, "bos_id": BOS_ID, "eos_id": EOS_ID}

  def decode(self, ids: Sequence[int]) -> str:
    return VOCAB.decode(ids)
