"""``experiments.figures`` / ``experiments.guide``: every picture is drawn,
and the numbers it shows are right.

The figure command runs once, in ``--fast`` mode, in-process; the numbers it
returns are checked against closed forms and brute-force counts, and the
committed pictures in ``docs/figures`` are checked for presence and size.
"""

import glob
import math
import os

from absl import flags
import matplotlib.image
import numpy as np
import pytest

from experiments import figures
from experiments import guide
from experiments import metrics_io
from experiments.guide import kernel_figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("figures")
  lines = []
  results = guide.make_figures(str(out), fast=True, log=lines.append)
  return out, results, lines


def test_every_figure_is_a_valid_nontrivial_png(fast_run):
  out, results, lines = fast_run
  assert sorted(results) == sorted(guide.FIGURES)
  assert len(lines) == len(guide.FIGURES)
  written = sorted(os.path.basename(p) for p in glob.glob(str(out / "*")))
  assert written == sorted(f"guide_{n}.png" for n in guide.FIGURES)
  for name, facts in results.items():
    assert facts["path"] == str(out / f"guide_{name}.png")
    with open(facts["path"], "rb") as f:
      assert f.read(8) == PNG_SIGNATURE, name
    image = matplotlib.image.imread(facts["path"])
    assert image.shape[0] >= 100 and image.shape[1] >= 200, name
    # Not blank: a real picture has many distinct colours.
    colours = np.unique(image[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 20, (name, len(colours))


def test_masking_before_softmax_equals_zeroing_and_renormalising(fast_run):
  facts = fast_run[1]["masking"]
  assert facts["max_abs_difference"] < 1e-6
  assert facts["empty_rows_masked_softmax_sum"] == 0.0
  assert facts["empty_rows_renormalised_nan"]


def test_scaled_dot_variances_match_theory(fast_run):
  facts = fast_run[1]["scaled_dot"]
  for d in (4, 16, 64, 256):
    # q, k ~ N(0, I_d): var(q·k) = d, var(q·k/√d) = 1 (sampling error only).
    assert facts[f"var_qk_d{d}"] == pytest.approx(d, rel=0.4)
    assert facts[f"var_scaled_d{d}"] == pytest.approx(1.0, rel=0.4)
  assert facts["top_weight_d256"] > 0.8 > 0.4 > facts[
      "top_weight_scaled_d256"]


def test_sinusoidal_similarity_depends_on_offset_only(fast_run):
  facts = fast_run[1]["sinusoidal"]
  assert facts["max_spread_along_diagonals"] < 1e-4
  assert facts["shortest_wavelength"] == pytest.approx(2 * math.pi)


def brute_force_pairs(T, allowed):
  return sum(allowed(t, s) for t in range(T) for s in range(T))


def test_mask_counts_match_brute_force(fast_run):
  facts = fast_run[1]["causal_vs_full"]
  seg = lambda i: 0 if i < 10 else 1
  expected = {
      "full": lambda t, s: True,
      "is_causal=True": lambda t, s: s <= t,
      "key_value_seq_lengths=[12]": lambda t, s: s < 12,
      "causal + local_window_size=(3, 0)": lambda t, s: t - 3 <= s <= t,
      "causal + segment_ids (10 | 6)": lambda t, s: s <= t and seg(s) == seg(
          t),
  }
  for title, allowed in expected.items():
    assert facts[f"nonzero[{title}]"] == brute_force_pairs(16, allowed)


def test_effective_weights_recover_softmax_and_the_local_band():
  T, H = 12, 4
  q, k = kernel_figures.local_queries_keys(T, H)
  q64, k64 = np.asarray(q[0, :, 0], np.float64), np.asarray(k[0, :, 0],
                                                             np.float64)
  logits = q64 @ k64.T / np.sqrt(H)
  reference = np.exp(logits - logits.max(-1, keepdims=True))
  reference /= reference.sum(-1, keepdims=True)
  np.testing.assert_allclose(
      kernel_figures.effective_weights("softmax", q, k), reference, atol=2e-6)
  local = kernel_figures.effective_weights("local(window=2)", q, k)
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  assert np.all(local[np.abs(t - s) > 2] == 0)
  np.testing.assert_allclose(local.sum(-1), 1.0, atol=1e-5)


def test_fast_mode_trains_and_loads_one_run(fast_run):
  facts = fast_run[1]["glimpse"]
  # glimpse_scaled_dot went through train_and_evaluate -> best checkpoint.
  assert 0.0 <= facts["accuracy[scaled_dot]"] <= 1.0
  assert 0.0 < facts["target_mass[scaled_dot]"] <= 1.0
  assert math.isnan(facts["accuracy[location]"])        # initialised only


def test_final_test_metrics_is_the_last_test_record(tmp_path):
  assert metrics_io.final_test_metrics(str(tmp_path)) is None   # no file
  writer = metrics_io.MetricWriter(str(tmp_path), enable_tensorboard=False)
  writer.write(2, "valid", {"accuracy": 0.5})
  assert metrics_io.final_test_metrics(str(tmp_path)) is None   # unfinished
  writer.write(2, "test", {"accuracy": 0.25})
  writer.write(4, "test", {"accuracy": 0.75})
  assert metrics_io.final_test_metrics(str(tmp_path)) == {
      "step": 4, "split": "test", "accuracy": 0.75}


def test_unknown_names_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="unknown figure.*masking"):
    guide.make_figures(str(tmp_path), fast=True, only=["maskingg"])
  with pytest.raises(ValueError, match="unknown run.*reverse"):
    guide.make_figures(str(tmp_path), fast=True, only=["masking"],
                         workdirs={"reverse_task": "x"})


def test_flags_parse_into_make_figures_arguments():
  fv = flags.FlagValues()
  figures.define_flags(fv)
  fv(["figures", "--fast", "--only=masking,heads", "--output_dir=/tmp/x",
      "--dates_workdir=runs/d"])
  config = figures.config_from_flags(fv)
  figures.validate_config(config)
  assert config.to_dict() == dict(
      output_dir="/tmp/x", fast=True, only=("masking", "heads"),
      workdir_root=None, benchmark_json=None, workdirs={"dates": "runs/d"})


def test_committed_figures_exist_and_are_small():
  for name in guide.FIGURES:
    path = os.path.join(ROOT, guide.DEFAULT_OUTPUT_DIR, f"guide_{name}.png")
    assert os.path.exists(path), f"run `python -m experiments.figures` ({path})"
    assert 5_000 < os.path.getsize(path) <= 150_000, (path,
                                                       os.path.getsize(path))
