"""The README's links point at files that exist and its commands parse.

Checked documents: ``README.md`` and, while they exist, the parts it is
assembled from (``readme_parts/*.md``, whose links are relative to the
repository root).

* Every relative link or image (``[text](path)``, ``![alt](path)``,
  ``<img src="path">``) names an existing file or directory, and every
  ``#anchor`` names a heading of the README.
* Every ``python -m experiments.<module> ...`` command (in code blocks and
  inline code) parses its flags without running: one subprocess executes
  each module's ``__main__`` with ``absl.app.run`` and
  ``argparse.ArgumentParser.parse_args`` replaced by versions that parse
  and stop. Experiment configs given with ``--config`` are then validated
  with ``experiments.config_validation.prepare`` (unknown fields, bad
  attention specs, ...; when a task option names the user's own data file,
  ``path`` or ``data_dir``, that is not there, everything but building the
  task is checked), and modules exposing ``config_from_flags`` and
  ``validate_config`` (the benchmark, the figures) have those called.
"""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(
    glob.glob(os.path.join(ROOT, "readme_parts", "*.md")))

_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_IMG = re.compile(r"<img\s[^>]*src=[\"']([^\"']+)[\"']", re.IGNORECASE)
_FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1\s*$", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def without_code(text):
  """Markdown with fenced code blocks and inline code removed."""
  return _INLINE.sub("", _FENCE.sub("", text))


def links(text):
  """Link and image targets outside code."""
  prose = without_code(text)
  return _LINK.findall(prose) + _IMG.findall(prose)


def slug(heading):
  """GitHub's anchor for a heading: lower case, punctuation dropped,
  spaces to hyphens (markup such as backticks and links removed first)."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
  text = re.sub(r"[`*_~]", "", text).strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(texts):
  """Every heading anchor (with GitHub's -1, -2 suffixes for repeats)."""
  out, seen = set(), {}
  for text in texts:
    for heading in _HEADING.findall(_FENCE.sub("", text)):
      base = slug(heading)
      n = seen.get(base, 0)
      out.add(base if n == 0 else f"{base}-{n}")
      seen[base] = n + 1
  return out


def broken_links(text, base_dir, known_anchors):
  """``[(target, why)]`` for links that point nowhere."""
  bad = []
  for target in links(text):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
      continue                              # http:, https:, mailto:, ...
    path, _, fragment = target.partition("#")
    if path and not os.path.exists(os.path.join(base_dir, path)):
      bad.append((target, "no such file"))
    elif not path and fragment and fragment not in known_anchors:
      bad.append((target, "no such heading"))
  return bad


def commands(text):
  """``python -m experiments.<x> ...`` commands as argv lists
  ``[module, arg, ...]``; placeholders (``<name>``) are skipped."""
  snippets = []
  for _, block in _FENCE.findall(text):
    snippets.extend(block.replace("\\\n", " ").splitlines())
  snippets.extend(_INLINE.findall(_FENCE.sub("", text)))
  found = []
  for line in snippets:
    for part in re.split(r"&&|;|\|", line):
      try:
        words = shlex.split(part, comments=True)
      except ValueError:
        continue
      while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]                   # VAR=value prefixes
      if (len(words) >= 3 and re.match(r"^python3?$", words[0])
          and words[1] == "-m" and words[2].startswith("experiments.")
          and not any("<" in w or ">" in w for w in words)):
        found.append(words[2:])
  return found


# Runs in a subprocess: parses each command's flags without running it.
DRY_RUN = r'''
import argparse, json, runpy, sys
from absl import app, flags
import ml_collections

class Parsed(Exception):
  pass

def dry_app_run(main, argv=None, **unused):
  rest = flags.FLAGS(sys.argv if argv is None else argv)
  if len(rest) > 1:
    raise ValueError(f"unexpected arguments {rest[1:]}")
  module_globals = getattr(main, "func", main).__globals__
  raise Parsed(module_globals)

def dry_parse_args(self, args=None, namespace=None):
  ORIGINAL_PARSE_ARGS(self, args, namespace)
  raise Parsed({})

ORIGINAL_PARSE_ARGS = argparse.ArgumentParser.parse_args
app.run = dry_app_run
argparse.ArgumentParser.parse_args = dry_parse_args

def validate(module_globals):
  import os
  from experiments import config_validation
  for name in list(flags.FLAGS):
    config = flags.FLAGS[name].value
    if (isinstance(config, ml_collections.ConfigDict) and "task" in config
        and "model" in config):
      options = config.task.options
      missing = [o for o in INPUT_FILE_OPTIONS if isinstance(
          options.get(o), str) and not os.path.exists(options[o])]
      make_task = config_validation.make_task
      if missing:       # the task cannot be built: check everything else
        config_validation.make_task = lambda config: None
      try:
        config_validation.prepare(config)
      finally:
        config_validation.make_task = make_task
  if "config_from_flags" in module_globals and "validate_config" in (
      module_globals):
    module_globals["validate_config"](
        module_globals["config_from_flags"](flags.FLAGS))


# Task options naming the user's own data; when the file is not there the
# task is not built (everything else is still validated).
INPUT_FILE_OPTIONS = ("path", "data_dir")
baseline = set(flags.FLAGS)
results = []
for argv in json.load(sys.stdin):
  sys.argv = list(argv)
  try:
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    results.append("ran without parsing flags with absl.app.run or argparse")
  except Parsed as parsed:
    try:
      validate(parsed.args[0])
      results.append("ok")
    except BaseException as e:
      results.append(f"{type(e).__name__}: {e}")
  except SystemExit as e:
    results.append(f"SystemExit({e.code})")
  except BaseException as e:
    results.append(f"{type(e).__name__}: {e}")
  finally:
    for name in set(flags.FLAGS) - baseline:
      delattr(flags.FLAGS, name)
print(json.dumps(results))
'''


def dry_run(argvs):
  """Parse result per command: ``"ok"`` or the error."""
  proc = subprocess.run(
      [sys.executable, "-c", DRY_RUN], input=json.dumps(argvs), cwd=ROOT,
      capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# The checkers themselves


def test_links_and_anchors_are_extracted_and_checked(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.png").write_bytes(b"x")
  text = ("# A guide\n## Scaled dot-product (why √d)\n"
          "![ok](docs/a.png) [missing](docs/b.png) [web](https://x.org/y) "
          "[anchor](#a-guide) [anchor2](#scaled-dot-product-why-d) "
          "[bad anchor](#nowhere) <img src=\"docs/c.png\">\n"
          "```\n[not a link](docs/none.png)\n```\n`[code](nope.png)`\n")
  bad = broken_links(text, str(tmp_path), anchors([text]))
  assert sorted(bad) == [("#nowhere", "no such heading"),
                         ("docs/b.png", "no such file"),
                         ("docs/c.png", "no such file")]


def test_commands_are_extracted():
  text = ("```bash\npython -m experiments.main --config=configs/dates.py \\\n"
          "    --config.num_train_steps=10   # comment\n"
          "JAX_PLATFORMS=cpu python -m experiments.figures --fast && ls\n"
          "python -m experiments.main --config=configs/<name>.py\n"
          "python -m pytest -q tests\n```\n"
          "Run `python -m experiments.data --count 2` to see.\n")
  assert commands(text) == [
      ["experiments.main", "--config=configs/dates.py",
       "--config.num_train_steps=10"],
      ["experiments.figures", "--fast"],
      ["experiments.data", "--count", "2"]]


# --------------------------------------------------------------------------
# The README


def test_readme_exists():
  assert os.path.exists(DOCS[0])


@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_links_point_to_existing_files(path):
  known = anchors(read(p) for p in DOCS)
  bad = broken_links(read(path), ROOT, known)
  assert not bad, f"{os.path.relpath(path, ROOT)}: broken links {bad}"


# Commands that must fail: they prove the dry run really checks flags.
MUST_FAIL = [
    ["experiments.main", "--config=configs/reverse.py", "--no_such_flag=1"],
    ["experiments.main", "--config=configs/reverse.py",
     "--config.model.no_such_field=1"],
    ["experiments.main", "--config=configs/reverse.py",
     "--config.model.attention=no_such_attention"],
    ["experiments.benchmark", "--config=configs/benchmark.py",
     "--config.dtypes=('fp8',)"],
    ["experiments.benchmark", "--quick"],      # the retired shadow flags
    ["experiments.figures", "--only=no_such_figure"],
    ["experiments.data", "--count", "two"],
]


def test_every_command_parses_its_flags():
  found = {}
  for path in DOCS:
    for argv in commands(read(path)):
      found.setdefault(tuple(argv), os.path.relpath(path, ROOT))
  argvs = [list(a) for a in found] + MUST_FAIL
  results = dry_run(argvs)
  for argv, result in zip(argvs[len(found):], results[len(found):]):
    assert result != "ok", f"{argv} should have been rejected"
  bad = [(found[tuple(a)], " ".join(["python -m"] + a), r)
         for a, r in zip(argvs, results[:len(found)]) if r != "ok"]
  assert not bad, "commands that do not parse:\n" + "\n".join(map(str, bad))


def test_ci_runs_the_readme_test_command():
  """CI runs exactly the Quick start's test command (the line after "# 2.")."""
  quick = read(os.path.join(ROOT, "README.md")).split("## Quick start")[1]
  lines = quick.split("```bash")[1].split("```")[0].splitlines()
  command = lines[[i for i, l in enumerate(lines) if l.startswith("# 2.")][0] + 1]
  assert "pytest" in command and "venv" in command
  ci = read(os.path.join(ROOT, ".ci", "run")).splitlines()
  assert command in ci
