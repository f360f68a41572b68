"""Reading diagnose's own records back (``diagnose --records FILE``), so that every statistic, fit, prediction
and figure can be rebuilt from committed JSONL without the adapters or the model.

Kept: ``pair``, ``adapter``, ``group`` and ``merge`` records (what ``measure`` writes); records of the analyses
(``stat``, ``model``, ``prediction``, ``selection``, ``comparison``) are outputs, skipped. Several files are
read as one: a record repeated with the same content counts once; the same pair, adapter, group (by members) or
merge (by name) with other values is an error, because HiddenSim and MDS are relative to the adapters
diagnosed together, and two runs over different sets disagree about them.
"""

from __future__ import annotations

import json
import math

from ..errors import MergetoolError
from ..jsonl import read_jsonl
from .core import Records

MEASURED = ("pair", "adapter", "group", "merge")
OUTPUTS = ("stat", "model", "prediction", "selection", "comparison")


def read_records(paths: list[str]) -> Records:
    rec = Records()
    seen: dict[tuple, tuple[str, str]] = {}
    for src in paths:
        name = "<stdin>" if src == "-" else src
        for i, r in enumerate(read_jsonl(src), 1):
            where = f"{name}:{i}"
            kind = r.get("kind")
            if kind in OUTPUTS:
                continue
            if kind not in MEASURED:
                raise MergetoolError(where, f"is not a diagnose record (kind {kind!r})",
                                     "pass records written by mergetool diagnose")
            key = _check(r, kind, where)
            text = json.dumps(r, sort_keys=True)
            if key in seen:
                if seen[key][0] != text:
                    raise MergetoolError(where, f"the {kind} {_label(key)} appears again with other values (first at "
                                         f"{seen[key][1]}; HiddenSim and MDS depend on the adapters diagnosed together)",
                                         "pass the records of one run for each pair, adapter, group and merge")
                continue
            seen[key] = (text, where)
            getattr(rec, kind + "s").append(r)
    if not rec.pairs and not rec.adapters:
        raise MergetoolError(", ".join(paths), "hold no pair or adapter records", "pass the output of mergetool diagnose")
    return rec


def _check(r: dict, kind: str, where: str) -> tuple:
    """The record's identity, after checking the fields the analyses read."""
    def bad(why):
        return MergetoolError(where, f"{kind} record: {why}", "pass records written by mergetool diagnose")

    for k, v in r.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise bad(f"{k!r} is not a finite number")
    if kind == "pair":
        if not (isinstance(r.get("a"), str) and isinstance(r.get("b"), str)) or r["a"] == r["b"]:
            raise bad("needs two adapter names 'a' and 'b'")
        return kind, tuple(sorted((r["a"], r["b"])))
    if kind == "adapter":
        if not isinstance(r.get("adapter"), str) or not isinstance(r.get("task"), str):
            raise bad("needs 'adapter' and 'task' names")
        return kind, r["adapter"]
    members = r.get("adapters")
    if not isinstance(members, list) or len(members) < 1 or not all(isinstance(a, str) for a in members):
        raise bad("needs 'adapters', a list of names")
    need = {"group": ("diameter2", "lower_bound", "meb_radius2", "upper_bound_paper", "upper_bound_jung"),
            "merge": ("distortion_max", "distortion_excess", "diameter2", "meb_radius2")}[kind]
    for k in need:
        if not _number(r.get(k)):
            raise bad(f"{k!r} must be a number")
    if kind == "group":
        if r.get("mds") is not None and not (isinstance(r["mds"], dict) and all(
                v is None or _number(v) for v in r["mds"].values())):
            raise bad("'mds' must map members to numbers")
        return kind, frozenset(members)
    if not isinstance(r.get("merged"), str) or not isinstance(r.get("holds"), dict) or \
            not isinstance(r.get("tasks"), list):
        raise bad("needs 'merged', 'tasks' and 'holds'")
    return kind, r["merged"]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _label(key: tuple) -> str:
    v = key[1]
    return ",".join(sorted(v)) if isinstance(v, (tuple, frozenset)) else str(v)
