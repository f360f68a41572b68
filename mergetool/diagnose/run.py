"""A diagnose run around the library call (``core``): what it reads besides the adapters (fitted models, score and
loss records), its three ways (compare fitted models; analyse diagnose's own records; measure the adapters, with
the model when given) and its outputs (the records, the fitted model, the figures). ``cli/diagnose.py`` parses
and checks the options, calls these and prints the tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..errors import UsageError
from . import core


def fit_spec(fit: str | None, scores: str | None, method: str | None, lam: float, seed: int, resamples: int,
             features: str | None) -> dict | None:
    """What ``--fit`` fits: the target (a score with --scores, else a pair's merge), the merge method of the pair
    losses, the L1 penalty, and the features (comma-separated; None: every metric present in all records)."""
    if not fit:
        return None
    return {"target": "score" if scores else "pair", "method": method, "lam": lam, "seed": seed,
            "resamples": resamples,
            "features": [f.strip() for f in features.split(",") if f.strip()] if features else None}


def read_measured(scores: str | None, losses: str | None, predict: str | None):
    """The measured mergeability (score records by adapter, merging-loss records) and the model to predict with."""
    from ..weights import score_records
    from .analysis import read_losses
    from .predict import read_model

    model_doc = read_model(predict) if predict else None
    return (score_records(scores) if scores else None, read_losses(losses) if losses else None, model_doc)


def compare(paths: list[str]) -> list[dict]:
    """``--compare-fits``: the comparison record of the fitted models in ``paths``, each named by its merge
    method (else its file's stem)."""
    from .compare import compare_fits
    from .predict import read_model

    models = [(m.method or Path(p).stem, m) for p, m in ((p, read_model(p)) for p in paths)]
    return [compare_fits(models)]


def from_records(paths: list[str], scores: dict | None, losses: list[dict] | None, fit: dict | None,
                 model_doc, seed: int, resamples: int, permutations: int) -> tuple[list[dict], list[dict]]:
    """``--records``: the statistics, fits and predictions of diagnose's own records; returns them, and what the
    figures draw (the records read and these)."""
    from .analysis import check_joins
    from .records import read_records

    rec = read_records(paths)
    names = [a["adapter"] for a in rec.adapters] or sorted({x for p in rec.pairs for x in (p["a"], p["b"])})
    check_joins(scores, losses, names, names, bool(rec.groups))
    out = core.analyze(rec, scores, losses, fit, model_doc, seed=seed, resamples=resamples, permutations=permutations)
    return out, rec.all() + out


def measure(paths: list[str], candidates: list[str] | None, merged: list[str] | None, base, data: str | None,
            chat: bool, dtype, device: str, allow_pickle: bool, setup: dict, scores: dict | None, losses: list[dict] | None,
            fit: dict | None, model_doc, select: int | None, bar: Callable[[int], Callable]) -> list[dict]:
    """The adapters (and the --candidates), read and checked against the base, measured (``core.diagnose``): with
    the base and DATA, on the model's hidden states too, and each of the ``merged`` against its members.
    ``setup``: the options of ``core.Setup``; ``bar(total)``: a progress callback for that many models."""
    from ..device import pick_device
    from ..inputs import check_compatible, load_inputs
    from ..model import fingerprint
    from .analysis import check_joins

    fp = fingerprint(base) if base else None
    updates = load_inputs(paths, base, allow_pickle)
    cands = load_inputs(list(candidates), base, allow_pickle) if candidates else []
    check_compatible(updates + cands, fp)
    names = [u.name for u in updates]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UsageError(dup, "two adapters share this name", "rename one (metadata 'name')")
    if len(updates) < 2:
        raise UsageError("adapters", "diagnose compares adapters: give at least two", "pass more adapters")
    if select is not None and select > len(updates) + len(cands):
        raise UsageError("--select", f"a group of {select} from {len(updates) + len(cands)} adapters", "lower --select")
    check_joins(scores, losses, names, names + [c.name for c in cands], base is not None)
    files = core.merged_files(merged or [])
    s = core.Setup(**setup, device=pick_device(device), merged=core.merged_chunks(files, base, fp, allow_pickle))
    if base is not None:
        core.load_model_data(s, base, data, chat, dtype)
    tick = bar(len(updates) + len(cands) + len(files))
    try:
        return core.diagnose(updates, s, cands, scores, losses, fit, model_doc, select, tick)
    finally:
        tick(None)


def write_records(out: list[dict], output: str | None, fit: str | None) -> None:
    """The records as JSONL to ``output`` (None or -: stdout), and with ``fit`` the fitted model as JSON there;
    each written atomically."""
    from ..jsonl import record_line
    from ..outputs import atomic_output

    text = "".join(record_line(r, f"a {r['kind']} record") for r in out)
    if fit:
        with atomic_output(fit) as fh:
            fh.write(json.dumps(next(r for r in out if r["kind"] == "model"), indent=2, ensure_ascii=False,
                                allow_nan=False).encode())
    with atomic_output(output) as fh:
        fh.write(text.encode())


def draw(drawn: list[dict], losses: list[dict] | None, plot: str) -> int:
    """The figures of ``drawn`` (and the losses) into the directory ``plot``; how many were written."""
    from .figures import write_figures

    Path(plot).mkdir(exist_ok=True)
    return len(write_figures(drawn, losses, Path(plot)))
