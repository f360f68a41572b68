"""What every benchmark records beside its figures: the machine it ran on, and device synchronisation."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def pick(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def machine(dev, packages=("transformers", "peft")) -> dict:
    """CPU model, core count, GPU, Python and package versions."""
    cpu = None
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), None)
    out = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "threads": torch.get_num_threads(), "cpu": cpu or platform.processor(), "platform": platform.platform(),
           "gpu": torch.cuda.get_device_name(dev) if torch.device(dev).type == "cuda" else None}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def testbed_dir(model: Path | None, workdir: Path) -> Path:
    """``model`` when given, else the testbed model (SmolLM2-135M-Instruct) cached from its GGUF in ``workdir``."""
    if model is not None:
        return model
    from mergetool.model import cache_gguf, resolve_base, testbed_gguf

    d = workdir / "smollm2-135m"
    if not (d / "config.json").exists():
        workdir.mkdir(parents=True, exist_ok=True)
        cache_gguf(resolve_base(str(testbed_gguf())), d)
    return d


def country_questions(n: int | None = None):
    """The first ``n`` records of examples/data/countries.jsonl as examples, each prompt its context."""
    import json

    from mergetool.examples import check_examples

    root = Path(__file__).resolve().parents[1]
    rows = [json.loads(x) for x in (root / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    exs = check_examples(rows, "countries")[:n]
    for e in exs:
        e.context = e.rec["prompt"]
    return exs


def random_loras(n: int, rank: int, layers: int, hidden: int, kv: int, dev, seed: int = 0,
                 projs=("q_proj", "k_proj", "v_proj", "o_proj")):
    """n random rank-``rank`` LoRAs (scale 2) on the attention projections of a Llama-shaped model:
    q/o [hidden, hidden], k/v [kv, hidden]."""
    from mergetool.updates import LowRank, Update

    g = torch.Generator(device=dev).manual_seed(seed)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden)}
    ups = []
    for i in range(n):
        mods = {}
        for layer in range(layers):
            for proj in projs:
                out, inp = shapes[proj]
                A = torch.randn(rank, inp, generator=g, device=dev) / inp ** 0.5
                B = torch.randn(out, rank, generator=g, device=dev) / rank ** 0.5
                mods[f"base_model.model.model.layers.{layer}.self_attn.{proj}"] = LowRank(A, B, 2.0)
        ups.append(Update(f"t{i}", mods, {"name": f"t{i}"}))
    return ups
