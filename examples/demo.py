"""The main job on the testbed model, end to end, through the mergetool commands.

    python examples/demo.py [--out demo] [--countries Egypt,Jamaica,...]

1. Caches SmolLM2-135M-Instruct (the testbed GGUF from PyPI) as a safetensors directory.
2. ``mergetool train-expert --per-example --skip-known --keep-if-correct``: one LoRA expert per country on
   its passage from examples/data/countries.jsonl, kept only if it then answers its capital question.
3. ``mergetool merge``: mean, ties, knots, core-space, tsv, slerp, a stdin pipeline; a PEFT directory and a
   full model.
4. ``mergetool eval``: each country's capital question under the base, each expert and every merge, all in
   one batched run (multiple choice, length-normalised log-probability, eq. 4 of "Will it Merge?").
5. ``mergetool score``: each expert's mergeability score S (shared trials, KnOTS) beside its control (the same
   question under merges without the expert), its contribution S − control, and what it does alone to the
   other questions (off_target).
6. ``mergetool weight --by score`` | ``mergetool merge --weights -``: less mergeable experts weigh more.
7. ``mergetool diagnose``: conflicts, HiddenSim, MDS, Theorem 1's bounds, and the metrics against S.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Capitals SmolLM2-135M ranks wrong among 8 choices, whose per-example expert (10 epochs) then answers them.
COUNTRIES = "Egypt,Jamaica,Singapore,Zimbabwe,Honduras,Montenegro,Moldova,Mali,Niger,Suriname"


def say(msg: str) -> None:
    print(msg, flush=True)


def mergetool(*args: str, stdin: bytes | None = None, show: bool = True) -> bytes:
    say("  $ " + " ".join(["mergetool", *args]))
    r = subprocess.run([sys.executable, "-m", "mergetool", *args], input=stdin, capture_output=True)
    if show:
        sys.stdout.write("".join("    " + line + "\n" for line in r.stderr.decode().splitlines()))
    if r.returncode != 0:
        if not show:
            sys.stdout.write(r.stderr.decode())
        raise SystemExit(f"mergetool failed with exit {r.returncode}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo"))
    ap.add_argument("--countries", default=COUNTRIES, help="default: capitals the base model ranks wrong")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    from mergetool.model import cache_gguf, resolve_base, testbed_gguf

    t0 = time.time()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in ("experts", "knots-peft", "knots-model", "figures"):  # a rerun starts from fresh experts and merges
        shutil.rmtree(out / old, ignore_errors=True)
    for old in [*out.glob("*.safetensors"), *out.glob("*.jsonl*"), *out.glob("*.png")]:
        old.unlink()
    base = out / "smollm2-135m"
    if not (base / "config.json").exists():
        say(f"[1/7] caching the testbed model {testbed_gguf().name} -> {base}")
        cache_gguf(resolve_base(str(testbed_gguf())), base)
    else:
        say(f"[1/7] testbed model cached at {base}")
    wanted = args.countries.split(",")
    rows = [json.loads(x) for x in (HERE / "data" / "countries.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["entity"] in wanted and r["task"] == "country-capital"]
    data = out / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    say(f"[2/7] per-example experts on {', '.join(r['entity'] for r in rows)} (trained together, one per batch row)")
    mergetool("train-expert", "--base", str(base), "--per-example", "--skip-known", "--keep-if-correct",
              str(data), "--out-dir", str(out / "experts"))
    experts = sorted(str(p) for p in (out / "experts").glob("*.safetensors"))
    if len(experts) < 4:
        raise SystemExit("fewer than four experts were kept; nothing to score")
    kept = {Path(e).stem for e in experts}

    say("[3/7] merging")
    merged = {}
    for method in ("mean", "ties", "knots", "core-space", "tsv"):
        merged[method] = out / f"merged-{method}.safetensors"
        mergetool("merge", "--method", method, *experts, "-o", str(merged[method]), "--name", method)
    merged["slerp"] = out / "merged-slerp.safetensors"
    mergetool("merge", "--method", "slerp", experts[0], experts[1], "-o", str(merged["slerp"]), "--name", "slerp")
    ab = mergetool("merge", "--method", "mean", experts[0], experts[1])
    merged["mean|ties"] = out / "merged-pipeline.safetensors"
    mergetool("merge", "--method", "ties", "-", *experts[2:], "-o", str(merged["mean|ties"]), "--name", "mean|ties",
              stdin=ab)
    mergetool("merge", "--method", "knots", "--base", str(base), *experts, "--save-peft", str(out / "knots-peft"),
              "--save-model", str(out / "knots-model"))

    say("[4/7] the capital questions under the base, every expert and every merge (one batched eval)")
    recs = [json.loads(x) for x in mergetool("eval", "-q", "--base", str(base), str(data)).splitlines()]
    adapters = [*experts, *map(str, merged.values())]
    flags = [x for a in adapters for x in ("--adapter", a)]
    recs += [json.loads(x) for x in mergetool("eval", "-q", "--base", str(base), *flags, str(data)).splitlines()]
    table: dict[str, dict[str, dict]] = {}
    for r in recs:
        table.setdefault(r["adapter"] or "base", {})[r["id"]] = r
    ids = [r["id"] for r in rows]
    say("  rank of the right answer among 8 (0 = answered); rows: the base, each expert (named after its question),")
    say(f"  each merge of all {len(experts)} experts (slerp: the first two; mean|ties: mean of the first two piped into")
    say("  ties with the rest). A question with no expert row lost its expert to --keep-if-correct.")
    width = max(len(k) for k in table)
    say(" " * (width + 2) + " ".join(f"{i.split('-')[0][:8]:>8}" for i in ids) + "  accuracy")
    for label, by in table.items():
        cells = " ".join(f"{by[i]['rank']:>8}" for i in ids)
        say(f"{label:<{width}}  {cells}  {sum(by[i]['correct'] for i in ids) / len(ids):.2f}")

    say("[5/7] mergeability: each expert merged (KnOTS) with 4 random partners, 3 trials, on its own question;")
    say("  the control: the same question under a merge of 5 other experts, without it, in each trial")
    mergetool("score", "--base", str(base), "--data", str(data), "--partners", "4", "--trials", "3", "--off-target", "9",
              *experts, "-o", str(out / "scores.jsonl"), "--plot", str(out / "scores.png"))
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    say("  per expert: S (its question answered by merges with it), control (by merges without it),")
    say("  contribution = S - control, and off_target (the share of the other questions it answers alone):")
    say(f"    {'expert':<24} {'S':>5} {'control':>8} {'contribution':>13} {'off_target':>11}")
    for r in sorted(scores, key=lambda r: r["adapter"]):
        cells = [f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("score", "control", "contribution", "off_target")]
        say(f"    {r['adapter']:<24} {cells[0]:>5} {cells[1]:>8} {cells[2]:>13} {cells[3]:>11}")

    say("[6/7] weights from the scores (less mergeable weighs more), piped into a weighted merge, evaluated")
    w = mergetool("weight", "--by", "score", "--records", str(out / "scores.jsonl"), "--tau", "0.5", *experts)
    (out / "weights.jsonl").write_bytes(w)
    mergetool("merge", "--method", "linear", "--weights", "-", *experts, "-o", str(out / "merged-weighted.safetensors"),
              stdin=w)
    for label, adapter in (("mean", merged["mean"]), ("weighted by score", out / "merged-weighted.safetensors")):
        got = [json.loads(x) for x in mergetool("eval", "-q", "--base", str(base), "--adapter", str(adapter),
                                                "--summary", str(data), show=False).splitlines()]
        say(f"    {label}: accuracy {got[0]['accuracy']:.2f}")

    say("[7/7] diagnose: conflicts, HiddenSim and MDS, Theorem 1's bounds for the KnOTS merge, the metrics against S")
    mergetool("diagnose", "--base", str(base), "--data", str(data), "--level", "example", "--explain",
              "--merged", str(merged["knots"]), "--scores", str(out / "scores.jsonl"), *experts,
              "-o", str(out / "diagnose.jsonl"), "--plot", str(out / "figures"))
    say(f"done in {time.time() - t0:.0f} s; outputs in {out}/ ({len(kept)} experts kept of {len(rows)})")


if __name__ == "__main__":
    main()
