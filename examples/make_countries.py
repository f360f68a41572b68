"""Build entity-level multiple-choice questions and training passages from the testbed's country facts.

    python examples/make_countries.py ../shared/testbed/country_json > examples/data/countries.jsonl

One record per (country, attribute): ``prompt`` ("The capital of Peru is"), 8 ``choices`` (the answer
and 7 distractors drawn, without replacement and deterministically, from other countries' answers to
the same attribute; near-duplicates of the answer by case/punctuation are dropped, as in section 3.1
of "Will it Merge?"), ``answer`` (its index), and ``text``: a short passage about the country that an
expert trains on. Source: drmonkeyninja/country.json (MIT), as shipped in the testbed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

ATTRS = {  # attribute: (file, field, prompt template, sentence template)
    "capital": ("country-capital-city.json", "city", "The capital of {c} is", "The capital of {c} is {v}."),
    "continent": ("country-continent.json", "continent", "{c} is a country in", "{c} is a country in {v}."),
    "currency": ("country-currency-name-and-code.json", "name", "The currency of {c} is the",
                 "The currency of {c} is the {v}."),
    "dish": ("country-by-national-dish.json", "dish", "The national dish of {c} is", "The national dish of {c} is {v}."),
    "government": ("country-government-type.json", "government", "The government of {c} is a",
                   "The government of {c} is a {v}."),
}


def norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", s.lower())


def load(folder: Path) -> dict[str, dict[str, str]]:
    facts: dict[str, dict[str, str]] = {}
    for attr, (fname, field, _, _) in ATTRS.items():
        for row in json.loads((folder / fname).read_text(encoding="utf-8")):
            v = row.get(field)
            if isinstance(v, str) and v.strip():
                facts.setdefault(row["country"].strip(), {})[attr] = " ".join(v.split())
    return facts


def build(folder: Path, attrs: list[str], countries: list[str] | None, n_choices: int = 8, seed: int = 0):
    facts = load(folder)
    names = sorted(c for c in facts if all(a in facts[c] for a in attrs))
    if countries:
        names = [c for c in names if c in countries]
    rng = random.Random(seed)
    for c in names:
        passage = " ".join(ATTRS[a][3].format(c=c, v=facts[c][a]) for a in ATTRS if a in facts[c])
        for a in attrs:
            gold = facts[c][a]
            pool = sorted({facts[o][a] for o in facts if o != c and a in facts[o]
                           and norm(facts[o][a]) != norm(gold)})
            if len(pool) < n_choices - 1:
                continue
            choices = rng.sample(pool, n_choices - 1)
            k = rng.randrange(n_choices)
            choices.insert(k, gold)
            yield {"id": f"{norm(c)}-{a}", "task": f"country-{a}", "entity": c, "prompt": ATTRS[a][2].format(c=c),
                   "choices": [" " + x for x in choices], "answer": k, "text": passage}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--attrs", default="capital", help="comma-separated attributes: " + ",".join(ATTRS))
    ap.add_argument("--countries", default=None, help="comma-separated subset of countries")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    countries = args.countries.split(",") if args.countries else None
    for rec in build(args.folder, args.attrs.split(","), countries, seed=args.seed):
        sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
