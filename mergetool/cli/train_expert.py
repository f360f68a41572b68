"""``mergetool train-expert``: LoRA experts, one per task or one per example (many at once)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import MergetoolError, UsageError
from .common import BaseModel, Data, Debug, Device, GgufFile, Quiet, pick_device, require_data_and_base
from .app import app, begin

log = logging.getLogger("mergetool")

HELP = """Train LoRA experts on examples: one per task (default) or one per example (--per-example).

Per task, an expert trains on all of its task's records: `text`, or `prompt` + `target`, or `prompt` +
the right choice (loss on the completion only). Per example, each expert trains on its record's `text`
(a passage about the entity), many experts at once, one adapter per batch row, with the paper's
recipe by default (r=64, alpha=128, mlp.up_proj of the middle layer, lr 4e-3, 10 epochs); --skip-known
drops examples the base already answers, --keep-if-correct keeps only experts that answer their own
question afterwards ("Will it Merge?" section 3.1). Adapters are written as a stream of blobs on
stdout, to -o FILE, or one file each to --out-dir DIR (where --resume skips those already written).

\b
Examples:
  mergetool train-expert --base BASE tasks.jsonl --out-dir experts/
  mergetool train-expert --base BASE --per-example --skip-known --keep-if-correct qa.jsonl --out-dir pool/
  mergetool train-expert --base BASE --task-filter sst2 tasks.jsonl | mergetool merge --method ties - other.safetensors
"""

Opt = typer.Option
PER_EXAMPLE = dict(rank=64, alpha=128.0, targets="mlp.up_proj", lr=4e-3, epochs=10, batch_size=64)
PER_TASK = dict(rank=16, alpha=32.0, targets="self_attn.q_proj,self_attn.k_proj,self_attn.v_proj", lr=5e-4,
                epochs=3, batch_size=8)


@app.command("train-expert", help=HELP, short_help="Train LoRA experts per task or per example.",
             no_args_is_help=True)
def train_cmd(
    data: Data = None,
    base: BaseModel = None,
    gguf_file: GgufFile = None,
    per_example: Annotated[bool, Opt("--per-example", help="One expert per example, trained on its text.")] = False,
    rank: Annotated[Optional[int], Opt("--rank", help="LoRA rank (per example 64, per task 16).")] = None,
    alpha: Annotated[Optional[float], Opt("--alpha", help="LoRA alpha (per example 128, per task 32).")] = None,
    target_modules: Annotated[Optional[str], Opt("--target-modules", help="Comma-separated module suffixes "
                                                 "(per example mlp.up_proj, per task self_attn.q/k/v_proj).")] = None,
    layers: Annotated[Optional[str], Opt("--layers", help="Comma-separated layer indices (per example: the middle "
                                         "layer; per task: all).")] = None,
    lr: Annotated[Optional[float], Opt("--lr", help="Learning rate (per example 4e-3, per task 5e-4).")] = None,
    epochs: Annotated[Optional[int], Opt("--epochs", help="Epochs (per example 10, per task 3).")] = None,
    batch_size: Annotated[Optional[int], Opt("--batch-size", help="Experts trained at once (per example, 64) "
                                             "or examples per step (per task, 8).")] = None,
    seed: Annotated[int, Opt("--seed", help="Seed of the adapter initialisation and data order.")] = 0,
    task_filter: Annotated[Optional[str], Opt("--task-filter", help="Only these tasks (comma-separated).")] = None,
    skip_known: Annotated[bool, Opt("--skip-known", help="Per example: drop examples the base already answers.")]
    = False,
    keep_if_correct: Annotated[bool, Opt("--keep-if-correct", help="Per example: keep only experts that answer "
                                         "their own question after training.")] = False,
    output: Annotated[Optional[str], Opt("-o", "--output", help="Write all adapters to this file (a stream).",
                                         metavar="FILE")] = None,
    out_dir: Annotated[Optional[str], Opt("--out-dir", help="Write one <name>.safetensors per expert here.",
                                          metavar="DIR")] = None,
    resume: Annotated[bool, Opt("--resume", help="With --out-dir: skip experts already written.")] = False,
    device: Device = "auto",
    quiet: Quiet = False,
    debug: Debug = False,
):
    begin("train-expert", quiet, debug)
    require_data_and_base("train-expert", data, base)
    if output and out_dir:
        raise UsageError("-o", "-o and --out-dir both given", "choose one output")
    if resume and not out_dir:
        raise UsageError("--resume", "needs --out-dir", "write experts to a directory to resume")
    if (skip_known or keep_if_correct) and not per_example:
        raise UsageError("--skip-known", "--skip-known and --keep-if-correct go with --per-example",
                         "add --per-example")
    from .. import io

    if not out_dir:
        io.refuse_binary_to_tty(output)
    d = PER_EXAMPLE if per_example else PER_TASK
    spec_kw = dict(rank=rank or d["rank"], alpha=alpha or d["alpha"], lr=lr or d["lr"], epochs=epochs or d["epochs"],
                   batch_size=batch_size or d["batch_size"], seed=seed,
                   targets=[t.strip() for t in (target_modules or d["targets"]).split(",") if t.strip()])
    try:
        spec_kw["layers"] = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise UsageError("--layers", f"{layers!r} is not a list of integers", "pass --layers 14 or 0,1,2") from None
    if min(spec_kw["rank"], spec_kw["epochs"], spec_kw["batch_size"]) < 1 or spec_kw["lr"] <= 0:
        raise UsageError("options", "--rank, --epochs, --batch-size must be ≥ 1 and --lr > 0", "fix the values")

    import torch

    from .. import evaluate as ev
    from .. import train as tr
    from ..adapters import decoder_layers, layer_of
    from ..examples import check_examples
    from ..io import read_jsonl
    from ..model import fingerprint, load_model, resolve_base
    from ..updates import metadata_for, to_tensors

    dev = pick_device(device)
    src = "<stdin>" if data == "-" else data
    exs = check_examples(read_jsonl(data), src)
    if task_filter:
        keep = set(task_filter.split(","))
        exs = [e for e in exs if e.task in keep]
    if not exs:
        raise MergetoolError(src, "no examples to train on", "check --task-filter")
    b = resolve_base(base, gguf_file)
    fp = fingerprint(b)
    spec = tr.LoraSpec(**spec_kw)
    model, tok = load_model(b, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    names = tr.target_modules(model, spec, default_middle=per_example)
    layer_ids = sorted({layer_of(n, decoder_layers(model)[0]) for n in names})
    peft_cfg = {"r": spec.rank, "lora_alpha": spec.alpha, "use_rslora": False,
                "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names}), "layers_to_transform": layer_ids}

    def meta_for(name, task, extra):
        return {"name": name, "kind": "lora", "task": task, "base_model": base, "base_fingerprint": fp,
                "peft_config": peft_cfg, "training": {"lr": spec.lr, "epochs": spec.epochs, "seed": spec.seed,
                                                      "mode": "per-example" if per_example else "per-task", **extra}}

    written: list[tuple[str, bytes]] = []
    outdir = Path(out_dir) if out_dir else None
    if outdir:
        outdir.mkdir(parents=True, exist_ok=True)

    def emit(u):
        blob = io.blob_bytes(to_tensors(u), metadata_for(u))
        if outdir:
            with io.atomic_output(str(outdir / f"{_safe(u.name)}.safetensors")) as fh:
                fh.write(blob)
        else:
            written.append((u.name, blob))

    if per_example:
        missing = [e.id for e in exs if not isinstance(e.rec.get("text"), str)]
        if missing:
            raise MergetoolError(src, f"example {missing[0]!r} has no 'text' to train on",
                                 "per-example experts train on each record's text")
        if (skip_known or keep_if_correct) and any(e.kind != "mc" for e in exs):
            raise MergetoolError(src, "--skip-known/--keep-if-correct need multiple-choice records",
                                 "give prompt, choices and answer")
        if resume:
            exs = [e for e in exs if not (outdir / f"{_safe(e.id)}.safetensors").exists()]
        if skip_known:
            for e in exs:
                e.context = e.rec["prompt"]
            known = {e.id for e, r in zip(exs, ev.evaluate(model, tok, exs)[0]) if r["correct"]}
            log.info("--skip-known: %d of %d examples already answered by the base; %d left", len(known), len(exs),
                     len(exs) - len(known))
            exs = [e for e in exs if e.id not in known]
        dropped = kept = 0
        rank_of = {e.id: i for i, e in enumerate(exs)}  # output order: the input's
        exs = sorted(exs, key=lambda e: len(e.rec["text"]))  # experts of similar lengths train together
        for s in range(0, len(exs), spec.batch_size):
            chunk = exs[s:s + spec.batch_size]
            st, losses = tr.train_stacked(model, tok, [("", e.rec["text"]) for e in chunk], spec, names,
                                          [tr.expert_seed(spec.seed, e.id) for e in chunk])
            ok = [True] * len(chunk)
            if keep_if_correct:
                scores = tr.stacked_choice_scores(model, tok, st, [e.rec for e in chunk])
                ok = [max(range(len(sc)), key=sc.__getitem__) == e.rec["answer"] for sc, e in zip(scores, chunk)]
            for i, e in enumerate(chunk):
                if ok[i]:
                    emit(st.expert(i, e.id, meta_for(e.id, e.task, {"example": e.id, "final_loss": losses[i]})))
                    kept += 1
                else:
                    dropped += 1
            st.remove()
            log.info("trained %d/%d experts", min(s + spec.batch_size, len(exs)), len(exs))
        if keep_if_correct:
            log.info("--keep-if-correct: kept %d experts, dropped %d that miss their own question", kept, dropped)
        written.sort(key=lambda w: rank_of[w[0]])
    else:
        by_task: dict[str, list] = {}
        for e in exs:
            r = e.rec
            item = (("", r["text"]) if e.kind == "ppl" else
                    (r["prompt"], r["choices"][r["answer"]]) if e.kind == "mc" else
                    (r["prompt"], r.get("target") or r["targets"][0]))
            by_task.setdefault(e.task, []).append(item)
        for task, items in by_task.items():
            if resume and (outdir / f"{_safe(task)}.safetensors").exists():
                continue
            st, loss = tr.train_task(model, tok, items, spec, names)
            emit(st.expert(0, task, meta_for(task, task, {"examples": len(items), "final_loss": loss})))
            st.remove()
            log.info("task %s: %d examples, final loss %.4f", task, len(items), loss)
    if not outdir:
        if not written:
            raise MergetoolError(src, "no expert was kept", "relax --keep-if-correct or train longer")
        with io.atomic_output(output) as fh:
            for _, blob in written:
                fh.write(blob)



def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:200] or "expert"
