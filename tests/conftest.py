"""Fixtures: random LoRA adapters with PEFT key names and a tiny Llama built from a config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergetool.blobs import blob_bytes
from mergetool.updates import PREFIX, LowRank, Update

HIDDEN, INTER, LAYERS = 64, 128, 2
TARGETS = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN // 2, HIDDEN), "up_proj": (INTER, HIDDEN)}


def module_name(layer: int, proj: str) -> str:
    part = "mlp" if proj.endswith(("up_proj", "down_proj", "gate_proj")) else "self_attn"
    return f"{PREFIX}model.layers.{layer}.{part}.{proj}"


def random_lora(seed: int, rank: int = 4, alpha: float = 8.0, targets=TARGETS, layers=range(LAYERS),
                name: str | None = None, fingerprint: str | None = None, task: str | None = None) -> Update:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for layer in layers:
        for proj, (out, inp) in targets.items():
            A = torch.randn(rank, inp, generator=g) / inp ** 0.5
            B = torch.randn(out, rank, generator=g) * 0.1
            mods[module_name(layer, proj)] = LowRank(A, B, alpha / rank)
    meta = {"name": name or f"lora{seed}", "kind": "lora", "base_model": "tiny-llama",
            "peft_config": {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets), "use_rslora": False}}
    if fingerprint:
        meta["base_fingerprint"] = fingerprint
    if task:
        meta["task"] = task
    return Update(meta["name"], mods, meta, torch.float32)


def lora_blob(u: Update) -> bytes:
    """Serialise with the original (unfolded) alpha, as PEFT would save it."""
    tensors = {}
    for mod, m in u.modules.items():
        tensors[f"{mod}.lora_A.weight"] = m.A.contiguous()
        tensors[f"{mod}.lora_B.weight"] = m.B.contiguous()
    return blob_bytes(tensors, {"format": "pt", "mergetool": json.dumps(u.meta)})


@pytest.fixture
def adapters(tmp_path):
    """Three random LoRA adapter files of the tiny Llama's shapes."""
    paths = []
    for i in range(3):
        p = tmp_path / f"a{i}.safetensors"
        p.write_bytes(lora_blob(random_lora(i, rank=2 + 2 * i, name=f"a{i}")))
        paths.append(p)
    return paths


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny randomly initialised Llama saved as a model directory."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_base")
    LlamaForCausalLM(tiny_config()).save_pretrained(d)
    return d


def finetuned_copy(base_dir: Path, out: Path, seed: int, scale: float = 0.01) -> Path:
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    m.save_pretrained(out)
    return out


def default_sigint() -> None:
    """``preexec_fn`` of a child that a test signals: SIGINT and SIGTERM at their defaults, as in a terminal, even
    when the suite runs from a background shell (``nohup``, ``&``), whose children inherit SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# The CLI, with a signal the process sends itself at a moment chosen by an event, not by a clock (a busy machine
# moves nothing): when it starts importing a module ("torch"), or when a function or method is called
# ("module:function", "module:Class.method", "...#N" for the N-th call; the signal arrives as the call begins).
_SIGNAL_AT = """
import importlib.util, os, runpy, sys
point, sig = sys.argv[1], int(sys.argv[2])
module, _, func = point.partition(":")
func, _, nth = func.partition("#")
nth = int(nth or 1)


def arm(m):
    *owners, name = func.split(".")  # "function", or "Class.method"
    for o in owners:
        m = getattr(m, o)
    f, calls = getattr(m, name), [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            setattr(m, name, f)
            os.kill(os.getpid(), sig)
        return f(*a, **k)

    setattr(m, name, wrapped)


class Hook:
    def find_spec(self, name, path=None, target=None):
        if name != module:
            return None
        sys.meta_path.remove(self)
        if not func:
            os.kill(os.getpid(), sig)
            return None
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        spec.loader.exec_module = lambda m: (run(m), arm(m))
        return spec


sys.meta_path.insert(0, Hook())
sys.argv = ["mergetool", *sys.argv[3:]]
runpy.run_module("mergetool", run_name="__main__", alter_sys=True)
"""


def signal_at(point: str, sig: int, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI with ``args``; it sends itself ``sig`` at ``point``: ``"module"`` as it first imports it (one the
    command imports after it started: torch, transformers, ...), ``"module:function"`` or ``"module:Class.method"``
    (``...#N``: the N-th call) as that call begins. A point never reached leaves the run to finish (exit 0)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-c", _SIGNAL_AT, point, str(int(sig)), *args], capture_output=True,
                          env=env, preexec_fn=default_sigint)


def run_cli(*args: str, input: bytes | None = None, check: bool = False, cwd=None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would, in a subprocess (in ``cwd`` when given, with ``env`` added to the
    environment)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    r = subprocess.run([sys.executable, "-m", "mergetool", *args], input=input, capture_output=True, env=env, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}: {r.stderr.decode()}")
    return r


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """SmolLM2-135M-Instruct from the testbed: (GGUF file, cached fp32 safetensors directory)."""
    from mergetool.model import cache_gguf, resolve_base, testbed_gguf

    try:
        gguf = testbed_gguf()
    except Exception as e:  # scripts/setup.sh installs it; say so rather than fail obscurely
        pytest.skip(f"testbed model not installed: {e}")
    d = tmp_path_factory.mktemp("smol") / "smollm2"
    cache_gguf(resolve_base(str(gguf)), d, dtype=torch.float32)
    return gguf, d


@pytest.fixture(scope="session")
def tiny_lm(smol, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (the only tokenizer that works offline)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_lm")
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(d)
    for f in smol[1].iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, d / f.name)
    return d
