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
    assert res["knots"]["rel_err"] < 1e-4 and res["knots"]["speedup"] > 1
    assert res["ties"]["merged_delta_rel_diff"] < 1e-2  # float32 inputs: only near-ties may differ
    assert res["ties"]["mergetool"]["max_rss_mb"] > 0
