"""The example-data builders: the committed countries.jsonl is exactly what its builder makes from the
testbed, and the GLUE builder gives valid multiple-choice records (both read ../shared/testbed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mergetool.evaluate import check_examples

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT.parent / "shared" / "testbed"

pytestmark = pytest.mark.skipif(not TESTBED.exists(), reason="needs ../shared/testbed beside the repository")


def run(*args) -> list[dict]:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
    return [json.loads(x) for x in r.stdout.splitlines()]


def test_countries_jsonl_is_reproducible():
    rows = run(str(ROOT / "examples" / "make_countries.py"), str(TESTBED / "country_json"),
               "--attrs", "capital,continent,currency")
    committed = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    assert rows == committed
    exs = check_examples(rows, "countries")
    assert all(e.kind == "mc" and len(e.rec["choices"]) == 8 for e in exs)
    for r in rows:  # the distractors are never near-duplicates of the answer
        gold = r["choices"][r["answer"]].strip().lower()
        assert sum(c.strip().lower() == gold for c in r["choices"]) == 1


def test_glue_records_are_valid():
    rows = run(str(ROOT / "examples" / "make_glue.py"), str(TESTBED / "glue"), "--per-split", "20")
    exs = check_examples(rows, "glue")
    assert {e.task for e in exs} == {"sst2", "rte", "wnli", "mrpc", "cola"}
    assert {e.rec["split"] for e in exs} == {"train", "dev"}
    assert all(e.kind == "mc" and e.rec["text"].endswith(e.rec["choices"][e.rec["answer"]]) for e in exs)
