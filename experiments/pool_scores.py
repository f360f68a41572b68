"""The example-level mergeability experiment of "Will it Merge?" (sections 3-5, Figures 2-5, A.10, A.13-A.14) on
the per-example pools of both passage conditions (stage ``pools``).

    score-pool   score (example level, the control on) on each pool: KnOTS, TIES and the mean at M = 50, N = 5
                 (seed 0); KnOTS again under seed 1, with N = 10 and with M = 10 (each under a seed of its own) for
                 the stability of S; each run's summary; locality (the experts with S = 1 merged with partners
                 drawn from one S bin only); the forecast of S (diagnose --fit, leave one task out, against its
                 baselines)

The unit of independence and the tests are score's own (docs/science.md): intervals resample merges and
adapters, the existence test permutes outcomes within merges, the Spearman p-values are permutation tests. The
stability of S between two runs is the Spearman of their S with the crossed bootstrap of ``scores.cross_seed``
(adapters and both runs' merges resampled); the runs compared never share a seed, so their partitions are drawn
independently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .harness import Run, read_jsonl, stage
from .scores import cross_seed
from .stages import QUESTIONS, base_dir

# name: (method, M, N, seed); the first is the main run of each condition
RUNS = {"knots-M50-N5": ("knots", 50, 5, 0), "ties-M50-N5": ("ties", 50, 5, 0), "mean-M50-N5": ("mean", 50, 5, 0),
        "knots-M50-N5-seed1": ("knots", 50, 5, 1), "knots-M50-N10": ("knots", 50, 10, 2),
        "knots-M10-N5": ("knots", 10, 5, 3)}
MAIN = "knots-M50-N5"
# the stability comparisons: (what differs, run a, run b)
STABILITY = [("seed", MAIN, "knots-M50-N5-seed1"), ("N = 5 against 10", MAIN, "knots-M50-N10"),
             ("M = 50 against 10", MAIN, "knots-M10-N5")]
# locality ("Will it Merge?" section 5.1): the experts with S = 1 in the main run, merged with LOCAL_M partners
# drawn only from one S bin (a bin needs LOCAL_M experts besides the one scored), LOCAL_N trials
LOCAL_M, LOCAL_N, LOCAL_SEED = 10, 5, 4
# what the committed score records keep (the rest of score's record is in the cache)
KEEP = ("adapter", "task", "score", "control", "contribution", "per_trial", "trial_merges", "off_target", "gap",
        "rank", "p_correct", "p_max", "delta_trained", "finetuned", "perplexity", "length", "norm_f", "sigma_max",
        "merging_loss")


def compact(rec: dict) -> dict:
    """A score record cut to KEEP, floats to 6 significant digits (the committed copy)."""
    def r(v):
        if isinstance(v, float):
            return float(f"{v:.6g}")
        if isinstance(v, list):
            return [r(x) for x in v]
        return v
    return {k: r(rec[k]) for k in KEEP if k in rec}


def s_bin(score: float) -> str:
    return f"{score:.1f}"


def link_bins(recs: list[dict], pool: Path, d: Path) -> dict[str, Path]:
    """One folder of symlinks per S bin of the records (the experts' files in ``pool``)."""
    out: dict[str, Path] = {}
    for r in recs:
        b = d / s_bin(r["score"])
        b.mkdir(parents=True, exist_ok=True)
        link = b / f"{r['adapter']}.safetensors"
        if not link.exists():
            os.symlink((pool / f"{r['adapter']}.safetensors").resolve(), link)
        out[s_bin(r["score"])] = b
    return out


@stage("score-pool", needs=("pools",))
def score_pool(run: Run) -> list[Path]:
    """score on each per-example pool (KnOTS, TIES, mean at M = 50; KnOTS under another seed, N = 10, M = 10),
    the summaries, the stability of S across runs, locality, and the forecast of S against its baselines."""
    pools = {r["condition"]: r for r in read_jsonl(run.records / "pools.jsonl")}
    records, summaries, stability, locality, forecasts = [], [], [], [], []
    for cond, data in QUESTIONS.items():
        pool = run.cache / f"pool-{cond}"
        experts = [pool / f"{i}.safetensors" for i in pools[cond]["kept_ids"]]
        out = run.cache / "score-pool" / cond
        out.mkdir(parents=True, exist_ok=True)
        got: dict[str, list[dict]] = {}
        for name, (method, m, n, seed) in run.bar(list(RUNS.items()), f"score-pool {cond}"):
            f = out / f"{name}.jsonl"
            run.mt("score", "-q", "--base", base_dir(run), "--data", data, "-m", method, "-M", m, "-N", n,
                   "--seed", seed, *experts, "-o", f, "--resume")
            summ = out / f"{name}.summary.json"
            run.mt("score", "-q", "--summary", f, "-o", summ)
            got[name] = read_jsonl(f)
            tags = {"condition": cond, "run": name, "method": method, "partners": m, "trials": n, "seed": seed}
            records += [{**tags, **compact(r)} for r in got[name]]
            doc = json.loads(summ.read_text())
            doc["run_id"] = doc.pop("run", None)  # score's hash of the run; "run" names the run here
            summaries.append({**doc, **tags})
        for what, a, b in STABILITY:
            stability.append({"condition": cond, "differs": what, "a": a, "b": b, **cross_seed([got[a], got[b]])})
        # locality: the S = 1 experts of the main run, partners from one bin at a time
        bins = link_bins(got[MAIN], pool, out / "bins")
        fixed = sorted((bins["1.0"] / f"{r['adapter']}.safetensors" for r in got[MAIN] if s_bin(r["score"]) == "1.0"),
                       key=str) if "1.0" in bins else []
        for b, d in sorted(bins.items()):
            size = len(list(d.glob("*.safetensors")))
            if len(fixed) < 2 or size < LOCAL_M + (b == "1.0"):
                continue
            f = out / f"locality-{b}.jsonl"
            run.mt("score", "-q", "--base", base_dir(run), "--data", data, "-M", LOCAL_M, "-N", LOCAL_N,
                   "--seed", LOCAL_SEED, "--partners-from", d, *fixed, "-o", f, "--resume")
            summ = out / f"locality-{b}.summary.json"
            run.mt("score", "-q", "--summary", f, "-o", summ)
            s = json.loads(summ.read_text())
            locality.append({"condition": cond, "partners_bin": b, "bin_size": size, "fixed": len(fixed),
                             "partners": LOCAL_M, "trials": LOCAL_N, "seed": LOCAL_SEED, "merges": s["merges"],
                             **{k: s["means"][k] for k in ("score", "control", "contribution") if k in s["means"]}})
        # the forecast of S from the adapters' features, held out by task, against single features and the
        # base model's knowledge alone
        fit = out / "s-predictor.json"
        run.mt("diagnose", "-q", "--base", base_dir(run), "--data", data, "--level", "example", "--explain",
               "--scores", out / f"{MAIN}.jsonl", "--fit", fit, *experts, "-o", out / "diagnose-pool.jsonl")
        forecasts.append({"condition": cond, "scores": MAIN, **json.loads(fit.read_text())})
    run.write_records("score-pool", records)
    run.write_records("score-pool-summary", summaries)
    run.write_records("score-pool-stability", stability)
    run.write_records("score-pool-locality", locality)
    run.write_records("score-pool-forecast", forecasts)
    return [*QUESTIONS.values(), run.records / "pools.jsonl"]
