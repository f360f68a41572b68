"""What ``score`` reports about a run, computed from its records alone (so the same numbers come from a run as
it ends and from records committed long after): S, control and contribution side by side with intervals, the
existence test, the Spearman table of S and of the contribution with each explanatory field, the fields per bin
of S. The statistics respect the plan (``stats``: outcomes shared by the members of a merge); docs/science.md
says why each is valid.
"""

from __future__ import annotations

from .errors import MergetoolError

EXPLAIN = ("gap", "rank", "p_correct", "p_max", "delta_trained", "perplexity", "length", "norm_f", "sigma_max",
           "effective_rank", "base_accuracy", "finetuned", "off_target")
MEASURES = ("score", "control", "contribution")
CORRELATED = ("score", "contribution")  # the measures of the Spearman table
PERMUTATIONS = 9999
REPLICATES = 2000


def _trials(records: list[dict]) -> dict[str, tuple[list, list, list]] | None:
    """Per measure, (update, merge, f) per trial; None for records without the merges (written before 2026-12)."""
    out = {"score": ([], [], []), "control": ([], [], [])}
    for i, r in enumerate(records):
        for m, values, merges in (("score", r.get("per_trial"), r.get("trial_merges")),
                                  ("control", r.get("control_per_trial"), r.get("control_merges"))):
            if values is None or merges is None or len(values) != len(merges):
                if m == "score":
                    return None
                continue
            out[m][0].extend([i] * len(values))
            out[m][1].extend(merges)
            out[m][2].extend(values)
    if not out["control"][0]:
        del out["control"]
    return out


def summarize(records: list[dict], seed: int = 0, permutations: int = PERMUTATIONS,
              replicates: int = REPLICATES) -> dict:
    """The summary of one run's records (all of one ``run`` key): ``n``, ``level``, ``trials``; ``binomial``
    (example level: the histogram of S beside Binomial(N, p)); ``existence`` (the permutation test within merges);
    ``means`` (S, control, contribution: mean and interval); ``spearman`` (per measure and field: ρ, its
    permutation p, its interval, n); ``bins`` (the fields' mean ± s.e. per bin of S); ``design`` (False for
    records without the merge ids, whose tests and intervals are then not computed)."""
    from .stats import binned, binomial_fit, crossed_bootstrap, existence_test, spearman_test

    if not records:
        return {"n": 0}
    runs = {r.get("run") for r in records}
    if len(runs) > 1:
        raise MergetoolError("records", f"come from {len(runs)} runs (their 'run' keys differ)",
                             "summarise the records of one run at a time")
    level = records[0].get("level", "example")
    N = records[0].get("trials")
    fields = [f for f in EXPLAIN if any(r.get(f) is not None for r in records)]
    out: dict = {"n": len(records), "level": level, "trials": N, "run": records[0].get("run"), "fields": fields}
    scores = [r["score"] for r in records]
    if level == "example" and N:
        out["binomial"] = binomial_fit(scores, N)
    trials = _trials(records)
    out["design"] = trials is not None
    measures = [m for m in MEASURES if any(r.get(m) is not None for r in records)]
    boot = None
    if trials is not None:
        out["existence"] = existence_test(*trials["score"], permutations=permutations, seed=seed)
        boot = crossed_bootstrap(len(records), trials, {f: [r.get(f) for r in records] for f in fields},
                                 replicates=replicates, seed=seed)
        out["merges"] = boot["merges"]
    out["means"] = {}
    for m in measures:
        vals = [r[m] for r in records if r.get(m) is not None]
        ci = boot["means"].get(m) if boot else None
        out["means"][m] = {"mean": sum(vals) / len(vals), "n": len(vals), "ci": list(ci) if ci else None}
    out["spearman"] = []
    for m in (m for m in CORRELATED if m in measures):
        for f in fields:
            t = spearman_test([r.get(m) for r in records], [r.get(f) for r in records], permutations, seed)
            ci = boot["spearman"].get((m, f)) if boot else None
            out["spearman"].append({"measure": m, "field": f, "rho": t["rho"], "p": t["p"], "floor": t["floor"],
                                    "exact": t["method"] == "exact", "n": t["n"], "ci": list(ci) if ci else None})
    bin_fields = fields + [m for m in ("control", "contribution") if m in measures]
    out["bins"] = binned(records, "score", bin_fields, N if level == "example" else None)
    out["bin_fields"] = bin_fields
    out["level_ci"] = boot["level"] if boot else None
    out["permutations"], out["replicates"] = permutations, replicates
    return out
