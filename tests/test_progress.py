"""What a run shows while it trains (:class:`experiments.metrics_io.Progress`).

The bar is driven directly, on a fake terminal (a StringIO rendered the way
a terminal would: ``\\r`` back to column 0, ``\\n`` a new line, characters
overwrite): "compiling" is on screen before the first step, and the run's
log lines go through the bar's writer, on lines of their own.
"""

import io
import re

import pytest

from experiments import metrics_io


def screen(text: str) -> list[str]:
  """The lines a terminal shows after printing ``text``."""
  text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # cursor moves: none
  lines, row, col = [[]], 0, 0
  for ch in text:
    if ch == "\r":
      col = 0
    elif ch == "\n":
      row, col = row + 1, 0
      if row == len(lines):
        lines.append([])
    else:
      line = lines[row]
      line.extend(" " * (col + 1 - len(line)))
      line[col] = ch
      col += 1
  return ["".join(line).rstrip() for line in lines if "".join(line).strip()]


@pytest.fixture
def terminal():
  stream = io.StringIO()
  progress = metrics_io.Progress(0, 10, 5, stream=stream, bar=True)
  yield stream, progress
  progress.close()


def test_compiling_is_on_screen_before_the_first_step(terminal):
  stream, progress = terminal
  (bar,) = screen(stream.getvalue())
  assert bar.startswith("compiling") and "0/10" in bar
  progress.update(1, 2.5)
  last = screen(stream.getvalue())[-1]
  assert "compiling" not in last and "1/10" in last and "loss=2.5000" in last
  assert any("step 1 done in" in line for line in screen(stream.getvalue()))


def test_log_lines_go_through_the_bar_writer_not_onto_the_bar(terminal):
  stream, progress = terminal
  progress.update(1, 2.5)
  progress.phase("validating")
  assert screen(stream.getvalue())[-1].startswith("validating")
  metrics_io.get_logger().info("step 5 valid accuracy=0.5000 loss=1.0000")
  progress.phase(None)
  progress.update(6, 1.5)
  lines = screen(stream.getvalue())
  (valid,) = [line for line in lines if "valid accuracy" in line]
  assert valid.endswith("step 5 valid accuracy=0.5000 loss=1.0000")
  assert "|" not in valid and "step/s" not in valid     # no bar on the line
  assert "6/10" in lines[-1] and "valid" not in lines[-1]  # bar below it


def test_without_a_terminal_compiling_and_steps_are_log_lines(capsys):
  stream = io.StringIO()  # not a terminal: no bar, log lines on stderr
  progress = metrics_io.Progress(0, 4, 2, stream=stream)
  assert progress.bar is None
  first = capsys.readouterr().err
  assert "step 0/4: compiling the train step" in first
  for step in range(1, 5):
    progress.update(step, 1.0 / step)
  progress.phase("validating", "step 4: first validation")
  progress.close()
  lines = capsys.readouterr().err.splitlines()
  assert "step 1 done in" in lines[0]
  assert [l.split("  ")[0][9:] for l in lines[1:3]] == ["step 2/4",
                                                        "step 4/4"]
  assert lines[3].endswith("step 4: first validation ...")
  assert stream.getvalue() == ""
