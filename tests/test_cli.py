"""The command line ``python -m experiments.main``: every mistake ends in one
``error: ...`` line (and at most one line with the fix), exit status 1 and no
traceback, before anything is compiled; explicit values beat ``runlocal``.

Most cases call :func:`experiments.main.main` in-process with an argv (fresh
flags each time, no jax import per case); one runs the real command.
"""

import os
import subprocess
import sys

from absl import flags
import jax
import pytest
from ml_collections import config_flags

from experiments import config_validation
from experiments import main as main_lib
from experiments.data import write_lra_tsv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
TINY = ["--config.runlocal=True", "--config.num_train_steps=2",
        "--config.figures.enabled=False"]


def error_lines(argv, capsys):
  """Runs ``main`` on ``argv``; returns its stderr lines after checking that
  it exited with 1 and printed one ``error:`` line (+ one fix line)."""
  with pytest.raises(SystemExit) as exit_info:
    main_lib.main(["experiments.main", *argv])
  err = capsys.readouterr().err
  assert exit_info.value.code == 1, err
  lines = err.strip().splitlines()
  assert lines and lines[0].startswith("error: "), err
  assert len(lines) <= 2 and "Traceback" not in err, err
  return lines


def parsed(argv):
  """The flags of ``python -m experiments.main *argv``, parsed in-process."""
  argv = main_lib.with_default_config(["experiments.main", *argv])
  flag_values = flags.FlagValues()
  main_lib.define_flags(flag_values, argv)
  main_lib.parse_flags(flag_values, argv)
  return flag_values


@pytest.mark.parametrize("argv, expected", [
    (["--config.model.positonal=rope"],
     "unknown field config.model.positonal; did you mean "
     "config.model.positional?"),
    (["--config.modle.attention=linear"],
     "unknown field config.modle; did you mean config.model?"),
    (["--config.model.attention.window=3"],
     "config.model.attention is a str, not a section"),
    (["--config.num_train_steps=abc"],
     "--config.num_train_steps=abc: invalid literal for int()"),
    (["--config.figures.enabled=maybe"], "--config.figures.enabled=maybe"),
    (["--config=configs/nope.py"], "no config file 'configs/nope.py'"),
    (["--workdri=/tmp/x"], "Unknown command line flag 'workdri'"),
    (["--config.task.options.bogus=1"],
     "task 'reverse': unknown option bogus (known: length, min_length, "
     "vocab_size)"),
    (["--config.task.options.seed=1"], "the task's seed is config.seed"),
    (["--config.model.attention=performer(num_features=-1)"],
     "attention 'performer': option num_features=-1 is invalid"),
], ids=["field", "section", "inside_value", "type", "bool", "config_file",
        "flag", "task_option", "task_seed", "variant_option"])
def test_mistakes_before_training_are_one_line(argv, expected, tmp_path,
                                               capsys):
  workdir = tmp_path / "run"
  lines = error_lines([*TINY, f"--workdir={workdir}", *argv], capsys)
  assert expected in "\n".join(lines)
  assert not workdir.exists()


def test_several_mistakes_are_one_line_each(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main_lib.main(["experiments.main", *TINY, f"--workdir={tmp_path}",
                   "--config.schedule=sawtooth",
                   "--config.model.positional=spiral"])
  assert exit_info.value.code == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[0] == "error: invalid config (2 problems):"
  assert lines[1].strip().startswith("config.schedule='sawtooth'")
  assert lines[2].strip().startswith("config.model.positional='spiral'")
  assert len(lines) == 3


@pytest.mark.parametrize("argv, expected", [
    # Variant options that only fail on the model's real shapes and masks
    # (found by tracing init + loss with jax.eval_shape in validation).
    (["--config.model.attention=linformer(k=8)"],
     "attention 'linformer(k=8)' does not support causal masking"),
    (["--config.model.attention=performer",
      "--config.model.attention_dropout_rate=0.1"],
     "attention 'performer' does not support dropout"),
    ([f"--config={CONFIGS}/reverse_rnn.py", "--config.model.score=bogus"],
     "RNN attention 'bogus' is neither 'additive'"),
    ([f"--config={CONFIGS}/reverse_rnn.py", "--config.model.options.style=x"],
     "unknown style 'x'"),
    ([f"--config={CONFIGS}/listops.py", "--config.model.options.poolng=max"],
     "EncoderClassifier has no option(s) ['poolng']"),
    (["--config.task.options.vocab_size=1"], "could not draw"),
    ([f"--config.mesh.data={len(jax.devices()) + 1}"], "config.mesh: mesh"),
], ids=["causal", "dropout", "rnn_score", "rnn_style", "model_option",
        "vocab", "mesh"])
def test_configs_that_cannot_run_are_refused_before_training(
    argv, expected, tmp_path, capsys):
  workdir = tmp_path / "run"
  lines = error_lines([*TINY, f"--workdir={workdir}", *argv], capsys)
  assert lines[0].startswith("error: invalid config: ")
  assert expected in lines[0]
  assert not workdir.exists()


def test_unreadable_user_files_are_one_line(tmp_path, capsys):
  lra = tmp_path / "lra"
  lra.mkdir()
  for split in ("train", "val", "test"):
    write_lra_tsv(str(lra / f"basic_{split}.tsv"), ["[MAX 2 3 ]"], [3])
  with open(lra / "basic_val.tsv", "a", encoding="utf-8") as f:
    f.write("no tab here\n")
  lines = error_lines([*TINY, f"--config={CONFIGS}/listops.py",
                       f"--config.task.options.data_dir={lra}",
                       f"--workdir={tmp_path / 'a'}"], capsys)
  assert f"{lra / 'basic_val.tsv'}:3:" in lines[0]
  text = tmp_path / "corpus.txt"
  text.write_bytes(b"\xff\xfe not UTF-8")
  lines = error_lines([*TINY, f"--config={CONFIGS}/text_lm.py",
                       f"--config.task.options.path={text}",
                       f"--workdir={tmp_path / 'b'}"], capsys)
  assert "cannot read" in lines[0] and "UTF-8" in lines[0]


def test_broken_config_file_unwritable_workdir_and_stray_arguments(
    tmp_path, capsys):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config():\n  return undefined_name\n")
  lines = error_lines([f"--config={broken}"], capsys)
  assert "NameError" in lines[0] and "(line 2)" in lines[0]
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  lines = error_lines([*TINY, f"--workdir={blocker / 'run'}"], capsys)
  assert lines[0].startswith(f"error: cannot create the workdir {blocker}")
  lines = error_lines([*TINY, "stray"], capsys)
  assert lines[0] == "error: unexpected arguments ['stray']"


def test_the_config_file_is_read_first_wherever_it_is_given():
  assert main_lib.with_default_config(
      ["m", "--config.seed=1", "--config", "configs/copy.py"]) == [
          "m", "--config=configs/copy.py", "--config.seed=1"]
  assert main_lib.with_default_config(["m", "--workdir=w"]) == [
      "m", f"--config={main_lib.DEFAULT_CONFIG}", "--workdir=w"]


def test_task_options_the_config_does_not_declare_are_passed_to_the_task():
  flag_values = parsed([f"--config={CONFIGS}/reverse.py",
                        "--config.task.options.min_length=8"])
  config = config_validation.prepare(flag_values.config)
  assert config.task.options.min_length == 8
  assert config_validation.make_task(config).min_length == 8


def test_explicit_values_beat_runlocal():
  flag_values = parsed(["--config.runlocal=True",
                        "--config.num_train_steps=200",
                        "--config.model.emb_dim=48",
                        "--config.model.num_heads=6"])
  explicit = config_flags.get_override_values(flag_values["config"])
  config = config_validation.prepare(flag_values.config, explicit)
  assert config.num_train_steps == 200
  assert (config.model.emb_dim, config.model.num_heads) == (48, 6)
  assert config.batch_size == config_validation.RUNLOCAL["batch_size"]
  assert config.model.num_layers == 1
  # Without explicit fields (train_and_evaluate called directly) runlocal
  # shrinks everything, as before.
  shrunk = config_validation.prepare(flag_values.config)
  assert shrunk.num_train_steps == config_validation.RUNLOCAL[
      "num_train_steps"]
  assert (shrunk.model.emb_dim, shrunk.model.num_heads) == (32, 4)


def _command(*argv):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.main", *argv],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)


def test_command_line_misspelled_field_is_one_line(tmp_path):
  proc = _command("--config.model.positonal=rope",
                  f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 1
  assert proc.stderr.strip() == (
      "error: invalid config: unknown field config.model.positonal; did "
      "you mean config.model.positional?")


def test_main_passes_explicit_values_that_beat_runlocal(tmp_path,
                                                       monkeypatch):
  """main hands the command line's overrides to train_and_evaluate, whose
  prepare keeps them (runlocal alone would run 20 steps)."""
  seen = {}

  def fake_train(config, workdir, *, explicit=()):
    seen["config"] = config_validation.prepare(config, explicit)
    seen["workdir"] = workdir

  monkeypatch.setattr(main_lib.train, "train_and_evaluate", fake_train)
  main_lib.main(["experiments.main", "--config.runlocal=True",
                 "--config.num_train_steps=200", f"--workdir={tmp_path}"])
  assert seen["workdir"] == str(tmp_path)
  assert seen["config"].num_train_steps == 200
  assert seen["config"].batch_size == config_validation.RUNLOCAL["batch_size"]
