"""Tests for the built-in data tasks (experiments.data).

Every label is recomputed by an independent route: brute-force Python for the
algorithmic tasks, a stack evaluator and a literal port of LRA's ``to_value``
for ListOps, ``datetime.strptime`` for dates, scikit-learn's raw arrays for
the digits tasks, the formula for Nadaraya-Watson.
"""

from __future__ import annotations

import datetime
import random
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import data as tasks
from experiments.data import __main__ as show
from experiments.data import base, dates, digits, listops, text

# Small options per task so every generic test stays fast.
SMALL = {
    "reverse": {"length": 6}, "copy": {"length": 6, "min_length": 2},
    "sort": {"length": 6}, "associative_recall": {"num_pairs": 3},
    "listops": {"max_length": 64, "min_length": 16}, "dates": {},
    "glimpse": {"length": 5, "num_keys": 6, "num_items": 5},
    "nadaraya_watson": {"num_keys": 7, "num_queries": 5},
    "digits_vit": {"augment": True}, "digits_set_anomaly": {"set_size": 4},
    "text_lm": {"length": 16},
}


def make(name, seed=0, **overrides):
  return tasks.get_task(name, seed=seed, **{**SMALL[name], **overrides})


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def concat(batches):
  batches = list(batches)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def rows(a):
  return {r.tobytes() for r in np.asarray(a)}


# ------------------------------------------------------------------ registry


def test_registry_lists_every_task_once():
  assert tasks.list_tasks() == sorted(SMALL)
  for name, cls in tasks.TASKS.items():
    assert cls.name == name


def test_every_task_kind_has_a_problem_and_a_model():
  """problems.PROBLEMS is the one list of kinds: every task's kind has a
  problem and at least one arch that builds a model for it; every kind
  there is some task's kind, and every arch builds only for known kinds."""
  from experiments import problems  # pylint: disable=g-import-not-at-top
  kinds = {cls.kind for cls in tasks.TASKS.values()}
  assert kinds == set(problems.PROBLEMS)
  for kind in kinds:
    assert problems.archs_for(kind), kind
  for arch, builders in problems.ARCHS.items():
    assert set(builders) <= kinds, arch


def test_unknown_task_names_the_available_ones():
  with pytest.raises(ValueError, match="reverse") as e:
    tasks.get_task("revers")
  assert "revers'" in str(e.value)


def test_unknown_option_is_named_with_valid_ones():
  with pytest.raises(ValueError, match=r"\['lenght'\].*length"):
    tasks.get_task("reverse", lenght=3)


@pytest.mark.parametrize("name,options,needle", [
    ("reverse", {"length": 0}, "length=0"),
    ("copy", {"vocab_size": 2.5}, "vocab_size=2.5"),
    ("sort", {"length": 4, "min_length": 5}, "min_length=5"),
    ("associative_recall", {"num_pairs": 5, "num_keys": 4}, "num_keys=4"),
    ("listops", {"min_length": 600}, "min_length=600"),
    ("listops", {"max_depth": 2, "max_args": 2, "min_length": 10}, "reachable"),
    ("listops", {"data_dir": "/nonexistent"}, "basic_train.tsv"),
    ("glimpse", {"length": 8, "num_items": 4}, "num_items=4"),
    ("nadaraya_watson", {"noise_std": -1.0}, "noise_std=-1.0"),
    ("nadaraya_watson", {"x_max": float("nan")}, "x_max=nan"),
    ("digits_vit", {"augment": "yes"}, "augment='yes'"),
    ("digits_set_anomaly", {"set_size": 2}, "set_size=2"),
    ("digits_set_anomaly", {"set_size": 40}, "set_size=40"),
    ("text_lm", {"length": 10**7}, "length=10000000"),
    ("dates", {"seed": -1}, "seed=-1"),
    ("reverse", {"seed": True}, "seed=True"),
])
def test_bad_option_values_raise_naming_the_option(name, options, needle):
  with pytest.raises(ValueError, match=re.escape(needle)):
    tasks.get_task(name, **options)


def test_bad_batch_arguments_raise():
  task = make("reverse")
  with pytest.raises(ValueError, match="'training'.*train"):
    task.batch("training", 0, 2)
  with pytest.raises(ValueError, match="step=-1"):
    task.batch("train", -1, 2)
  with pytest.raises(ValueError, match="batch_size=0"):
    task.batch("train", 0, 0)
  with pytest.raises(ValueError, match="'dev'"):
    task.eval_batches("dev", 2, 2)
  with pytest.raises(ValueError, match="num_examples=0"):
    task.eval_batches("test", 2, 0)


def test_decode_rejects_out_of_vocabulary_ids_and_non_token_tasks():
  task = make("reverse")
  with pytest.raises(ValueError, match="token ids must lie in"):
    task.decode([task.spec()["vocab_size"]])
  with pytest.raises(ValueError, match="no token vocabulary"):
    make("nadaraya_watson").decode([1])


# ------------------------------------------------- determinism, shapes, eval

ALL = sorted(SMALL)


@pytest.mark.parametrize("name", ALL)
def test_batches_are_pure_functions_of_seed_split_step(name):
  a, b = make(name), make(name)
  first = a.batch("train", 5, 4)
  a.batch("valid", 2, 3)  # no hidden state: other calls change nothing
  assert_batches_equal(first, a.batch("train", 5, 4))
  assert_batches_equal(first, b.batch("train", 5, 4))
  main = next(iter(first))  # inputs / queries
  assert not np.array_equal(first[main], a.batch("train", 6, 4)[main])
  assert not np.array_equal(first[main],
                            make(name, seed=1).batch("train", 5, 4)[main])


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_dtypes_follow_the_kind(name):
  task = make(name)
  spec, batch = task.spec(), task.batch("train", 0, 3)
  assert spec["kind"] == task.kind and spec["name"] == name
  ints = {k for k, v in batch.items() if v.dtype == np.int32}
  floats = {k for k, v in batch.items() if v.dtype == np.float32}
  assert ints | floats == set(batch)
  assert all(v.shape[0] == 3 for v in batch.values())
  if task.kind == "seq2seq":
    assert ints == {"inputs", "targets"}
    assert batch["inputs"].shape == (3, spec["input_length"])
    assert batch["targets"].shape == (3, spec["target_length"])
    assert (batch["targets"] != spec["bos_id"]).all()
  elif task.kind == "lm":
    assert (ints, floats) == ({"inputs"}, {"loss_mask"})
    assert batch["inputs"].shape == batch["loss_mask"].shape == (
        3, spec["input_length"])
    assert (batch["loss_mask"][:, -1] == 0).all()
  elif task.kind == "classification":
    assert "labels" in ints
    assert ((0 <= batch["labels"]) & (batch["labels"] < spec["num_classes"])
            ).all()
    if name == "digits_vit":
      assert floats == {"inputs"}
      assert batch["inputs"].shape == (3,) + spec["image_shape"]
    else:
      assert batch["inputs"].shape == (3, spec["input_length"])
  elif task.kind == "regression":
    assert floats == {"queries", "keys", "values", "targets"}
    assert batch["queries"].shape == batch["targets"].shape == (
        3, spec["num_queries"])
    assert batch["keys"].shape == batch["values"].shape == (3, spec["num_keys"])
  elif task.kind == "glimpse":
    assert ints == {"inputs", "context", "labels", "target_position"}
    assert batch["inputs"].shape == (3, spec["input_length"])
  elif task.kind == "set_anomaly":
    assert (ints, floats) == ({"labels"}, {"inputs"})
    assert batch["inputs"].shape == (3, spec["set_size"], spec["feature_dim"])
  token_keys = {"inputs", "targets"} & ints
  for k in token_keys:
    assert batch[k].min() >= 0 and batch[k].max() < spec["vocab_size"]
    assert isinstance(task.decode(batch[k][0]), str)


@pytest.mark.parametrize("name", ALL)
def test_eval_set_is_fixed_and_independent_of_batch_size_and_seed(name):
  task = make(name)
  full = concat(task.eval_batches("valid", 5, 12))
  sizes = [len(b[next(iter(b))]) for b in task.eval_batches("valid", 5, 12)]
  expected = min(12, len(full[next(iter(full))]))
  assert sizes == [5, 5, 2][:len(sizes)] and sum(sizes) == expected
  assert_batches_equal(full, concat(task.eval_batches("valid", 4, 12)))
  longer = concat(task.eval_batches("valid", 50, 100))  # crosses a chunk
  assert_batches_equal(full, {k: v[:len(full[k])] for k, v in longer.items()})
  assert_batches_equal(full, concat(make(name, seed=7).eval_batches(
      "valid", 12, 12)))
  test_set = concat(task.eval_batches("test", 12, 12))
  assert any(not np.array_equal(full[k], test_set[k]) for k in full)


def test_eval_set_of_a_finite_split_is_capped_at_its_size():
  task = make("digits_vit")
  n = task.spec()["split_sizes"]["valid"]
  got = concat(task.eval_batches("valid", 64, 10_000))
  assert len(got["labels"]) == n


def test_equal_length_seed_keys_never_collide():
  # SeedSequence drops trailing zero words: keys of unequal length collide.
  assert (np.random.default_rng([3, 1, 0]).integers(2**62)
          == np.random.default_rng([3, 1]).integers(2**62))
  draws = {base.batch_rng(s, sp, t).integers(2**62)
           for s in range(8) for sp in base.SPLITS for t in range(3)}
  draws |= {base.eval_rng(sp, c).integers(2**62)
            for sp in base.SPLITS for c in range(3)}
  assert len(draws) == 8 * 3 * 3 + 3 * 3


# ------------------------------------------------------ algorithmic labels


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(["reverse", "copy", "sort"]),
       min_length=st.integers(3, 9), extra=st.integers(0, 3),
       vocab=st.integers(6, 40), step=st.integers(0, 10**6))
def test_transduction_targets_by_brute_force(name, min_length, extra, vocab,
                                              step):
  length = min_length + extra
  task = tasks.get_task(name, length=length, vocab_size=vocab,
                        min_length=min_length)
  batch = task.batch("train", step, 8)
  for src, tgt in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
    seq = [t for t in src if t != 0]
    assert min_length <= len(seq) <= length
    assert src[len(seq):] == [0] * (length - len(seq))
    assert all(3 <= t < 3 + vocab for t in seq)
    want = {"reverse": seq[::-1], "copy": seq, "sort": sorted(seq)}[name]
    assert tgt == want + [2] + [0] * (length - len(seq))


def test_reverse_decodes_to_reversed_symbols():
  task = tasks.get_task("reverse", length=5, vocab_size=10)
  batch = task.batch("test", 0, 1)
  src = task.decode(batch["inputs"][0]).split()
  assert task.decode(batch["targets"][0]).split() == src[::-1] + ["<eos>"]


def test_associative_recall_answer_is_the_stored_value():
  task = tasks.get_task("associative_recall", num_pairs=5, num_keys=7,
                        num_values=3)
  batch = task.batch("train", 1, 50)
  for seq, mask in zip(batch["inputs"].tolist(), batch["loss_mask"]):
    pairs = list(zip(seq[0:10:2], seq[1:10:2]))
    keys = [k for k, _ in pairs]
    assert len(set(keys)) == 5 and all(3 <= k < 10 for k in keys)
    assert all(10 <= v < 13 for _, v in pairs)
    assert seq[-1] == dict(pairs)[seq[-2]]
    assert mask.tolist() == [0.0] * 10 + [1.0, 0.0]


# ------------------------------------------------------------ splits disjoint


@pytest.mark.parametrize("name,options,keys", [
    ("reverse", {"length": 5, "vocab_size": 3}, ("inputs",)),
    ("sort", {"length": 4, "vocab_size": 4, "min_length": 2}, ("inputs",)),
    ("associative_recall", {"num_pairs": 2, "num_keys": 3, "num_values": 3},
     ("inputs",)),
    ("glimpse", {"length": 3, "num_keys": 3, "num_items": 3},
     ("inputs", "context")),
    ("listops", {"max_length": 9, "min_length": 3, "max_depth": 3},
     ("inputs",)),
])
def test_splits_never_share_an_example(name, options, keys):
  # Tiny example spaces: independent sampling would overlap almost surely.
  task = tasks.get_task(name, **options)

  def examples(split):
    b = concat([task.batch(split, s, 64) for s in range(3)])
    return rows(np.concatenate([b[k].reshape(len(b[k]), -1) for k in keys],
                               axis=1))

  train, valid, test = (examples(s) for s in base.SPLITS)
  assert train and valid and test
  assert not train & valid and not train & test and not valid & test


def test_content_split_ignores_padding_and_has_the_stated_fractions():
  seqs = np.random.default_rng(0).integers(1, 50, size=(4000, 6))
  padded = np.concatenate([seqs, np.zeros((4000, 3), np.int64)], axis=1)
  ids = base.content_split(seqs)
  np.testing.assert_array_equal(ids, base.content_split(padded))
  np.testing.assert_allclose(np.bincount(ids) / 4000, [0.8, 0.1, 0.1],
                             atol=0.02)


def test_tiny_example_space_raises_instead_of_looping():
  task = tasks.get_task("copy", length=1, vocab_size=2)  # two sequences
  used = set(base.content_split(np.array([[3], [4]])).tolist())
  empty = next(s for i, s in enumerate(base.SPLITS) if i not in used)
  with pytest.raises(ValueError, match="too small"):
    task.batch(empty, 0, 4)


# -------------------------------------------------------------------- listops


def evaluate_tokens(tokens):
  """Independent stack evaluator for ListOps token lists."""
  stack = []
  for tok in tokens:
    if tok == "]":
      args = []
      while not isinstance(stack[-1], str):
        args.append(stack.pop())
      op = stack.pop()
      args = args[::-1]
      stack.append({"[MIN": min(args), "[MAX": max(args),
                    "[MED": int(np.median(args)),
                    "[SM": sum(args) % 10}[op])
    elif tok.startswith("["):
      stack.append(tok)
    else:
      stack.append(int(tok))
  assert len(stack) == 1
  return stack[0]


def lra_to_value_from_string(source):
  """LRA's tuple structure rebuilt from its string, then LRA's to_value."""
  items = source.split()

  def parse(i):
    if items[i] != "(":
      tok = items[i]
      return (int(tok) if tok.isdigit() else tok), i + 1
    left, i = parse(i + 1)
    right, i = parse(i)
    assert items[i] == ")"
    return (left, right), i + 1

  def to_value(t):  # lra_benchmarks/data/listops.py, verbatim logic
    if not isinstance(t, tuple):
      return t
    l, r = to_value(t[0]), to_value(t[1])
    if l in listops.OPERATORS:
      return (l, [r])
    if r == "]":
      return {"[MIN": min, "[MAX": max,
              "[MED": lambda a: int(np.median(a)),
              "[SM": lambda a: np.sum(a) % 10}[l[0]](l[1])
    return (l[0], l[1] + [r])

  tree, end = parse(0)
  assert end == len(items)
  return int(to_value(tree))


def lra_generate_tree(depth, max_depth, max_args, rand):
  """Literal port of LRA's generate_tree (its length and tuple)."""
  r = rand.random() if depth < max_depth else 1
  if r > 0.25:
    return rand.choice(range(10)), 1
  length, values = 2, []
  for _ in range(rand.randint(2, max_args)):
    sub_t, sub_l = lra_generate_tree(depth + 1, max_depth, max_args, rand)
    values.append(sub_t)
    length += sub_l
  return None, length


def test_listops_labels_lengths_and_lra_strings():
  task = make("listops")
  batch = task.batch("train", 0, 24)
  for ids, label in zip(batch["inputs"], batch["labels"]):
    tokens = task.decode(ids).split()
    assert 16 < len(tokens) < 64 and (ids[len(tokens):] == 0).all()
    assert evaluate_tokens(tokens) == label
    assert lra_to_value_from_string(listops.to_lra_string(tokens)) == label
  assert listops.to_lra_string(["[MAX", "2", "9", "]"]) == (
      "( ( ( [MAX 2 ) 9 ) ] )")


def abandoning_generate_tree(rand, max_depth, max_args, min_length,
                             max_length, split):
  """LRA's generate_tree written recursively, each draw abandoned where the
  sampler documents it (``max_length - 1`` tokens reached, or a first
  ``SPLIT_PREFIX`` tokens of another split): ``(tokens, value)`` or None."""
  tokens, checked = [], [split is None]

  def wrong_split():
    checked[0] = True
    ids = listops.VOCAB.encode(" ".join(tokens))
    return listops.example_split(list(ids)) != split

  def node(depth):
    if len(tokens) >= max_length - 1:
      return None
    if not checked[0] and len(tokens) >= listops.SPLIT_PREFIX and (
        wrong_split()):
      return None
    r = rand.random() if depth < max_depth else 1.0
    if r > listops.VALUE_P:
      value = int(rand.random() * 10)
      tokens.append(str(value))
      return value
    num_args = 2 + int(rand.random() * (max_args - 1))
    op = listops.OPERATORS[int(rand.random() * 4)]
    tokens.append(op)
    args = []
    for _ in range(num_args):
      arg = node(depth + 1)
      if arg is None:
        return None
      args.append(arg)
    tokens.append("]")
    return evaluate_tokens([op] + [str(a) for a in args] + ["]"])

  value = node(1)
  if value is None or not min_length < len(tokens) < max_length:
    return None
  if not checked[0] and wrong_split():
    return None
  return tokens, value


@pytest.mark.parametrize("split", [None, 0, 2])
@pytest.mark.parametrize("opts", [(10, 10, 32, 128), (4, 5, 1, 200),
                                  (3, 3, 3, 9)])
def test_listops_draws_are_the_recursive_definitions(opts, split):
  # The explicit-stack sampler consumes the same random numbers, abandons
  # the same draws and returns the same examples as the recursive
  # definition, so a fixed seed keeps giving the same data.
  ours, theirs = random.Random(3), random.Random(3)
  for _ in range(60):
    want = None
    while want is None:
      want = abandoning_generate_tree(theirs, *opts, split)
    ids, value = listops.generate_expression(ours, *opts, split)
    assert (listops.VOCAB.decode(ids).split(), value) == want
  assert ours.random() == theirs.random()


def test_listops_length_distribution_matches_an_lra_port():
  # No effective length window (4 levels of <= 5 args give <= 187 tokens),
  # so the tree shape distribution itself is compared.
  n, opts = 1500, {"max_depth": 4, "max_args": 5, "min_length": 1,
                   "max_length": 200}
  ours = (make("listops", **opts).batch("train", 0, n)["inputs"] > 0).sum(1)
  rand, theirs = random.Random(0), []
  while len(theirs) < n:
    _, length = lra_generate_tree(1, 4, 5, rand)
    if 1 < length < 200:
      theirs.append(length)
  theirs = np.array(theirs)
  for stat in (lambda x: x, lambda x: x == 4, lambda x: x > 20):
    a, b = stat(ours).astype(float), stat(theirs).astype(float)
    se = np.sqrt(a.var() / n + b.var() / n)
    assert abs(a.mean() - b.mean()) < 4 * se


def test_lra_tsv_reader_and_data_dir(tmp_path):
  sources = ["( ( ( [MAX 2 ) 9 ) ] )", "7",
             "( ( ( ( [SM ( ( ( [MIN 4 ) 6 ) ] ) ) 9 ) 8 ) ] )"]
  with open(tmp_path / "basic_train.tsv", "w") as f:  # written by hand
    f.write("Source\tTarget\n")
    for s in sources:
      f.write(f"{s}\t{lra_to_value_from_string(s)}\n")
  got_sources, got_targets = tasks.read_lra_tsv(tmp_path / "basic_train.tsv")
  assert got_sources == sources and got_targets.tolist() == [9, 7, 1]
  assert [listops.to_lra_string(listops.lra_tokens(s)) for s in sources] == (
      sources)
  assert got_targets.dtype == np.int32

  gen = make("listops").batch("valid", 0, 5)
  strings = [listops.to_lra_string(make("listops").decode(r).split())
             for r in gen["inputs"]]
  for split in ("valid", "test"):
    tasks.write_lra_tsv(tmp_path / listops.LRA_FILES[split], strings,
                        gen["labels"])
  read_back = tasks.read_lra_tsv(tmp_path / "basic_val.tsv")
  assert read_back[0] == strings
  np.testing.assert_array_equal(read_back[1], gen["labels"])

  task = tasks.get_task("listops", data_dir=str(tmp_path), max_length=64)
  ev = concat(task.eval_batches("valid", 2, 100))
  np.testing.assert_array_equal(ev["inputs"], gen["inputs"])
  np.testing.assert_array_equal(ev["labels"], gen["labels"])
  tr = task.batch("train", 0, 6)  # two epochs of three examples
  assert sorted(tr["labels"][:3].tolist()) == [1, 7, 9]
  assert sorted(tr["labels"][3:].tolist()) == [1, 7, 9]
  assert task.decode(tr["inputs"][tr["labels"] == 9][0]) == "[MAX 2 9 ]"
  short = tasks.get_task("listops", data_dir=str(tmp_path), max_length=3)
  first = next(short.eval_batches("valid", 1, 1))["inputs"]
  np.testing.assert_array_equal(first, gen["inputs"][:1, :3])  # LRA truncates


def test_lra_tsv_reader_rejects_bad_files(tmp_path):
  bad_header = tmp_path / "a.tsv"
  bad_header.write_text("Input\tLabel\n7\t7\n")
  with pytest.raises(ValueError, match="Source<TAB>Target"):
    tasks.read_lra_tsv(bad_header)
  bad_target = tmp_path / "b.tsv"
  bad_target.write_text("Source\tTarget\n7\tseven\n")
  with pytest.raises(ValueError, match=r"b.tsv:2"):
    tasks.read_lra_tsv(bad_target)


# ---------------------------------------------------------------------- dates

STRPTIME = ["%d %b %Y", "%A, %B %d %Y", "%m/%d/%y", "%Y-%m-%d", "%d.%m.%Y",
            "%B %d, %Y", "%d %B %Y", "%b %d %y", "%a %d %b %Y", "%Y/%m/%d",
            "%d-%b-%Y", "the %d of %B, %Y", "%m/%d/%Y", "%b. %d, %Y",
            "%A %d %B %Y", "%Y%m%d", "%d.%m.%y", "%d %b '%y", "%a, %d %b %Y"]


def parse_every_way(source):
  """Every date any strptime pattern reads from ``source``."""
  plain = re.sub(r"(\d)(st|nd|rd|th)\b", r"\1", source)
  found = set()
  for pattern in STRPTIME:
    try:
      found.add(datetime.datetime.strptime(plain, pattern).date())
    except ValueError:
      pass
  return found


def test_dates_targets_are_the_iso_form_of_the_only_reading():
  task = make("dates")
  batch = task.batch("train", 0, 400)
  for src, tgt in zip(batch["inputs"], batch["targets"]):
    source, target = task.decode(src), task.decode(tgt)
    assert target.endswith("<eos>")
    readings = parse_every_way(source)
    assert len(readings) == 1, (source, readings)
    (day,) = readings
    assert target == day.isoformat() + "<eos>"
    for name in dates.WEEKDAYS:
      if name[:3].lower() in source.lower():
        assert name == dates.WEEKDAYS[day.weekday()], source


def test_dates_every_format_fits_and_parses_over_a_year():
  day = datetime.date(2068, 1, 1)
  for i in range(0, 366, 5):
    d = day + datetime.timedelta(days=i)
    for fmt in dates.FORMAT_NAMES:
      s = dates.render(d, fmt)
      assert len(s) <= dates.INPUT_LENGTH
      assert parse_every_way(s) == {d}, (fmt, s)
      dates.VOCAB.encode(s)
  assert len(dates.FORMAT_NAMES) >= 15


def test_dates_test_dates_never_appear_in_training():
  task = make("dates")

  def days(batches):
    return {task.decode(t) for t in concat(batches)["targets"]}

  train = days(task.batch("train", s, 500) for s in range(4))
  test = days(task.eval_batches("test", 500, 500))
  valid = days(task.eval_batches("valid", 500, 500))
  assert len(train) > 1500 and len(test) > 450
  assert not train & test and not train & valid and not valid & test


# -------------------------------------------------------------------- glimpse


def test_glimpse_label_is_the_item_under_the_context_key():
  task = make("glimpse")
  batch = task.batch("train", 3, 64)
  n_items = task.spec()["num_classes"]
  for ids, ctx, label, pos in zip(batch["inputs"], batch["context"],
                                  batch["labels"], batch["target_position"]):
    keys, items = np.divmod(ids - 3, n_items)
    assert len(set(keys)) == len(keys) == len(set(items))
    assert keys[pos] == ctx and items[pos] == label
    assert list(keys).index(ctx) == pos
  # The best location-only glimpse (for each context, the position that
  # most often holds the answer) finds the target no more often than chance.
  many = task.batch("train", 0, 3000)
  table = np.zeros((task.spec()["num_contexts"], 5))
  np.add.at(table, (many["context"], many["target_position"]), 1)
  best_position_rate = table.max(axis=1).sum() / 3000
  assert best_position_rate < 0.25  # chance is 1/5


# ----------------------------------------------------------- nadaraya-watson


def test_nadaraya_watson_follows_the_formula():
  task = tasks.get_task("nadaraya_watson", num_keys=50, num_queries=40,
                        noise_std=0.5)
  f = lambda x: 2 * np.sin(x) + x
  train = task.batch("train", 0, 200)
  for k in ("queries", "keys"):
    assert (np.diff(train[k], axis=1) >= 0).all()
    assert train[k].min() >= 0 and train[k].max() <= 5
  for x, y in (("keys", "values"), ("queries", "targets")):
    resid = train[y].astype(np.float64) - f(train[x].astype(np.float64))
    assert abs(resid.mean()) < 0.02 and abs(resid.std() - 0.5) < 0.02
  test = next(task.eval_batches("test", 8, 8))
  np.testing.assert_allclose(test["queries"][3], np.linspace(0, 5, 40),
                             rtol=1e-6)
  np.testing.assert_allclose(test["targets"], f(test["queries"]), atol=1e-5)
  np.testing.assert_allclose(task.function(np.array([0.0, np.pi / 2])),
                             [0.0, 2 + np.pi / 2])


# --------------------------------------------------------------------- digits


def digit_lookup():
  from sklearn.datasets import load_digits
  data = load_digits()
  return {(img / 16.0).astype(np.float32).tobytes(): int(c)
          for img, c in zip(data.images, data.target)}


def test_digits_splits_are_disjoint_cover_all_and_labels_match():
  lookup = digit_lookup()
  parts = digits.digits_splits()
  seen = [rows(parts[s][0].reshape(len(parts[s][0]), -1)) for s in base.SPLITS]
  assert not seen[0] & seen[1] and not seen[0] & seen[2]
  assert not seen[1] & seen[2]
  assert sum(map(len, seen)) == len(lookup) == 1797
  assert [len(s) for s in seen] == [1259, 179, 359]
  task = tasks.get_task("digits_vit")
  batch = task.batch("train", 0, 64)
  for img, label in zip(batch["inputs"], batch["labels"]):
    assert lookup[img[..., 0].tobytes()] == label
    assert img[..., 0].tobytes() in seen[0]
  test = concat(task.eval_batches("test", 100, 1000))
  assert [lookup[i[..., 0].tobytes()] for i in test["inputs"]] == (
      test["labels"].tolist())


def test_digits_vit_walks_epochs_and_augments_by_shifting():
  task = tasks.get_task("digits_vit")
  n = task.spec()["split_sizes"]["train"]
  epoch = concat([task.batch("train", s, 100) for s in range(13)])
  first = epoch["inputs"][:n].reshape(n, -1)
  assert len(rows(first)) == n  # every training image exactly once
  aug = tasks.get_task("digits_vit", augment=True).batch("train", 0, 64)
  plain = task.batch("train", 0, 64)
  np.testing.assert_array_equal(aug["labels"], plain["labels"])
  for a, p in zip(aug["inputs"][..., 0], plain["inputs"][..., 0]):
    padded = np.pad(p, 1)
    assert any(np.array_equal(a, padded[i:i + 8, j:j + 8])
               for i in range(3) for j in range(3))


def test_set_anomaly_odd_one_out_from_the_split_only():
  lookup = digit_lookup()
  test_images = rows(digits.digits_splits()["test"][0].reshape(-1, 64))
  task = make("digits_set_anomaly")
  batch = concat(task.eval_batches("test", 50, 200))
  assert np.bincount(batch["labels"], minlength=4).min() > 25
  for members, odd in zip(batch["inputs"], batch["labels"]):
    classes = [lookup[m.tobytes()] for m in members]
    assert all(m.tobytes() in test_images for m in members)
    assert len(rows(members)) == 4  # no image twice
    majority = [c for i, c in enumerate(classes) if i != odd]
    assert len(set(majority)) == 1 and classes[odd] != majority[0]


# -------------------------------------------------------------------- text_lm


def test_text_lm_windows_stay_in_their_region(tmp_path):
  lines = "".join(f"line {i:05d} ünïcode\n" for i in range(2000))
  path = tmp_path / "corpus.txt"
  path.write_text(lines, encoding="utf-8")
  task = tasks.get_task("text_lm", path=str(path), length=40)
  assert task.vocab.symbols == tuple(sorted(set(lines)))
  cut1, cut2 = int(0.9 * len(lines)), int(0.95 * len(lines))
  bounds = {"train": (0, cut1), "valid": (cut1, cut2),
            "test": (cut2, len(lines))}
  for split, (lo, hi) in bounds.items():
    batch = concat([task.batch(split, 0, 20),
                    *task.eval_batches(split, 7, 10)])
    for window in batch["inputs"]:
      s = task.decode(window)
      start = lines.find(s)
      assert lines.count(s) == 1 and lo <= start and start + 40 <= hi
      np.testing.assert_array_equal(task.encode(s), window)
  ev = concat(task.eval_batches("test", 3, 4))
  starts = [lines.find(task.decode(w)) for w in ev["inputs"]]
  assert starts == [cut2 + 40 * i for i in range(4)]
  with pytest.raises(ValueError, match="not in the vocabulary"):
    task.encode("§")


def test_text_lm_builtin_text_is_fixed_and_readable():
  a, b = text.builtin_text(), text.builtin_text()
  assert a == b and len(a) > 100_000
  facts = re.findall(r"(\w+(?: \w+)?) (plus|times) (\w+(?: \w+)?) is "
                     r"(\w+(?: \w+)?)\.", a.lower())
  assert len(facts) > 500
  for x, op, y, z in facts:
    x, y, z = WORDS[x], WORDS[y], WORDS[z]
    assert z == (x + y if op == "plus" else x * y)


WORDS = {text.number_words(i): i for i in range(100)}


def test_text_lm_rejects_unreadable_or_short_files(tmp_path):
  with pytest.raises(ValueError, match="cannot read"):
    tasks.get_task("text_lm", path=str(tmp_path / "missing.txt"))
  short = tmp_path / "short.txt"
  short.write_text("abc" * 20)
  with pytest.raises(ValueError, match="fewer than length=128"):
    tasks.get_task("text_lm", path=str(short))


def test_command_line_shows_every_task(capsys):
  show.main(["--count", "2"])
  out = capsys.readouterr().out
  for name in tasks.list_tasks():
    assert f"{name} [{tasks.TASKS[name].kind}]" in out
  src, tgt = re.search(r"reverse .*\n  '([^']*)' -> '([^']*)'", out).groups()
  assert tgt.split() == src.split()[::-1] + ["<eos>"]


@pytest.mark.parametrize("name", ALL)
def test_example_i_does_not_depend_on_batch_size_or_host_count(name):
  """Examples 0..7 of the training stream are the same at batch sizes 1, 2
  and 4, and two hosts each taking their half of a global batch of 4 see
  the same rows as one host (DESIGN: example i is f(seed, split, i))."""
  task = make(name)
  streams = {bs: concat([make(name).batch("train", s, bs)
                         for s in range(8 // bs)]) for bs in (1, 2, 4)}
  for bs in (2, 4):
    assert_batches_equal(streams[1], streams[bs])
  hosts = [{k: v[h * 2:(h + 1) * 2] for k, v in task.batch(
      "train", 1, 4).items()} for h in range(2)]
  assert_batches_equal(concat(hosts), {k: v[4:] for k, v in
                                       streams[1].items()})
  main = next(iter(streams[1]))
  assert len(rows(streams[1][main].reshape(8, -1))) > 1  # not one repeated
