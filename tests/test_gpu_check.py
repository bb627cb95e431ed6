"""experiments/gpu_check.py --dry_run: both parts run and write their files."""

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_correctness_and_bench(tmp_path):
  # chunked only: the interpreted Pallas kernel is tested (and its
  # slow compile paid) in tests/test_pallas.py.
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.gpu_check", "--dry_run",
       "--impls=chunked", "--noplots",
       f"--output_dir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "correctness.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["impl"], r["status"]) for r in rows] == [("chunked", "ok")]
  # chunked is an independent kernel: its error against xla is real, small.
  assert 0 <= float(rows[0]["fwd_err"]) < 1e-5
  with open(tmp_path / "bench" / "results.csv") as f:
    bench = list(csv.DictReader(f))
  assert {r["variant"] for r in bench} == {"attn_auto", "chunked"}
  assert all(r["status"] == "ok" and float(r["time_median_s"]) > 0
             for r in bench)


def test_spent_budget_skips_the_benchmark_cells(tmp_path):
  # --budget_s=1e-9 is spent before part 2 begins: every cell is recorded
  # as skipped (and part 1 still runs in full).
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.gpu_check", "--dry_run",
       "--impls=xla", "--noplots", "--budget_s=1e-9",
       f"--output_dir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "correctness.csv") as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["ok"]
  with open(tmp_path / "bench" / "results.csv") as f:
    bench = list(csv.DictReader(f))
  assert bench and all(r["status"].startswith("skipped: time budget")
                       for r in bench)
