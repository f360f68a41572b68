"""The tables of EXPERIMENTS.md, rebuilt from the committed records (experiments/records/).

EXPERIMENTS.md holds each table between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; ``fill`` puts
the table built from the records there, ``check`` names the tables where the document and the records
disagree (tests/test_experiments.py runs it on the committed document). A table whose records are missing is
not built, and a marked block without its table is reported by ``check``.

To add a table: a function of the records folder returning markdown, registered with ``@table(NAME)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from mergetool.stats import format_p

from .harness import RECORDS, read_jsonl

TABLES: dict[str, Callable[[Path], str]] = {}
NEEDS: dict[str, list[str]] = {}


def table(name: str, needs: list[str]):
    """Register a table built from the record files ``needs`` (names under records/)."""
    def wrap(fn):
        TABLES[name], NEEDS[name] = fn, needs
        return fn
    return wrap


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


@table("tasks", ["data.jsonl", "accuracy.jsonl"])
def tasks(records: Path) -> str:
    data = {r["task"]: r for r in read_jsonl(records / "data.jsonl")}
    acc = sorted(read_jsonl(records / "accuracy.jsonl"), key=lambda r: (not r["kept"], -r["gain"], r["task"]))
    lines = ["| task | source | train | dev | chance | majority | base | expert ± SE | gain | p vs base | "
             "p vs chance | kept |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in acc:
        d = data[r["task"]]
        lines.append(f"| {r['task']} | {d['source']} | {d['train']} | {r['n']} | {pct(r['chance'])} | "
                     f"{pct(r['majority'])} | {pct(r['base'])} | {pct(r['expert'])} ± {pct(r['se_expert'])} | "
                     f"{100 * r['gain']:+.1f} | {format_p(r['p_vs_base'])} | {format_p(r['p_vs_chance'])} | "
                     f"{'yes' if r['kept'] else 'no: ' + r['why']} |")
    kept = sum(r["kept"] for r in acc)
    lines.append(f"\n{kept} of {len(acc)} candidate tasks kept (accuracy in %; dev: examples evaluated).")
    return "\n".join(lines)


@table("pools", ["pools.jsonl"])
def pools(records: Path) -> str:
    lines = ["| passages | words per passage | questions | answered by the base | trained | kept | dropped "
             "| training time |", "|---|---|---|---|---|---|---|---|"]
    for r in read_jsonl(records / "pools.jsonl"):
        lines.append(f"| {r['condition']} | {r['passage_words']:.0f} | {r['questions']} | {r['known_by_base']} | "
                     f"{r['trained']} | {r['kept']} | {r['dropped']} | {r['seconds'] / 60:.0f} min |")
    return "\n".join(lines)


@table("timings", ["manifest.json"])
def timings(records: Path) -> str:
    m = json.loads((records / "manifest.json").read_text())
    lines = ["| stage | started (UTC) | wall time | revision | machine |", "|---|---|---|---|---|"]
    for name, e in m["stages"].items():
        mach = e["machine"]
        lines.append(f"| {name} | {e['started']} | {e['seconds'] / 60:.1f} min | {e['revision'][:10]} | "
                     f"{mach['cores']}-core {mach['cpu']}, torch {mach['torch']}, load {mach['load_at_start']} |")
    return "\n".join(lines)


def tables(records: Path = RECORDS) -> dict[str, str]:
    """Every table whose records exist."""
    return {name: fn(records) for name, fn in TABLES.items() if all((records / n).exists() for n in NEEDS[name])}


BLOCK = re.compile(r"<!-- table:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /table:(?P=name) -->", re.S)


def fill(doc: str, built: dict[str, str]) -> str:
    """The document with each marked block's body replaced by its table (blocks of unknown tables kept)."""
    return BLOCK.sub(lambda m: (f"<!-- table:{m['name']} -->\n{built[m['name']]}\n<!-- /table:{m['name']} -->"
                                if m["name"] in built else m[0]), doc)


def check(doc: str, built: dict[str, str]) -> list[str]:
    """Names of the marked blocks whose body is not the table built from the records (or has none)."""
    return [m["name"] for m in BLOCK.finditer(doc) if built.get(m["name"]) is None
            or m["body"] != built[m["name"]] + "\n"]
