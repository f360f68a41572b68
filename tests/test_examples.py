"""The example-data builders: the committed countries.jsonl is exactly what its builder makes from the
installed country packages (countryinfo, babel), every record is a valid multiple-choice question with
one right answer and correctly spelled names; the GLUE builder gives valid multiple-choice records
(it reads ../shared/testbed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from mergetool.examples import check_examples

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT.parent / "shared" / "testbed"
COUNTRIES = ROOT / "examples" / "data" / "countries.jsonl"
BUILDER_PACKAGES = ("countryinfo", "babel")


def run(*args) -> list[dict]:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
    return [json.loads(x) for x in r.stdout.splitlines()]


def norm(s: str) -> str:  # case-, accent- and punctuation-blind, as the builder's near-duplicate test
    s = unicodedata.normalize("NFKD", s.casefold())
    return "".join(ch for ch in s if ch.isalnum() and not unicodedata.combining(ch))


@pytest.fixture(scope="module")
def committed() -> list[dict]:
    return [json.loads(x) for x in COUNTRIES.read_text(encoding="utf-8").splitlines()]


@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in BUILDER_PACKAGES),
                    reason="the country builder needs countryinfo and babel: pip install -e .[examples] "
                           "(countryinfo needs Python 3.11+)")
def test_countries_jsonl_is_reproducible(committed):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "make_countries.py"), "--attrs", "capital,currency"],
                       capture_output=True, check=True)
    assert r.stdout == COUNTRIES.read_bytes()  # byte for byte: same command, same file


def test_countries_records_are_valid(committed):
    exs = check_examples(committed, "countries")
    assert {e.task for e in exs} == {"country-capital", "country-currency"}
    assert len(COUNTRIES.read_bytes()) < 1 << 20
    for e in exs:
        r = e.rec
        assert e.kind == "mc" and len(r["choices"]) == 8 and 0 <= r["answer"] < 8, r["id"]
        assert r["id"] == f"{norm(r['entity'])}-{r['task'].removeprefix('country-')}"
        assert all(c.startswith(" ") and c.strip() == c[1:] for c in r["choices"]), r["id"]
        # one right answer: no two choices are near-duplicates (case, accents, punctuation)
        assert len({norm(c) for c in r["choices"]}) == 8, r["id"]
        # the passage states the right answer
        assert r["choices"][r["answer"]].strip() in r["text"], r["id"]
    per_entity = {}
    for r in committed:
        per_entity.setdefault(r["entity"], set()).add(r["task"])
    assert all(t == {"country-capital", "country-currency"} for t in per_entity.values())


def test_countries_names_are_whole_and_current(committed):
    """The old source cut names at the first non-ASCII letter (" Bras" for Brasília) and had dated facts
    (Australia: Sydney); the right answers are whole, accented where they should be, and current."""
    gold = {(r["entity"], r["task"]): r["choices"][r["answer"]] for r in committed}
    capitals = {"Brazil": " Brasília", "Colombia": " Bogotá", "Cameroon": " Yaoundé", "Iceland": " Reykjavík",
                "Australia": " Canberra", "Paraguay": " Asunción", "Faroe Islands": " Tórshavn",
                "São Tomé and Príncipe": " São Tomé", "Kazakhstan": " Astana", "Bulgaria": " Sofia",
                "Greece": " Athens", "Dominica": " Roseau"}
    for country, capital in capitals.items():
        assert gold[country, "country-capital"] == capital, country
    assert gold["Brazil", "country-currency"] == " Brazilian Real"
    assert gold["Croatia", "country-currency"] == " Euro"  # since 2023
    every = {c for r in committed for c in r["choices"]}
    # no truncated names: nothing shorter than 3 letters, and none of the old source's stumps
    assert min(len(c.strip()) for c in every) >= 3
    stumps = {" Bras", " Santaf", " Bogot", " Yaound", " Reykjav", " Asunci", " T", " S", " Sydney"}
    assert not every & stumps


@pytest.mark.skipif(not TESTBED.exists(), reason="needs ../shared/testbed beside the repository")
def test_glue_records_are_valid():
    rows = run(str(ROOT / "examples" / "make_glue.py"), str(TESTBED / "glue"), "--per-split", "20")
    exs = check_examples(rows, "glue")
    assert {e.task for e in exs} == {"sst2", "rte", "wnli", "mrpc", "cola"}
    assert {e.rec["split"] for e in exs} == {"train", "dev"}
    assert all(e.kind == "mc" and e.rec["text"].endswith(e.rec["choices"][e.rec["answer"]]) for e in exs)
