"""``mergetool train-expert``: LoRA experts, one per task or one per example (many at once)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .common import (BaseModel, Data, Debug, Device, GgufFile, Quiet, Ray, Seed, Unordered, Workers, pick_device,
                     require_data_and_base)
from .app import begin, command


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
    from .. import train_run as run
    from ..outputs import check_output
    from ..streams import refuse_binary_to_tty

    if not out_dir:
        refuse_binary_to_tty(output)
        check_output(output)
    spec_kw = run.recipe(per_example, rank, alpha, lr, epochs, batch_size, seed, dora, target_modules, layers)
    from ..model import fingerprint, resolve_base
    from ..train import LoraSpec

    dev = pick_device(device)
    exs = run.read_examples(data, task_filter, per_example, skip_known, keep_if_correct)
    run.check_outputs(exs, per_example, out_dir, output)
    b = resolve_base(base, gguf_file)
    fp = fingerprint(b)
    spec = LoraSpec(**spec_kw)
    model, tok, names, template = run.prepare(b, dev, spec, base, fp, per_example, bool(ray))
    experts = run.Experts(out_dir)
    if per_example:
        cluster = None
        if ray:
            from .. import distributed as dist

            cluster = dist.connect(ray, workers, base, gguf_file, fp, device, None)
        run.train_per_example(model, tok, exs, spec, spec_kw, names, template, experts, resume, skip_known,
                              keep_if_correct, fp, cluster, not unordered)
    else:
        run.train_per_task(model, tok, exs, spec, names, template, experts, resume)
    experts.finish(output, run.source(data))
