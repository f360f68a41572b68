"""Build entity-level multiple-choice questions and training passages about countries.

    python examples/make_countries.py --attrs capital,currency > examples/data/countries.jsonl
    python examples/make_countries.py --attrs capital,currency --passage prose > examples/data/countries-prose.jsonl
    python examples/make_countries.py --attrs capital,currency,region,language,tld > countries-more.jsonl

One record per (country, attribute): ``prompt`` ("The capital of Peru is"), 8 ``choices`` (the answer
and 7 distractors drawn, without replacement and deterministically from ``--seed`` and the record's id,
from other countries' answers to the same attribute; near-duplicates of any right answer by case,
accents and punctuation are dropped, as in section 3.1 of "Will it Merge?"), ``answer`` (its index),
and ``text``: a passage stating the country's facts, which a per-example expert trains on. Two kinds of
passage (``--passage``): ``sentence`` (the default), the five facts of ATTRS in plain sentences, the first
of them the capital question's own sentence ("The capital of Peru is Lima."); ``prose``, a longer text about
the country (its region, area, neighbours, people, languages, divisions, telephone and internet codes,
time zone) in which the capital and the currency are stated in other words ("Lima serves as its
capital.", "Prices there are paid in the Peruvian Sol."), in an order drawn from the country's id, never first:
the condition closer to PopQA's Wikipedia passages.

Beyond the five passage facts, the questions of MORE (continent, calling code, demonym, a land neighbour,
ISO alpha-3 and currency codes, time zone, the country of a capital, the French name) are asked at task
level (examples/make_tasks.py); their records' ``text`` is the same passage.

Sources, both installed from PyPI (``pip install -e .[examples]``), nothing downloaded at run time:

- countryinfo (MIT): names, capitals, UN M49 regions, top-level domains, calling codes, demonyms, land
  borders, ISO codes, areas, time zones, provinces, French names; the few facts it has dated or
  unaccented are corrected in FIXES below, and entities without one clear capital are in NO_CAPITAL.
- babel (BSD-3-Clause; its data is the Unicode CLDR, Unicode License v3): each territory's legal
  tender on DATE, currency names and codes, official languages and language names.
"""

from __future__ import annotations

import argparse
import ast
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
# questions asked beyond the passage's five: attribute -> (prompt, choices); {k} is the country's capital
MORE = {
    "continent": ("{C} is on the continent of", 6),  # the six inhabited continents: all of them are the choices
    "calling-code": ("The international calling code of {c} is", 8),
    "demonym": ("The demonym of {c} is", 8),
    "borders": ("{C} shares a land border with", 8),
    "alpha3": ("The ISO 3166-1 alpha-3 code of {c} is", 8),
    "currency-code": ("The ISO 4217 code of the currency of {c} is", 8),
    "timezone": ("The time zone of {c} is", 8),
    "capital-of": ("{k} is the capital of", 8),
    "name-fr": ("In French, {c} is called", 8),
}
CONTINENT = {"Africa": "Africa", "Asia": "Asia", "Europe": "Europe", "Oceania": "Oceania"}
NORTH_AMERICA = {"Northern America", "Central America", "Caribbean"}

# the prose passages' ways of stating the capital and the currency, none of them the question's sentence
CAPITAL_SAID = ["Its capital city is {v}.", "{v} is its capital.", "{v} serves as its capital.",
                "It has its capital at {v}."]  # never "seat of government": not the capital everywhere (The Hague)
CURRENCY_SAID = ["Prices there are paid in the {v}.", "The {v} is its legal tender.",
                 "Its money is the {v}.", "Shops there take payment in the {v}."]

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


def _mid(c: str) -> str:
    """The name inside a sentence: "The Gambia" -> "the Gambia"."""
    return "the " + c[4:] if c.startswith("The ") else c


def load() -> dict[str, dict[str, tuple[str, set[str]]]]:
    """{country name: {attribute: (answer, every right answer)}}; a missing or unclear value is left out.
    The record's own fields used by the prose passage are kept under "_rec" (countryinfo's record)."""
    en = Locale("en")
    facts: dict[str, dict[str, tuple[str, set[str]]]] = {}
    countries = _countries()
    names = {a2: FIXES.get(a2, {}).get("name") or _one(rec.get("name")) for a2, rec in countries.items()}
    by_a3 = {(rec.get("ISO") or {}).get("alpha3"): a2 for a2, rec in countries.items()}
    for a2, rec in sorted(countries.items()):
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
        _more(f, a2, rec, names, by_a3)
        f["_rec"] = rec  # type: ignore[assignment]
        facts[name] = f
    _capital_of(facts)
    return _canonical(facts)


def _more(f, a2: str, rec: dict, names: dict[str, str], by_a3: dict[str, str]) -> None:
    """The facts of MORE that one record holds (the country of a capital needs all: _capital_of)."""
    cont = _one(rec.get("region"))
    if cont in CONTINENT:
        f["continent"] = (CONTINENT[cont], {CONTINENT[cont]})
    elif cont == "Americas":
        sub = _one(rec.get("intermediateregion")) or _one(rec.get("subregion"))
        v = "North America" if sub in NORTH_AMERICA else "South America" if sub == "South America" else None
        if v:
            f["continent"] = (v, {v})
    codes = [c for c in rec.get("callingCodes") or [] if isinstance(c, str) and c.isdigit()]
    if codes:  # North American numbering plan: +1 and the area code
        said = ["+1 " + c[1:] if len(c) == 4 and c[0] == "1" else "+" + c for c in codes]
        f["calling-code"] = (said[0], set(said))
    dem = _one(rec.get("demonym"))
    if dem:
        f["demonym"] = (dem, {dem})
    nb = sorted(names[by_a3[x]] for x in rec.get("borders") or [] if by_a3.get(x) in names and names[by_a3[x]])
    if nb:  # one neighbour, drawn from the country's code; every neighbour is a right answer
        f["borders"] = (_mid(random.Random(f"borders:{a2}").choice(nb)), {_mid(x) for x in nb})
    a3 = (rec.get("ISO") or {}).get("alpha3")
    if isinstance(a3, str) and re.fullmatch(r"[A-Z]{3}", a3):
        f["alpha3"] = (a3, {a3})
    codes = get_territory_currencies(a2, DATE, tender=True)
    if codes:
        main = next((c for c in codes if c.startswith(a2)), codes[0])
        f["currency-code"] = (main, set(codes))
    tz = rec.get("timezones") or []
    if len(tz) == 1 and re.fullmatch(r"UTC([+-]\d\d:\d\d)?", tz[0]):  # one zone: one right answer
        f["timezone"] = (tz[0], {tz[0]})
    fr = _one((rec.get("translations") or {}).get("fr"))
    if fr and norm(fr) != norm(names[a2] or ""):  # a French name that is the English one asks nothing
        f["name-fr"] = (fr, {fr})


def _capital_of(facts) -> None:
    """The country of each capital; a capital shared by several entities (Kingston) has them all as answers."""
    of: dict[str, set[str]] = {}
    for c, f in facts.items():
        if "capital" in f:
            of.setdefault(norm(f["capital"][0]), set()).add(_mid(c))
    for c, f in facts.items():
        if "capital" in f:
            f["capital-of"] = (_mid(c), of[norm(f["capital"][0])])


def _canonical(facts):
    """Spell each value one way: values that are near-duplicates take their most common spelling."""
    for a in [*ATTRS, *MORE]:
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
    return " ".join(_prompt_and_sentence(a, f[a][1])[1].format(c=_mid(c), C=c, v=f[a][0]) for a in ATTRS if a in f)


def _and(xs: list[str]) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def prose(c: str, f: dict[str, tuple[str, set[str]]]) -> str:
    """A longer text about the country: its place first, then its other facts in an order drawn from its
    id, the capital and the currency among them in other words than the questions'."""
    rec = f["_rec"]  # type: ignore[index]
    rng = random.Random(f"prose:{slug(c)}")
    where = f.get("region", f.get("continent", (None,)))[0]
    body = [f"{c} lies in {where}." if where else f"{c} is a country."]
    rest = []
    if "capital" in f:
        rest.append(rng.choice(CAPITAL_SAID).format(v=f["capital"][0]))
    if "currency" in f:
        rest.append(rng.choice(CURRENCY_SAID).format(v=f["currency"][0]))
    area = rec.get("area")
    if isinstance(area, (int, float)) and area > 0:
        rest.append(f"It covers about {round(area):,} square kilometres.")
    if "borders" in f:
        rest.append(f"Its land neighbours are {_and(sorted(f['borders'][1]))}."
                    if len(f["borders"][1]) > 1 else f"Its only land neighbour is {next(iter(f['borders'][1]))}.")
    if "demonym" in f:
        rest.append(f"People from {_mid(c)} are described as {f['demonym'][0]}.")
    if "language" in f:
        rest.append(f"{_and(sorted(f['language'][1]))} {'is' if len(f['language'][1]) == 1 else 'are'} "
                    "official there.")
    provinces = rec.get("provinces") or []
    if isinstance(provinces, str):  # some records hold the list's repr
        try:
            provinces = ast.literal_eval(provinces)
        except (ValueError, SyntaxError):
            provinces = []
    provinces = sorted({p.strip() for p in provinces if isinstance(p, str) and p.strip()})
    if len(provinces) >= 3:
        rest.append(f"Among its first-level divisions are {_and(sorted(rng.sample(provinces, 3)))}.")
    if "calling-code" in f:
        rest.append(f"Telephone numbers there are dialled from abroad with {f['calling-code'][0]}.")
    if "tld" in f:
        rest.append(f"Websites registered there end in {f['tld'][0]}.")
    if "timezone" in f:
        rest.append(f"Its clocks keep {f['timezone'][0]}.")
    rng.shuffle(rest)
    return " ".join(body + rest)


def build(attrs: list[str], countries: list[str] | None = None, n_choices: int = 8, seed: int = 0,
          kind: str = "sentence"):
    for a in attrs:
        if a not in ATTRS and a not in MORE:
            raise SystemExit(f"make_countries.py: unknown attribute {a!r}; choose from {','.join([*ATTRS, *MORE])}")
    facts = load()
    names = sorted((c for c in facts if all(a in facts[c] for a in attrs)), key=slug)
    if countries:
        names = [c for c in names if c in countries]
    ids = [slug(c) for c in names]
    assert len(set(ids)) == len(ids), "two countries share an id"
    for c in names:
        f = facts[c]
        text = prose(c, f) if kind == "prose" else passage(c, f)
        mid = _mid(c)
        for a in attrs:
            gold, right = f[a]
            k_choices = MORE[a][1] if a in MORE else n_choices
            wrong = {norm(x) for x in right | {gold}}
            if a == "borders":  # never the country itself; any other country that borders one is a distractor
                wrong.add(norm(mid))
            pool: dict[str, str] = {}
            for o in sorted(facts, key=slug):
                if o == c or a not in facts[o]:
                    continue
                for v in sorted(facts[o][a][1]) if a == "borders" else [facts[o][a][0]]:
                    if norm(v) not in wrong:
                        pool.setdefault(norm(v), v)
            if len(pool) < k_choices - 1:
                continue
            rid = f"{slug(c)}-{a}"
            rng = random.Random(f"{seed}:{rid}")
            choices = rng.sample(sorted(pool.values()), k_choices - 1)
            k = rng.randrange(k_choices)
            choices.insert(k, gold)
            form = MORE[a][0] if a in MORE else _prompt_and_sentence(a, right)[0]
            prompt = form.format(c=mid, C=c, k=f.get("capital", ("",))[0])
            yield {"id": rid, "task": f"country-{a}", "entity": c, "prompt": prompt,
                   "choices": [" " + x for x in choices], "answer": k, "text": text}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attrs", default="capital,currency",
                    help="comma-separated attributes: " + ",".join([*ATTRS, *MORE]))
    ap.add_argument("--passage", choices=["sentence", "prose"], default="sentence",
                    help="the records' text: the facts in plain sentences, or a longer text (see above)")
    ap.add_argument("--countries", default=None, help="comma-separated subset of countries (their names)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    countries = args.countries.split(",") if args.countries else None
    for rec in build(args.attrs.split(","), countries, seed=args.seed, kind=args.passage):
        sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
