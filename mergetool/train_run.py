"""A train-expert run around the trainer (``train.py``): the recipe's defaults per task and per example, the
examples it trains on, each expert's file name, where the experts go (a file each, or blobs gathered for a stream
or a single file), and the two ways it trains: per task, and per example, many experts at once, here or on a Ray
cluster. ``cli/train_expert.py`` parses and checks the options and calls these.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

from .errors import MergetoolError, UsageError
from .examples import Example

log = logging.getLogger("mergetool")

PER_EXAMPLE = {"rank": 64, "alpha": 128.0, "lr": 4e-3, "epochs": 10, "batch_size": 64}  # "Will it Merge?" A.6
PER_TASK = {"rank": 16, "alpha": 32.0, "lr": 5e-4, "epochs": 3, "batch_size": 8}


def recipe(per_example: bool, rank: int | None, alpha: float | None, lr: float | None, epochs: int | None,
           batch_size: int | None, seed: int, dora: bool, target_modules: str | None, layers: str | None) -> dict:
    """The keyword arguments of ``train.LoraSpec``: the given values, the recipe's defaults for the others (per
    example or per task), each checked in range; ``target_modules`` and ``layers`` comma-separated."""
    d = PER_EXAMPLE if per_example else PER_TASK
    given = {"rank": rank, "alpha": alpha, "lr": lr, "epochs": epochs, "batch_size": batch_size}
    kw = {k: d[k] if v is None else v for k, v in given.items()}
    for opt, value, ok, rule in (("--rank", kw["rank"], kw["rank"] >= 1, "≥ 1"),
                                 ("--epochs", kw["epochs"], kw["epochs"] >= 1, "≥ 1"),
                                 ("--batch-size", kw["batch_size"], kw["batch_size"] >= 1, "≥ 1"),
                                 ("--lr", kw["lr"], math.isfinite(kw["lr"]) and 0 < kw["lr"] <= 1, "in (0, 1]"),
                                 ("--alpha", kw["alpha"], math.isfinite(kw["alpha"]) and kw["alpha"] > 0,
                                  "a finite number > 0")):
        if not ok:
            raise UsageError(opt, f"{value} is out of range", f"pass a value {rule}")
    kw.update(seed=seed, dora=dora, targets=None)
    if target_modules is not None:
        kw["targets"] = [t.strip() for t in target_modules.split(",") if t.strip()]
        if not kw["targets"]:
            raise UsageError("--target-modules", "names no module", "pass names such as mlp.up_proj")
    try:
        kw["layers"] = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise UsageError("--layers", f"{layers!r} is not a list of integers", "pass --layers 14 or 0,1,2") from None
    return kw


def read_examples(data: str, task_filter: str | None, per_example: bool, skip_known: bool,
                  keep_if_correct: bool) -> list[Example]:
    """The examples to train on (of the tasks of ``task_filter``, comma-separated), every check on them made before
    the model loads: per example, each needs a ``text``, and --skip-known/--keep-if-correct multiple choice."""
    from .examples import check_examples
    from .jsonl import read_jsonl

    src = source(data)
    exs = check_examples(read_jsonl(data), src)
    if task_filter:
        keep = set(task_filter.split(","))
        exs = [e for e in exs if e.task in keep]
    if not exs:
        raise MergetoolError(src, "no examples to train on", "check --task-filter")
    if per_example:
        missing = [e.id for e in exs if not isinstance(e.rec.get("text"), str) or not e.rec["text"].strip()]
        if missing:
            raise MergetoolError(src, f"example {missing[0]!r} has no 'text' to train on",
                                 "per-example experts train on each record's text")
        if (skip_known or keep_if_correct) and any(e.kind != "mc" for e in exs):
            raise MergetoolError(src, "--skip-known/--keep-if-correct need multiple-choice records",
                                 "give prompt, choices and answer")
    return exs


def source(data: str) -> str:
    return "<stdin>" if data == "-" else data


def check_outputs(exs: list[Example], per_example: bool, out_dir: str | None, output: str | None) -> None:
    """Refused before any training: two experts whose names map to one file of --out-dir, and several experts for
    a file (-o FILE), which holds one standard safetensors blob."""
    from .outputs import is_stream

    if out_dir:
        file_names(e.id for e in exs) if per_example else file_names(dict.fromkeys(e.task for e in exs))
    elif not is_stream(output):
        n = len(exs) if per_example else len({e.task for e in exs})
        if n > 1:
            raise UsageError("-o", f"{output} would hold {n} experts ({'examples' if per_example else 'tasks'}), and a "
                             "safetensors file holds one", "pass --out-dir DIR (one file each), or -o - for a stream "
                             "of blobs")


def safe_name(name: str) -> str:
    """An expert's file name: its name with every character but letters, digits, '-' and '_' percent-encoded
    ('x/1' -> 'x%2F1', 'x:1' -> 'x%3A1', a leading '.' too), so distinct names give distinct, reversible file
    names; a name longer than 200 characters keeps 150 of them and a hash of the whole."""
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
        f = safe_name(n)
        if f in seen and seen[f] != n:
            raise MergetoolError("--out-dir", f"{n!r} and {seen[f]!r} map to one file name", "rename one")
        seen[f] = n
        out[n] = f
    return out


def prepare(base, dev, spec, base_name: str, fp: str, per_example: bool, ray: bool):
    """The model and tokenizer (None, None on Ray: the driver reads only the model's layout, not its weights), the
    modules the experts target, and the metadata every expert of the run carries."""
    import torch

    from .model import load_model, skeleton
    from .train import run_template, target_modules

    model = tok = None
    if ray:
        layout = skeleton(base)
    else:
        model, tok = load_model(base, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
        layout = model
    names = target_modules(layout, spec, default_middle=per_example)
    return model, tok, names, run_template(layout, spec, names, base_name, fp, per_example)


class Experts:
    """Where the experts go: one ``<name>.safetensors`` each into ``out_dir`` (written atomically as each is
    trained), or gathered for ``finish`` (a stream of blobs, or the one expert of a file)."""

    def __init__(self, out_dir: str | None):
        self.dir = Path(out_dir) if out_dir else None
        self.blobs: list[tuple[str, bytes]] = []
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)

    def written(self, name: str) -> bool:
        """Whether --out-dir already holds this expert (``--resume``)."""
        return (self.dir / f"{safe_name(name)}.safetensors").exists()

    def add_blob(self, name: str, blob: bytes) -> None:
        from .outputs import atomic_output

        if self.dir:
            with atomic_output(str(self.dir / f"{safe_name(name)}.safetensors")) as fh:
                fh.write(blob)
        else:
            self.blobs.append((name, blob))

    def add(self, u) -> None:
        from .blobs import blob_bytes
        from .train import check_finite
        from .updates import metadata_for, to_tensors

        check_finite(u)
        self.add_blob(u.name, blob_bytes(to_tensors(u), metadata_for(u)))

    def finish(self, output: str | None, src: str) -> None:
        """The gathered experts to ``output`` (a file, or a stream of blobs); none kept is an error."""
        from .outputs import atomic_output

        if self.dir:
            return
        if not self.blobs:
            raise MergetoolError(src, "no expert was kept", "relax --keep-if-correct or train longer")
        with atomic_output(output) as fh:
            for _, blob in self.blobs:
                fh.write(blob)


def train_per_task(model, tok, exs: list[Example], spec, names: list[str], template: dict, experts: Experts,
                   resume: bool) -> None:
    """One expert per task, on all of its task's records (with ``resume``, the tasks --out-dir holds skipped)."""
    from . import train as tr

    by_task: dict[str, list] = {}
    for e, item in zip(exs, tr.training_pairs(exs)):
        by_task.setdefault(e.task, []).append(item)
    for task, items in by_task.items():
        if resume and experts.written(task):
            continue
        st, loss = tr.train_task(model, tok, items, spec, names)
        experts.add(st.expert(0, task, tr.expert_meta(template, task, task, examples=len(items), final_loss=loss)))
        st.remove()
        log.info("task %s: %d examples, final loss %.4f", task, len(items), loss)


def train_per_example(model, tok, exs: list[Example], spec, spec_kw: dict, names: list[str], template: dict,
                      experts: Experts, resume: bool, skip_known: bool, keep_if_correct: bool, fp: str,
                      cluster=None, ordered: bool = True) -> None:
    """One expert per example, ``spec.batch_size`` at once (experts of similar text lengths together), in the
    input's order: with ``resume`` those --out-dir holds are skipped, with ``skip_known`` those the base already
    answers, with ``keep_if_correct`` only experts that answer their own question are kept. ``cluster``: a
    connected ``distributed`` cluster that trains the batches instead of this process (``ordered``: its results
    taken in the batches' order, not as they finish)."""
    from . import train as tr

    if resume:
        exs = [e for e in exs if not experts.written(e.id)]
    for e in exs:
        e.context = e.rec.get("prompt", "")
    rspec = None
    if cluster is not None:
        from . import distributed as dist

        rspec = dist.examples_spec(exs, f"train:{fp}:{spec.seed}", lora=spec_kw,
                                   keep_if_correct=keep_if_correct, meta=template)
    known = _known(model, tok, exs, cluster, rspec) if skip_known else set()
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
                experts.add_blob(name, blob)
                tally["kept"] += 1
        tally["trained"] += len(results)
        log.info("trained %d/%d experts", tally["trained"], len(exs))

    if cluster is not None:
        cluster.run("train", [(rspec, [index[e.id] for e in chunk]) for chunk in batches],
                    lambda j, res: take(res), ordered)
    for chunk in (batches if cluster is None else []):
        take(tr.train_examples(model, tok, chunk, spec, names, template, keep_if_correct))
    if keep_if_correct:
        log.info("--keep-if-correct: kept %d experts, dropped %d that miss their own question", tally["kept"],
                 tally["dropped"])
    experts.blobs.sort(key=lambda w: rank_of[w[0]])


def _known(model, tok, exs: list[Example], cluster, rspec) -> set[str]:
    """The ids of the examples the base already answers (``--skip-known``)."""
    if cluster is not None:
        chunks = [list(range(s, min(len(exs), s + 256))) for s in range(0, len(exs), 256)]
        flags: list[bool] = []
        cluster.run("known", [(rspec, c) for c in chunks], lambda j, res: flags.extend(res))
        known = {e.id for e, k in zip(exs, flags) if k}
    else:
        from .evaluate import evaluate

        known = {e.id for e, r in zip(exs, evaluate(model, tok, exs)[0]) if r["correct"]}
    log.info("--skip-known: %d of %d examples already answered by the base; %d left", len(known), len(exs),
             len(exs) - len(known))
    return known
