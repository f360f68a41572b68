"""Build multiple-choice JSONL from the testbed's GLUE tasks (SST-2, RTE, WNLI, MRPC, CoLA).

    python examples/make_glue.py GLUE_DIR --per-split 200 > glue.jsonl

GLUE_DIR holds the tasks' GLUE files, one folder per task (the testbed's ``glue`` folder).

Each record: ``id``, ``task`` (sst2, rte, wnli, mrpc, cola), ``split`` (train or dev; GLUE's test splits
are unlabeled and skipped), ``prompt`` (the task's question, ending in "Answer:"), ``choices`` (the label
words, with a leading space), ``answer`` (index), and ``text`` (prompt + answer, for training an expert on
the task). Records are taken in file order, at most --per-split per split and task. The prompts are
lm-evaluation-harness's GLUE templates.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def read_tsv(path: Path, header: bool = True) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # MRPC starts with a BOM
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def sst2(row):
    return f"{row[0].strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:", [" negative", " positive"], int(row[1])


def rte(row):
    return (f"{row[1]}\nQuestion: {row[2]} True or False?\nAnswer:", [" True", " False"],
            0 if row[3] == "entailment" else 1)


def wnli(row):
    return f"{row[1]}\nQuestion: {row[2]} True or False?\nAnswer:", [" False", " True"], int(row[3])


def mrpc(row):
    return (f"Sentence 1: {row[3]}\nSentence 2: {row[4]}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
            [" no", " yes"], int(row[0]))


def cola(row):
    return f"{row[3]}\nQuestion: Does this sentence make sense?\nAnswer:", [" no", " yes"], int(row[1])


TASKS = {"sst2": ("SST-2", sst2, True), "rte": ("RTE", rte, True), "wnli": ("WNLI", wnli, True),
         "mrpc": ("MRPC", mrpc, True), "cola": ("CoLA", cola, False)}


def build(folder: Path, tasks: list[str], per_split: int):
    for task in tasks:
        sub, fn, header = TASKS[task]
        for split in ("train", "dev"):
            rows = [r for r in read_tsv(folder / sub / f"{split}.tsv", header) if r]
            for i, row in enumerate(rows[:per_split]):
                prompt, choices, answer = fn(row)
                yield {"id": f"{task}-{split}-{i}", "task": task, "split": split, "prompt": prompt,
                       "choices": choices, "answer": answer, "text": prompt + choices[answer]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--per-split", type=int, default=200)
    args = ap.parse_args()
    for rec in build(args.folder, args.tasks.split(","), args.per_split):
        sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
