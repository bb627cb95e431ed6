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
* Every fenced ```python block of ``README.md`` runs as written: each one
  alone, in a fresh namespace, in one of two worker subprocesses that share
  the blocks (CPU, 8 simulated devices for the ring-attention example); a
  failure names the block's README line. Code that is not meant to run
  (signatures, pseudo-code, shell sessions) is fenced ```text, ```bash or
  bare.
* The examples in the *Built-in tasks* table are what
  ``python -m experiments.data --count 2`` prints.
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



# --------------------------------------------------------------------------
# The README's Python blocks run as written

_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*([^\s`]*)")


def fenced_blocks(text):
  """``[(line, info, code)]`` for every fenced code block of ``text``:
  ``line`` is the 1-based line of the opening fence, ``info`` its language
  tag (lower case, ``""`` for none). A block closes at a fence of the same
  character that is at least as long and carries no tag (CommonMark), so
  fences shown inside a longer fence stay part of that block."""
  blocks, opened = [], None
  for number, line in enumerate(text.splitlines(), 1):
    if opened is None:
      m = _FENCE_OPEN.match(line)
      if m:
        opened, fence, info, body = number, m.group(1), m.group(2).lower(), []
    elif re.fullmatch(r" {0,3}%s{%d,}[ \t]*" % (re.escape(fence[0]),
                                                  len(fence)), line):
      blocks.append((opened, info, "".join(l + "\n" for l in body)))
      opened = None
    else:
      body.append(line)
  return blocks


PYTHON_TAGS = ("python", "py", "python3")


def python_blocks(text):
  """``[(line, code)]`` for the ```python blocks (see :func:`fenced_blocks`)."""
  return [(line, code) for line, info, code in fenced_blocks(text)
          if info in PYTHON_TAGS]


def run_blocks(blocks, claim_dir=None):
  """Runs each ``(path, line, code)`` block alone and reports on each.

  Every block gets a fresh namespace (``__name__ == "__main__"``) and is
  compiled so that tracebacks name ``path`` and the document's own line
  numbers. Its stdout is swallowed. Attention variants a block registers
  are unregistered after it, so one block's ``@register_attention`` does not
  leak into the next one's ``attn.list_attention()``.

  Args:
    blocks: ``[(path, line, code)]``.
    claim_dir: for several workers sharing ``blocks``: a worker runs block
      ``i`` only if it is the first to create the file ``claim_dir/i``, and
      the workers go through the blocks longest first (length is a rough
      measure of cost; a long block picked up last would finish alone).

  Returns:
    ``[{"path", "line", "seconds", "cpu_seconds", "error"}]`` for the blocks
    it ran, ``error`` None or the traceback.
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import traceback  # pylint: disable=g-import-not-at-top
  from attn import registry  # pylint: disable=g-import-not-at-top
  results = []
  order = list(range(len(blocks)))
  if claim_dir is not None:
    order.sort(key=lambda i: -len(blocks[i][2]))
  for i in order:
    path, line, code = blocks[i]
    if claim_dir is not None:
      try:
        os.close(os.open(os.path.join(claim_dir, str(i)),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))
      except FileExistsError:
        continue                  # another worker has it
    saved = dict(registry._REGISTRY), dict(registry._ALIASES)  # pylint: disable=protected-access
    start, start_cpu = time.perf_counter(), time.process_time()
    error = None
    try:
      compiled = compile("\n" * line + code, path, "exec")
      with contextlib.redirect_stdout(io.StringIO()):
        exec(compiled, {"__name__": "__main__"})  # pylint: disable=exec-used
    except (Exception, SystemExit) as e:  # pylint: disable=broad-except
      tb = e.__traceback__.tb_next or e.__traceback__   # from the block on
      error = "".join(traceback.format_exception(type(e), e, tb))[-4000:]
    finally:
      for table, before in zip((registry._REGISTRY, registry._ALIASES), saved):  # pylint: disable=protected-access
        table.clear()
        table.update(before)
    results.append({"path": path, "line": line, "error": error,
                    "seconds": round(time.perf_counter() - start, 2),
                    "cpu_seconds": round(time.process_time() - start_cpu, 2)})
  return results


def _run_blocks_main():
  """Worker entry: ``argv[1:]`` = blocks JSON file, results file, claims
  directory."""
  with open(sys.argv[1], encoding="utf-8") as f:
    blocks = json.load(f)
  results = run_blocks(blocks, claim_dir=sys.argv[3])
  with open(sys.argv[2], "w", encoding="utf-8") as f:
    json.dump(results, f)


# What the subprocess that runs the README's blocks gets: the CPU, 8
# simulated devices (the ring-attention example splits a sequence over all
# devices) and XLA's cheapest compilation: the examples run eagerly, one
# small compilation per operation, so compile time is most of their cost
# (these three flags halve it).
BLOCK_XLA_FLAGS = ("--xla_force_host_platform_device_count=8 "
                   "--xla_backend_optimization_level=0 "
                   "--xla_llvm_disable_expensive_passes=true "
                   "--xla_cpu_use_fusion_emitters=false")


# Worker subprocesses that share the blocks (each block runs in one of them;
# a worker takes the next unclaimed block when it is free): the blocks'
# cost is compilation and tracing, one CPU core each.
WORKERS = min(2, os.cpu_count() or 1)


def run_blocks_in_subprocesses(blocks, work_dir, workers=WORKERS):
  """:func:`run_blocks` in ``workers`` fresh interpreters (never this one:
  the blocks start JAX with 8 simulated devices); results in block order."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
      filter(None, [os.environ.get("XLA_FLAGS", ""), BLOCK_XLA_FLAGS])))
  blocks_file = os.path.join(work_dir, "blocks.json")
  with open(blocks_file, "w", encoding="utf-8") as f:
    json.dump(blocks, f)
  claims = os.path.join(work_dir, "claims")
  os.makedirs(claims)
  procs = []
  for w in range(workers):
    out, err = (os.path.join(work_dir, f"worker_{w}.{ext}")
                for ext in ("json", "stderr"))
    with open(err, "w", encoding="utf-8") as stderr:
      procs.append((subprocess.Popen(
          [sys.executable, "-c",
           "from tests.test_readme import _run_blocks_main; _run_blocks_main()",
           blocks_file, out, claims], stdin=subprocess.DEVNULL,
          stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT, env=env),
                    out, err))
  try:
    for proc, _, _ in procs:
      proc.wait(timeout=900)
  finally:
    for proc, _, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  results = []
  for proc, out, err in procs:
    assert proc.returncode == 0, read(err)[-3000:]
    with open(out, encoding="utf-8") as f:
      results.extend(json.load(f))
  return sorted(results, key=lambda r: (r["path"], r["line"]))


def test_python_blocks_are_extracted():
  text = ("# T\n"                          # 1
          "```python\n"                    # 2
          "x = 1\n"                        # 3
          "```\n"                          # 4
          "```bash\npython -c 'x'\n```\n"  # 5-7
          "```text\nnot(code\n```\n"       # 8-10
          "````markdown\n"                 # 11
          "```python\nnested = 1\n```\n"   # 12-14
          "````\n"                         # 15
          "```\nbare\n```\n"               # 16-18
          "  ```py\n"                      # 19
          "y = 2\n"                        # 20
          "\n"                             # 21
          "z = 3\n"                        # 22
          "  ```\n")                       # 23
  assert python_blocks(text) == [(2, "x = 1\n"), (19, "y = 2\n\nz = 3\n")]
  assert [(l, i) for l, i, _ in fenced_blocks(text)] == [
      (2, "python"), (5, "bash"), (8, "text"), (11, "markdown"), (16, ""),
      (19, "py")]
  assert len(python_blocks(read(DOCS[0]))) >= 10   # the README has blocks


def test_block_runner_reports_failures_and_isolates_blocks():
  blocks = [
      ("doc.md", 1, "x = 1\nprint(x)\n"),
      ("doc.md", 10, "y = x\n"),                       # fresh namespace
      ("doc.md", 20, "a = 1\n\n1 / 0\n"),              # fails on line 23
      ("doc.md", 30, "from attn.registry import register_attention\n"
                     "register_attention('readme_test_variant')(lambda q, k, v: v)\n"),
      ("doc.md", 40, "import attn\n"
                     "assert 'readme_test_variant' not in attn.list_attention()\n"),
  ]
  results = run_blocks(blocks)
  assert [r["line"] for r in results] == [1, 10, 20, 30, 40]
  assert results[0]["error"] is None
  assert "NameError" in results[1]["error"]
  assert "ZeroDivisionError" in results[2]["error"]
  assert 'File "doc.md", line 23' in results[2]["error"]
  assert results[3]["error"] is None and results[4]["error"] is None


def test_readme_python_blocks_run(tmp_path):
  """Each ```python block of the README runs alone, as written."""
  blocks = [("README.md", line, code)
            for line, code in python_blocks(read(DOCS[0]))]
  assert blocks
  results = run_blocks_in_subprocesses(blocks, str(tmp_path))
  assert [r["line"] for r in results] == [line for _, line, _ in blocks]
  bad = [f"README.md:{r['line']} ({r['seconds']} s):\n{r['error']}"
         for r in results if r["error"]]
  slowest = sorted(results, key=lambda r: -r["seconds"])[:5]
  assert not bad, ("README python blocks that fail (line of the opening "
                   "fence):\n\n" + "\n\n".join(bad) + "\n\nslowest: "
                   + ", ".join(f"{r['line']}: {r['seconds']} s"
                               for r in slowest))


# --------------------------------------------------------------------------
# The Built-in tasks table shows what the tasks produce

_SHAPE = re.compile(r"^\[[\d, ]+\]$")


def task_table(text):
  """``{task: [fragment, ...]}``: the backticked pieces of the example column
  of the Built-in tasks table, cut at ``…`` (shapes such as ``[8, 8, 1]``
  left out: the examples print them as tuples)."""
  section = text.split("### Built-in tasks", 1)[1].split("\n### ", 1)[0]
  rows = {}
  for line in section.splitlines():
    m = re.match(r"^\| `(\w+)` \|.*\|([^|]*)\|\s*$", line)
    if not m:
      continue
    pieces = []
    for fragment in re.findall(r"`([^`]+)`", m.group(2)):
      if not _SHAPE.match(fragment):
        pieces.extend(p.strip() for p in fragment.split("…") if p.strip())
    rows[m.group(1)] = pieces
  return rows


def test_task_table_examples_are_what_the_tasks_print():
  from experiments.data import __main__ as data_main  # pylint: disable=g-import-not-at-top
  from experiments.data import get_task, list_tasks  # pylint: disable=g-import-not-at-top
  rows = task_table(read(DOCS[0]))
  assert sorted(rows) == sorted(list_tasks())
  bad = []
  for name, pieces in rows.items():
    task = get_task(name)
    batch = task.batch("train", 0, 2)
    printed = "\n".join(data_main.render_example(task, batch, i)
                        for i in range(2))
    bad.extend((name, p) for p in pieces if p not in printed)
  assert not bad, ("table examples that `python -m experiments.data --count 2`"
                   f" does not print: {bad}")
