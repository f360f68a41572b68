"""Build entity-level multiple-choice questions and training passages about countries.

    python examples/make_countries.py --attrs capital,currency > examples/data/countries.jsonl
    python examples/make_countries.py --attrs capital,currency,region,language,tld > countries-more.jsonl

One record per (country, attribute): ``prompt`` ("The capital of Peru is"), 8 ``choices`` (the answer
and 7 distractors drawn, without replacement and deterministically from ``--seed`` and the record's id,
from other countries' answers to the same attribute; near-duplicates of any right answer by case,
accents and punctuation are dropped, as in section 3.1 of "Will it Merge?"), ``answer`` (its index),
and ``text``: a short passage stating the country's facts, which a per-example expert trains on.

Sources, both installed from PyPI (``pip install -e .[examples]``), nothing downloaded at run time:

- countryinfo (MIT): names, capitals, UN M49 regions, top-level domains; the few facts it has dated
  or unaccented are corrected in FIXES below, and entities without one clear capital are in NO_CAPITAL.
- babel (BSD-3-Clause; its data is the Unicode CLDR, Unicode License v3): each territory's legal
  tender on DATE, currency names, official languages and language names.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import re
import sys
import unicodedata
from collections import Counter

from babel import Locale
from babel.languages import get_official_languages
from babel.numbers import get_currency_name, get_territory_currencies
from countryinfo import CountryInfo

DATE = datetime.date(2025, 1, 1)  # legal tenders as of this day (fixed: the output must not change with time)

# attribute: (prompt, sentence); {c} is the country, {v} the answer; sentences form the passage, in this order
ATTRS = {
    "capital": ("The capital of {c} is", "The capital of {c} is {v}."),
    "region": ("{C} is a country in", "{C} is a country in {v}."),
    "currency": ("The currency of {c} is the", "The currency of {c} is the {v}."),
    "language": ("The official language of {c} is", "The official language of {c} is {v}."),
    "tld": ("The internet country code top-level domain of {c} is",
            "The internet country code top-level domain of {c} is {v}."),
}
LANGUAGE_OF_SEVERAL = ("An official language of {c} is", "An official language of {c} is {v}.")

FIXES = {  # ISO alpha-2: corrections to countryinfo 1.0.1 (dated or unaccented facts)
    "IS": {"capital": "Reykjavík"},          # unaccented in the package
    "KZ": {"capital": "Astana"},             # renamed back from Nur-Sultan in 2022
    "BI": {"capital": "Gitega"},             # political capital since 2019 (Bujumbura: economic capital)
    "PF": {"capital": "Papeete"},            # the package has the Tahitian spelling Papeetē
    "SZ": {"name": "Eswatini"},              # renamed from Swaziland in 2018
    "MK": {"name": "North Macedonia"},       # renamed from the Republic of Macedonia in 2019
    "VA": {"name": "Vatican City", "capital": "Vatican City"},  # the package has "Vatican City State", a list
}
MACRO = {"nb": "no", "nn": "no"}  # Norwegian Bokmål and Nynorsk are both "Norwegian" (one right answer, not two)
NO_CAPITAL = {  # ISO alpha-2: entities whose capital question would be ambiguous; their other facts are kept
    "PS": "disputed (Jerusalem proclaimed, Ramallah administrative)",
    "BQ": "three islands, three capitals",
    "HK": "a special administrative region; the package's 'City of Victoria' is no longer in use",
}


def norm(s: str) -> str:
    """Case-, accent- and punctuation-blind key: two values with one key are near-duplicates."""
    s = unicodedata.normalize("NFKD", s.casefold())
    return "".join(ch for ch in s if ch.isalnum() and not unicodedata.combining(ch))


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", norm(s))


def _countries() -> dict[str, dict]:
    """countryinfo's records by ISO alpha-2, one per code (the fullest where the package has two),
    limited to codes CLDR names (drops the package's defunct Netherlands Antilles, Serbia and Montenegro
    and its UK nations without a code)."""
    cldr = Locale("en").territories
    best: dict[str, dict] = {}
    for rec in sorted(CountryInfo.all().values(), key=lambda r: r.get("name") or ""):
        a2 = (rec.get("ISO") or {}).get("alpha2")
        if a2 in cldr and (a2 not in best or len(rec) > len(best[a2])):
            best[a2] = rec
    return best


def _one(v) -> str | None:
    if isinstance(v, list):
        v = v[0] if len(v) == 1 else None
    return " ".join(v.split()) if isinstance(v, str) and v.strip() else None


def load() -> dict[str, dict[str, tuple[str, set[str]]]]:
    """{country name: {attribute: (answer, every right answer)}}; a missing or unclear value is left out."""
    en = Locale("en")
    facts: dict[str, dict[str, tuple[str, set[str]]]] = {}
    for a2, rec in sorted(_countries().items()):
        fix = FIXES.get(a2, {})
        name = fix.get("name") or _one(rec.get("name"))
        if not name:
            continue
        f: dict[str, tuple[str, set[str]]] = {}
        cap = fix.get("capital") or _one(rec.get("capital"))
        if cap and a2 not in NO_CAPITAL:
            f["capital"] = (cap, {cap})
        region = _one(rec.get("intermediateregion")) or _one(rec.get("subregion"))
        if region == "Channel Islands":  # an M49 intermediate region of Northern Europe, not a peer of the others
            region = _one(rec.get("subregion"))
        if region:
            region = "the Caribbean" if region == "Caribbean" else region
            f["region"] = (region, {region})
        codes = get_territory_currencies(a2, DATE, tender=True)
        if codes:  # the country's own currency (ISO 4217 codes start with its alpha-2) before a borrowed one
            main = next((c for c in codes if c.startswith(a2)), codes[0])
            f["currency"] = (get_currency_name(main, locale="en"),
                             {get_currency_name(c, locale="en") for c in codes})
        lcodes = [MACRO.get(c.split("_")[0], c.split("_")[0]) for c in get_official_languages(a2)]
        langs = list(dict.fromkeys(en.languages.get(c) for c in lcodes))
        if langs and all(langs):
            f["language"] = (langs[0], set(langs))
        tlds = [t for t in rec.get("tld") or [] if isinstance(t, str) and re.fullmatch(r"\.[a-z]{2}", t)]
        if tlds:
            f["tld"] = (tlds[0], set(tlds))
        facts[name] = f
    return _canonical(facts)


def _canonical(facts):
    """Spell each value one way: values that are near-duplicates take their most common spelling."""
    for a in ATTRS:
        counts = Counter(f[a][0] for f in facts.values() if a in f)
        spelling: dict[str, str] = {}
        for v, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])):
            spelling.setdefault(norm(v), v)
        for f in facts.values():
            if a in f:
                gold, ok = f[a]
                f[a] = (spelling[norm(gold)], ok)
    return facts


def _prompt_and_sentence(a: str, right: set[str]) -> tuple[str, str]:
    return LANGUAGE_OF_SEVERAL if a == "language" and len(right) > 1 else ATTRS[a]


def passage(c: str, f: dict[str, tuple[str, set[str]]]) -> str:
    mid = "the " + c[4:] if c.startswith("The ") else c
    return " ".join(_prompt_and_sentence(a, f[a][1])[1].format(c=mid, C=c, v=f[a][0]) for a in ATTRS if a in f)


def build(attrs: list[str], countries: list[str] | None = None, n_choices: int = 8, seed: int = 0):
    for a in attrs:
        if a not in ATTRS:
            raise SystemExit(f"make_countries.py: unknown attribute {a!r}; choose from {','.join(ATTRS)}")
    facts = load()
    names = sorted((c for c in facts if all(a in facts[c] for a in attrs)), key=slug)
    if countries:
        names = [c for c in names if c in countries]
    ids = [slug(c) for c in names]
    assert len(set(ids)) == len(ids), "two countries share an id"
    for c in names:
        f = facts[c]
        text = passage(c, f)
        mid = "the " + c[4:] if c.startswith("The ") else c
        for a in attrs:
            gold, right = f[a]
            wrong = {norm(x) for x in right | {gold}}
            pool: dict[str, str] = {}
            for o in sorted(facts, key=slug):
                v = facts[o].get(a, (None,))[0]
                if o != c and v is not None and norm(v) not in wrong:
                    pool.setdefault(norm(v), v)
            if len(pool) < n_choices - 1:
                continue
            rid = f"{slug(c)}-{a}"
            rng = random.Random(f"{seed}:{rid}")
            choices = rng.sample(sorted(pool.values()), n_choices - 1)
            k = rng.randrange(n_choices)
            choices.insert(k, gold)
            prompt = _prompt_and_sentence(a, right)[0].format(c=mid, C=c)
            yield {"id": rid, "task": f"country-{a}", "entity": c, "prompt": prompt,
                   "choices": [" " + x for x in choices], "answer": k, "text": text}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attrs", default="capital,currency", help="comma-separated attributes: " + ",".join(ATTRS))
    ap.add_argument("--countries", default=None, help="comma-separated subset of countries (their names)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    countries = args.countries.split(",") if args.countries else None
    for rec in build(args.attrs.split(","), countries, seed=args.seed):
        sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
