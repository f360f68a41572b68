"""``mergetool train-expert``: LoRA experts, one per task or one per example (many at once)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import MergetoolError, UsageError
from .common import (BaseModel, Data, Debug, Device, GgufFile, Quiet, Ray, Seed, Unordered, Workers, pick_device,
                     require_data_and_base)
from .app import begin, command

log = logging.getLogger("mergetool")

HELP = """Train LoRA experts on examples: one per task (default) or one per example (--per-example).

Per task, an expert trains on all of its task's records: `text`, or `prompt` + `target`, or `prompt` +
the right choice (loss on the completion only). Per example, each expert trains on its record's `text`
(a passage about the entity), many experts at once, one adapter per batch row, with the paper's
recipe by default (r=64, alpha=128, mlp.up_proj of the middle layer, lr 4e-3, 10 epochs); --skip-known
drops examples the base already answers, --keep-if-correct keeps only experts that answer their own
question afterwards ("Will it Merge?" section 3.1). The target modules default to the model's own:
peft's default for its type per task (q_proj,v_proj on Llama, c_attn on GPT-2), the MLP's up projection per
example. Adapters are written one file each to --out-dir DIR (where --resume skips those already written),
as a stream of blobs on stdout (or a pipe), or, for a run that trains one expert, to -o FILE (a standard
safetensors file).

\b
Examples:
  mergetool train-expert --base BASE tasks.jsonl --out-dir experts/
  mergetool train-expert --base BASE --per-example --skip-known --keep-if-correct qa.jsonl --out-dir pool/
  mergetool train-expert --base BASE --task-filter sst2 tasks.jsonl | mergetool merge --method ties - other.safetensors
"""

Opt = typer.Option
PER_EXAMPLE = dict(rank=64, alpha=128.0, lr=4e-3, epochs=10, batch_size=64)
PER_TASK = dict(rank=16, alpha=32.0, lr=5e-4, epochs=3, batch_size=8)


@command("train-expert", help=HELP, short_help="Train LoRA experts per task or per example.",
             no_args_is_help=True)
def train_cmd(
    data: Data = None,
    base: BaseModel = None,
    gguf_file: GgufFile = None,
    per_example: Annotated[bool, Opt("--per-example", help="One expert per example, trained on its text.")] = False,
    rank: Annotated[Optional[int], Opt("--rank", help="LoRA rank (per example 64, per task 16).")] = None,
    alpha: Annotated[Optional[float], Opt("--alpha", help="LoRA alpha (per example 128, per task 32).")] = None,
    target_modules: Annotated[Optional[str], Opt("--target-modules", help="Comma-separated module names or "
                                                 "suffixes (default: the model's; per example mlp.up_proj, per task "
                                                 "peft's default for the model type).")] = None,
    layers: Annotated[Optional[str], Opt("--layers", help="Comma-separated layer indices (per example: the middle "
                                         "layer; per task: all).")] = None,
    lr: Annotated[Optional[float], Opt("--lr", help="Learning rate (per example 4e-3, per task 5e-4).")] = None,
    epochs: Annotated[Optional[int], Opt("--epochs", help="Epochs (per example 10, per task 3).")] = None,
    batch_size: Annotated[Optional[int], Opt("--batch-size", help="Experts trained at once (per example, 64) "
                                             "or examples per step (per task, 8).")] = None,
    seed: Seed("Seed of the adapter initialisation and data order.") = 0,
    dora: Annotated[bool, Opt("--dora", help="Train DoRA experts: LoRA factors and a magnitude per output row "
                              "(peft's use_dora).")] = False,
    task_filter: Annotated[Optional[str], Opt("--task-filter", help="Only these tasks (comma-separated).")] = None,
    skip_known: Annotated[bool, Opt("--skip-known", help="Per example: drop examples the base already answers.")]
    = False,
    keep_if_correct: Annotated[bool, Opt("--keep-if-correct", help="Per example: keep only experts that answer "
                                         "their own question after training.")] = False,
    output: Annotated[Optional[str], Opt("-o", "--output", help="Write the one expert to this safetensors file "
                                         "(-, a device or a FIFO: the stream of blobs).", metavar="FILE")] = None,
    out_dir: Annotated[Optional[str], Opt("--out-dir", help="Write one <name>.safetensors per expert here.",
                                          metavar="DIR")] = None,
    resume: Annotated[bool, Opt("--resume", help="With --out-dir: skip experts already written.")] = False,
    ray: Ray = None,
    workers: Workers = None,
    unordered: Unordered = False,
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
    if ray:
        from ..distributed import check_address

        check_address(ray)
        if not per_example:
            raise UsageError("--ray", "runs per-example training (--per-example)", "add --per-example")
    if (skip_known or keep_if_correct) and not per_example:
        raise UsageError("--skip-known", "--skip-known and --keep-if-correct go with --per-example",
                         "add --per-example")
    from ..blobs import blob_bytes
    from ..outputs import atomic_output, check_output, is_stream
    from ..streams import refuse_binary_to_tty

    if not out_dir:
        refuse_binary_to_tty(output)
        check_output(output)
    d = PER_EXAMPLE if per_example else PER_TASK
    given = dict(rank=rank, alpha=alpha, lr=lr, epochs=epochs, batch_size=batch_size)
    spec_kw = {k: d[k] if v is None else v for k, v in given.items()}
    for opt, value, ok, rule in (("--rank", spec_kw["rank"], spec_kw["rank"] >= 1, "≥ 1"),
                                 ("--epochs", spec_kw["epochs"], spec_kw["epochs"] >= 1, "≥ 1"),
                                 ("--batch-size", spec_kw["batch_size"], spec_kw["batch_size"] >= 1, "≥ 1"),
                                 ("--lr", spec_kw["lr"], math.isfinite(spec_kw["lr"]) and 0 < spec_kw["lr"] <= 1,
                                  "in (0, 1]"),
                                 ("--alpha", spec_kw["alpha"], math.isfinite(spec_kw["alpha"]) and spec_kw["alpha"] > 0,
                                  "a finite number > 0")):
        if not ok:
            raise UsageError(opt, f"{value} is out of range", f"pass a value {rule}")
    spec_kw.update(seed=seed, dora=dora, targets=None)
    if target_modules is not None:
        spec_kw["targets"] = [t.strip() for t in target_modules.split(",") if t.strip()]
        if not spec_kw["targets"]:
            raise UsageError("--target-modules", "names no module", "pass names such as mlp.up_proj")
    try:
        spec_kw["layers"] = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise UsageError("--layers", f"{layers!r} is not a list of integers", "pass --layers 14 or 0,1,2") from None

    import torch

    from .. import evaluate as ev
    from .. import train as tr
    from ..examples import check_examples
    from ..jsonl import read_jsonl
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
    if per_example:  # every check on the data before the model loads
        missing = [e.id for e in exs if not isinstance(e.rec.get("text"), str) or not e.rec["text"].strip()]
        if missing:
            raise MergetoolError(src, f"example {missing[0]!r} has no 'text' to train on",
                                 "per-example experts train on each record's text")
        if (skip_known or keep_if_correct) and any(e.kind != "mc" for e in exs):
            raise MergetoolError(src, "--skip-known/--keep-if-correct need multiple-choice records",
                                 "give prompt, choices and answer")
    if out_dir:
        file_names(e.id for e in exs) if per_example else file_names(dict.fromkeys(e.task for e in exs))
    elif not is_stream(output):  # a file holds one standard safetensors blob: refused before any training
        n = len(exs) if per_example else len({e.task for e in exs})
        if n > 1:
            raise UsageError("-o", f"{output} would hold {n} experts ({'examples' if per_example else 'tasks'}), and a "
                             "safetensors file holds one", "pass --out-dir DIR (one file each), or -o - for a stream "
                             "of blobs")
    b = resolve_base(base, gguf_file)
    fp = fingerprint(b)
    spec = tr.LoraSpec(**spec_kw)
    model = tok = None
    if ray:  # the driver needs only the model's layout (its modules' names), not its weights
        from ..model import skeleton

        layout = skeleton(b)
    else:
        model, tok = load_model(b, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    names = tr.target_modules(layout if ray else model, spec, default_middle=per_example)
    template = tr.run_template(layout if ray else model, spec, names, base, fp, per_example)

    written: list[tuple[str, bytes]] = []
    outdir = Path(out_dir) if out_dir else None
    if outdir:
        outdir.mkdir(parents=True, exist_ok=True)

    def emit_blob(name: str, blob: bytes):
        if outdir:
            with atomic_output(str(outdir / f"{_safe(name)}.safetensors")) as fh:
                fh.write(blob)
        else:
            written.append((name, blob))

    def emit(u):
        tr.check_finite(u)
        emit_blob(u.name, blob_bytes(to_tensors(u), metadata_for(u)))

    if per_example:
        if resume:
            exs = [e for e in exs if not (outdir / f"{_safe(e.id)}.safetensors").exists()]
        for e in exs:
            e.context = e.rec.get("prompt", "")
        cluster = rspec = None
        if ray:
            from .. import distributed as dist

            cluster = dist.connect(ray, workers, base, gguf_file, fp, device, None)
            rspec = dist.examples_spec(exs, f"train:{fp}:{spec.seed}", lora=spec_kw, keep_if_correct=keep_if_correct,
                                       meta=template)
        if skip_known:
            if cluster is not None:
                chunks = [list(range(s, min(len(exs), s + 256))) for s in range(0, len(exs), 256)]
                flags: list[bool] = []
                cluster.run("known", [(rspec, c) for c in chunks], lambda j, res: flags.extend(res))
                known = {e.id for e, k in zip(exs, flags) if k}
            else:
                known = {e.id for e, r in zip(exs, ev.evaluate(model, tok, exs)[0]) if r["correct"]}
            log.info("--skip-known: %d of %d examples already answered by the base; %d left", len(known), len(exs),
                     len(exs) - len(known))
        else:
            known = set()
        index = {e.id: i for i, e in enumerate(exs)}
        exs = [e for e in exs if e.id not in known]
        rank_of = {e.id: i for i, e in enumerate(exs)}  # output order: the input's
        exs = sorted(exs, key=lambda e: len(e.rec["text"]))  # experts of similar lengths train together
        batches = [exs[s:s + spec.batch_size] for s in range(0, len(exs), spec.batch_size)]
        tally = {"kept": 0, "dropped": 0, "trained": 0}

        def take(results):
            for name, blob, _ in results:
                if blob is None:
                    tally["dropped"] += 1
                else:
                    emit_blob(name, blob)
                    tally["kept"] += 1
            tally["trained"] += len(results)
            log.info("trained %d/%d experts", tally["trained"], len(exs))

        if cluster is not None:
            cluster.run("train", [(rspec, [index[e.id] for e in chunk]) for chunk in batches],
                        lambda j, res: take(res), not unordered)
        for chunk in (batches if cluster is None else []):
            take(tr.train_examples(model, tok, chunk, spec, names, template, keep_if_correct))
        if keep_if_correct:
            log.info("--keep-if-correct: kept %d experts, dropped %d that miss their own question", tally["kept"],
                     tally["dropped"])
        written.sort(key=lambda w: rank_of[w[0]])
    else:
        if ray:
            raise UsageError("--ray", "runs per-example training (--per-example)", "train per-task experts without --ray")
        by_task: dict[str, list] = {}
        for e, item in zip(exs, tr.training_pairs(exs)):
            by_task.setdefault(e.task, []).append(item)
        for task, items in by_task.items():
            if resume and (outdir / f"{_safe(task)}.safetensors").exists():
                continue
            st, loss = tr.train_task(model, tok, items, spec, names)
            emit(st.expert(0, task, tr.expert_meta(template, task, task, examples=len(items), final_loss=loss)))
            st.remove()
            log.info("task %s: %d examples, final loss %.4f", task, len(items), loss)
    if not outdir:
        if not written:
            raise MergetoolError(src, "no expert was kept", "relax --keep-if-correct or train longer")
        with atomic_output(output) as fh:
            for _, blob in written:
                fh.write(blob)



def _safe(name: str) -> str:
    """An expert's file name: its name with every character but letters, digits, '-' and '_' percent-encoded
    ('x/1' -> 'x%2F1', 'x:1' -> 'x%3A1', a leading '.' too), so distinct names give distinct, reversible file
    names; a name longer than 200 characters keeps 150 of them and a hash of the whole."""
    import hashlib

    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" or (c == "." and i) else
                   "".join(f"%{b:02X}" for b in c.encode("utf-8")) for i, c in enumerate(name))
    if len(safe) > 200:
        safe = safe[:150] + "~" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
    return safe or "~"


def file_names(names) -> dict[str, str]:
    """Each name's file name; two names mapping to one file are refused before any training."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for n in names:
        f = _safe(n)
        if f in seen and seen[f] != n:
            raise MergetoolError("--out-dir", f"{n!r} and {seen[f]!r} map to one file name", "rename one")
        seen[f] = n
        out[n] = f
    return out
