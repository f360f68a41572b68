"""The merge benchmark at CPU size: it runs, and its accuracy checks hold (speed figures are GPU's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_small_merge_benchmark(tmp_path):
    pytest.importorskip("mergekit")
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_merge.py"), "--small", "--device", "cpu",
                        "--model-dtype", "float32", "--workdir", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    # the speed-up is reported, not asserted: a clock on a shared machine is no test (the figures are GPU's)
    assert res["knots"]["rel_err"] < 1e-4 and res["knots"]["speedup"] > 0
    assert res["ties"]["merged_delta_rel_diff"] < 1e-2  # float32 inputs: only near-ties may differ
    assert res["ties"]["mergetool"]["max_rss_mb"] > 0


def test_small_eval_train_benchmark(tiny_lm, tmp_path):
    """The eval/train benchmark at toy size: it runs both peers, and agreement is what it reports."""
    pytest.importorskip("lm_eval")
    out = tmp_path / "e.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_eval_train.py"), "--tokenizer",
                        str(tiny_lm), "--small", "--device", "cpu", "--items", "24", "--shots", "2", "--experts", "4",
                        "--steps", "3", "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["eval"]["same_prediction"] >= 22 and res["eval"]["speedup"] > 0
    assert abs(res["eval"]["acc_ours"] - res["eval"]["acc_lm_eval"]) <= 2 / 24
    assert res["train"]["experts"] == 4 and res["train"]["mean_final_loss_ours"] > 0


def test_small_updates_benchmark(tiny_lm, tmp_path):
    """Many updates batched vs a loop of apply/evaluate/restore, at toy size (both shapes): identical
    predictions."""
    out = tmp_path / "u.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_updates.py"), "--model", str(tiny_lm),
                        "--updates", "4", "--items", "12", "--device", "cpu", "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["same_prediction"] == res["evaluations"] == 48 and res["max_logprob_diff"] < 1e-4
    # the experiments' shape (q, k, v, o of the upper layers)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_updates.py"), "--model", str(tiny_lm),
                        "--updates", "4", "--items", "12", "--device", "cpu", "--shape", "experiment",
                        "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["shape"] == "experiment" and res["same_prediction"] == 48 and res["max_logprob_diff"] < 1e-4


def test_small_diagnose_benchmark(tmp_path):
    """All pairs at once vs a per-pair loop over dense ΔW, at toy size: the same values, the spectral family's
    Gram metrics included."""
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_diagnose.py"), "--small", "--plain-pairs", "4",
                        "--device", "cpu", "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["pairs"] == 28 and res["max_rel_diff"] < 1e-5
    assert {"spectral_gap", "weight_space_angle", "pair_effective_rank"} <= set(res["max_rel_diff_by_metric"])
    assert res["with_spectra_ratio"] >= 1  # (conflicts + family) / conflicts: a ratio of two times, reported


def test_small_score_benchmark(tiny_lm, tmp_path):
    """Shared trials vs the plain loop on the same partners, at toy size: the same outcomes."""
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_score.py"), "--model", str(tiny_lm), "--pool",
                        "12", "--partners", "3", "--trials", "2", "--plain-pairs", "6", "--device", "cpu", "--json",
                        str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["same_outcome_on_timed_pairs"] == res["plain_pairs_timed"] == 6 and res["merges_shared"] == 6


def test_gpu_script_dry_run(tiny_lm, tmp_path):
    """benchmarks/gpu.sh (BENCHMARKS.md's GPU backlog in one run) at toy sizes on the CPU: every step runs to
    its end and writes its JSON, and the run's record lists them all, so the script cannot rot before a GPU comes."""
    pytest.importorskip("ray")
    pytest.importorskip("lm_eval")
    out = tmp_path / "results"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--small", "--model",
                        str(tiny_lm), "--out", str(out)], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHON": sys.executable})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    (run,) = out.glob("gpu-run-cpu-dryrun-*.json")
    steps = json.loads(run.read_text())["steps"]
    assert [s["step"] for s in steps] == ["eval-train", "updates", "score", "score-paper", "diagnose", "subspace",
                                          "ray", "candidates", "pytest -m gpu"]
    assert all(s["rc"] == 0 for s in steps), steps
    for s in steps[:-1]:
        assert json.loads(Path(s["json"]).read_text()), s
