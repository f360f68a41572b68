"""The main job on the testbed model, end to end: experts -> merges -> a check of what survived.

    python examples/demo.py [--out demo] [--countries Peru,Chile,Kenya] [--steps 30]

1. Caches SmolLM2-135M-Instruct (the testbed GGUF from PyPI) as a safetensors directory.
2. Trains one small LoRA expert per country on its passage from examples/data/countries.jsonl
   (peft; r=8 on q/v/up_proj), written as self-describing mergetool adapters.
3. Merges them with the mergetool CLI (mean, ties, knots, slerp, a stdin pipeline), writes a PEFT
   directory and a full merged model.
4. Scores each country's capital question (length-normalised log-probability of each of the 8 choices,
   eq. 4 of "Will it Merge?") under the base, the country's own expert and every merge.

Until ``mergetool train-expert`` and ``mergetool eval`` exist, steps 2 and 4 are done here with peft
and a few lines of scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def say(msg: str) -> None:
    print(msg, flush=True)


def records(countries: list[str]) -> list[dict]:
    rows = [json.loads(line) for line in (HERE / "data" / "countries.jsonl").read_text().splitlines()]
    return [r for r in rows if r["entity"] in countries and r["task"] == "country-capital"]


def train_expert(base_dir: Path, rec: dict, steps: int, seed: int = 0, rank: int = 8):
    """A LoRA on one passage (next-token loss), returned as a mergetool Update."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergetool.model import fingerprint, resolve_base
    from mergetool.updates import from_tensors

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    model = get_peft_model(model, cfg)
    ids = tok(rec["text"], return_tensors="pt").input_ids
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    sd = {k.replace(".default", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    meta = {"name": rec["entity"].lower().replace(" ", "-"), "kind": "lora", "task": rec["id"],
            "base_model": str(base_dir), "base_fingerprint": fingerprint(resolve_base(str(base_dir))),
            "peft_config": {"r": rank, "lora_alpha": 2 * rank, "use_rslora": False,
                            "target_modules": ["q_proj", "up_proj", "v_proj"]}}
    return from_tensors(sd, meta, meta["name"], "train"), float(loss.detach())


@torch.no_grad()
def choice_scores(model, tok, rec: dict) -> list[float]:
    """Mean token log-probability of each choice given the prompt (eq. 4 of Will it Merge?)."""
    p = tok(rec["prompt"]).input_ids
    out = []
    for c in rec["choices"]:
        ids = tok(rec["prompt"] + c).input_ids
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        tgt = torch.tensor(ids[1:])
        lp = logp[torch.arange(len(tgt)), tgt][len(p) - 1:]
        out.append(float(lp.mean()))
    return out


def mergetool(*args: str, stdin: bytes | None = None) -> bytes:
    cmd = [sys.executable, "-m", "mergetool", *args]
    say("  $ " + " ".join(["mergetool", *args]))
    r = subprocess.run(cmd, input=stdin, capture_output=True)
    sys.stdout.write("".join("    " + line + "\n" for line in r.stderr.decode().splitlines()))
    if r.returncode != 0:
        raise SystemExit(f"mergetool failed with exit {r.returncode}")
    return r.stdout


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo"))
    ap.add_argument("--countries", default="Bulgaria,Colombia,Dominica",
                    help="default: three capitals the base model ranks wrong among the 8 choices")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    from mergetool.io import blob_bytes
    from mergetool.model import cache_gguf, resolve_base, testbed_gguf
    from mergetool.updates import metadata_for, to_tensors

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):  # a rerun starts from fresh experts and merges
        old.unlink()
    import shutil

    for old in ("knots-peft", "knots-model"):
        shutil.rmtree(out / old, ignore_errors=True)
    base = out / "smollm2-135m"
    t0 = time.time()
    if not (base / "config.json").exists():
        say(f"[1/4] caching the testbed model {testbed_gguf().name} -> {base}")
        cache_gguf(resolve_base(str(testbed_gguf())), base)
    else:
        say(f"[1/4] testbed model cached at {base}")
    recs = records(args.countries.split(","))
    say(f"[2/4] training {len(recs)} LoRA experts ({args.steps} steps each) on {', '.join(r['entity'] for r in recs)}")
    experts = []
    for r in recs:
        u, loss = train_expert(base, r, args.steps)
        p = out / f"{u.name}.safetensors"
        p.write_bytes(blob_bytes(to_tensors(u), metadata_for(u)))
        experts.append(p)
        say(f"  {p}: {len(u.modules)} modules, final loss {loss:.3f}")
    say("[3/4] merging")
    e = [str(p) for p in experts]
    merges = {}
    for method in ("mean", "ties", "knots"):
        merges[method] = out / f"merged-{method}.safetensors"
        mergetool("merge", "--method", method, *e, "-o", str(merges[method]))
    merges["slerp"] = out / "merged-slerp.safetensors"
    mergetool("merge", "--method", "slerp", e[0], e[1], "-o", str(merges["slerp"]))
    ab = mergetool("merge", "--method", "mean", e[0], e[1])
    merges["pipeline"] = out / "merged-pipeline.safetensors"
    mergetool("merge", "--method", "ties", "-", e[2], "-o", str(merges["pipeline"]), stdin=ab)
    mergetool("merge", "--method", "knots", "--base", str(base), *e, "--save-peft", str(out / "knots-peft"),
              "--save-model", str(out / "knots-model"), "--dtype", "float32")
    say("[4/4] capital questions: mean log-prob of the right answer, its rank among 8 (0 = best)")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)

    def model_with(adapter: Path | None):
        m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        if adapter is None:
            return m
        from mergetool.io import read_blobs
        from mergetool.updates import from_blob

        u = from_blob(read_blobs(str(adapter))[0], adapter.stem)
        sd = m.state_dict()
        with torch.no_grad():
            for mod, x in u.modules.items():
                sd[mod.removeprefix("base_model.model.") + ".weight"] += x.delta()
        return m

    rows = []
    for label, path in [("base", None), *[(f"expert:{p.stem}", p) for p in experts], *merges.items()]:
        model = model_with(path)
        cells = []
        for r in recs:
            s = choice_scores(model, tok, r)
            rank = sorted(range(len(s)), key=lambda i: -s[i]).index(r["answer"])
            cells.append(f"{s[r['answer']]:7.2f} (rank {rank})")
        rows.append((label, cells))
    width = max(len(label) for label, _ in rows)
    say(" " * (width + 2) + "  ".join(f"{r['entity']:>18}" for r in recs))
    for label, cells in rows:
        say(f"{label:<{width}}  " + "  ".join(f"{c:>18}" for c in cells))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                     out / "knots-peft").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "knots-model", dtype=torch.float32).eval()
    ids = tok(recs[0]["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        gap = float((peft(ids).logits - merged(ids).logits).abs().max())
    say(f"knots PEFT directory and merged model agree: max |logit difference| {gap:.2e}")
    say(f"done in {time.time() - t0:.0f} s; outputs in {out}/")


if __name__ == "__main__":
    main()
