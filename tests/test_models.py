"""Full models in and out: task vectors of fine-tuned directories, --save-model, --save-peft."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import finetuned_copy, lora_blob, random_lora, run_cli

from mergetool.blobs import read_blobs
from mergetool.model import fingerprint, resolve_base
from mergetool.updates import from_blob


@pytest.fixture(scope="module")
def finetuned(tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    return [finetuned_copy(tiny_base, d / f"ft{i}", seed=10 + i) for i in range(3)]


def state(path):
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def test_full_model_task_vectors_stream_to_a_dense_blob(tiny_base, finetuned, tmp_path):
    out = tmp_path / "tv.safetensors"
    r = run_cli("merge", "-m", "mean", "--base", str(tiny_base), *map(str, finetuned[:2]), "-o", str(out))
    assert r.returncode == 0, r.stderr
    (blob,) = read_blobs(str(out))
    u = from_blob(blob, "tv")
    assert u.kind == "dense" and u.meta["parents"] == ["ft0", "ft1"]
    assert u.meta["base_fingerprint"] == fingerprint(resolve_base(str(tiny_base)))
    b, f0, f1 = state(tiny_base), state(finetuned[0]), state(finetuned[1])
    for name in b:
        if name == "lm_head.weight" and "base_model.model.lm_head" not in u.modules:
            continue
        key = "base_model.model." + name.removesuffix(".weight")
        want = (f0[name] + f1[name]) / 2 - b[name]
        assert torch.allclose(u.modules[key].delta(), want, atol=1e-6), name


def test_full_model_ties_save_model_loads(tiny_base, finetuned, tmp_path):
    out = tmp_path / "merged"
    r = run_cli("merge", "-m", "ties", "--density", "0.3", "--lambda", "0.8", "--base", str(tiny_base),
                *map(str, finetuned), "--save-model", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").exists()
    got = state(out)
    # the same merge through a dense blob, applied by hand
    tv = tmp_path / "tv.safetensors"
    run_cli("merge", "-m", "ties", "--density", "0.3", "--lambda", "0.8", "--base", str(tiny_base),
            *map(str, finetuned), "-o", str(tv), check=True)
    u = from_blob(read_blobs(str(tv))[0], "tv")
    b = state(tiny_base)
    for name, w in b.items():
        key = "base_model.model." + name.removesuffix(".weight")
        assert torch.allclose(got[name], w + u.modules[key].delta(), atol=1e-6), name


def test_lora_save_model_and_save_peft(tiny_base, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    mdir, pdir, blob = tmp_path / "m", tmp_path / "p", tmp_path / "k.safetensors"
    r = run_cli("merge", "-m", "knots", "--base", str(tiny_base), *map(str, adapters),
                "--save-model", str(mdir), "--save-peft", str(pdir), "-o", str(blob))
    assert r.returncode == 0, r.stderr
    u = from_blob(read_blobs(str(blob))[0], "k")
    assert u.meta["base_fingerprint"] == fingerprint(resolve_base(str(tiny_base)))
    # the merged model is base + ΔW, tensor for tensor
    b, m = state(tiny_base), state(mdir)
    for key, mod in u.modules.items():
        name = key.removeprefix("base_model.model.") + ".weight"
        assert torch.allclose(m[name], b[name] + mod.delta(), atol=1e-6)
    # PeftModel loads the directory and gives the same outputs as the merged model
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    base_model = AutoModelForCausalLM.from_pretrained(tiny_base)
    peft = PeftModel.from_pretrained(base_model, pdir).eval()
    merged = AutoModelForCausalLM.from_pretrained(mdir).eval()
    with torch.no_grad():
        a, c = peft(ids).logits, merged(ids).logits
    assert torch.allclose(a, c, atol=1e-4)
    cfg = json.loads((pdir / "adapter_config.json").read_text())
    assert cfg["r"] <= 2 + 4 + 6


def test_peft_directory_is_an_input(tiny_base, adapters, tmp_path):
    pdir = tmp_path / "p"
    run_cli("merge", "-m", "linear", str(adapters[0]), "--save-peft", str(pdir), check=True)
    out = tmp_path / "o.safetensors"
    run_cli("merge", "-m", "mean", str(pdir), "-o", str(out), check=True)
    a = from_blob(read_blobs(str(adapters[0]))[0], "a")
    o = from_blob(read_blobs(str(out))[0], "o")
    for k, m in a.modules.items():
        assert torch.allclose(o.modules[k].delta(), m.delta(), atol=1e-6)


def test_adapter_of_another_base_is_refused(tiny_base, tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(lora_blob(random_lora(1, name="x", fingerprint="0123456789abcdef")))
    r = run_cli("merge", "--base", str(tiny_base), str(p), "-o", str(tmp_path / "o.safetensors"))
    assert r.returncode == 1 and b"another base" in r.stderr


def test_full_model_without_base_is_refused(finetuned, tmp_path):
    r = run_cli("merge", str(finetuned[0]), "-o", str(tmp_path / "o.safetensors"))
    assert r.returncode == 1 and b"--base" in r.stderr


def test_pickle_model_refused_unless_allowed(tiny_base, tmp_path):
    import shutil

    d = tmp_path / "pk"
    d.mkdir()
    shutil.copy(tiny_base / "config.json", d / "config.json")
    sd = {k: v + 0.01 for k, v in state(tiny_base).items()}
    torch.save(sd, d / "pytorch_model.bin")
    out = tmp_path / "o.safetensors"
    r = run_cli("merge", "--base", str(tiny_base), str(d), "-o", str(out))
    assert r.returncode == 1 and b"pickle" in r.stderr and not out.exists()
    r = run_cli("merge", "--allow-pickle", "--base", str(tiny_base), str(d), "-o", str(out))
    assert r.returncode == 0, r.stderr
    u = from_blob(read_blobs(str(out))[0], "o")
    assert torch.allclose(u.modules["base_model.model.model.norm"].delta(), torch.full((64,), 0.01), atol=1e-6)


def test_save_model_shards_with_an_index(tiny_base, adapters, tmp_path, monkeypatch):
    import mergetool.model as model
    from mergetool.methods import Params, get, merge_stream
    from mergetool.updates import from_blob as fb

    monkeypatch.setattr(model, "SHARD_BYTES", 40_000)
    us = [fb(read_blobs(str(p))[0], p.stem) for p in adapters]
    out = tmp_path / "sharded"
    out.mkdir()
    base = model.resolve_base(str(tiny_base))
    info = model.save_model(base, out, merge_stream(us, get("mean"), Params(), torch.device("cpu")),
                            torch.device("cpu"))
    assert info["shards"] > 1 and (out / "model.safetensors.index.json").exists()
    got, b = state(out), state(tiny_base)
    for k, m in us[0].modules.items():
        name = k.removeprefix("base_model.model.") + ".weight"
        want = b[name] + sum(fb(read_blobs(str(p))[0], "x").modules[k].delta() for p in adapters) / 3
        assert torch.allclose(got[name], want, atol=1e-6)


def test_index_names_the_weight_files_and_total_size_follows_dtype(tiny_base, adapters, tmp_path, monkeypatch):
    """A directory with model.safetensors.index.json is read through its index (a stray consolidated file
    beside the shards is not mixed in); --dtype sizes the written index's total_size."""
    import shutil

    import mergetool.model as model
    from mergetool.blobs import blob_bytes
    from mergetool.methods import Params, get, merge_stream
    from mergetool.updates import from_blob as fb

    monkeypatch.setattr(model, "SHARD_BYTES", 40_000)
    us = [fb(read_blobs(str(p))[0], p.stem) for p in adapters]
    base = model.resolve_base(str(tiny_base))
    out = tmp_path / "sharded"
    out.mkdir()
    model.save_model(base, out, merge_stream(us, get("mean"), Params(), torch.device("cpu")), torch.device("cpu"),
                     dtype=torch.bfloat16)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    numel = sum(v.numel() for v in state(tiny_base).values())
    assert index["metadata"]["total_size"] == 2 * numel  # bf16, not the base's fp32
    for f in tiny_base.iterdir():
        if f.name != "model.safetensors" and not f.name.startswith("model-"):
            shutil.copy(f, out / f.name)
    (out / "consolidated.safetensors").write_bytes(blob_bytes({"junk": torch.zeros(3)}, {}))
    t = model.ModelTensors(model.resolve_base(str(out)))
    assert "junk" not in t.keys() and set(t.keys()) == set(state(tiny_base))
    # without an index, two files holding one tensor are refused rather than mixed
    (out / "model.safetensors.index.json").unlink()
    (out / "consolidated.safetensors").write_bytes(blob_bytes({"model.norm.weight": torch.zeros(64)}, {}))
    with pytest.raises(Exception, match="two weight files"):
        model.ModelTensors(model.resolve_base(str(out)))


def test_base_reader_cache_does_not_grow(tiny_base, tmp_path):
    import shutil

    import mergetool.model as model

    other = tmp_path / "copy"
    shutil.copytree(tiny_base, other)
    for d in (tiny_base, other, tiny_base):
        model.base_tensors(model.resolve_base(str(d)))
        assert len(model._BASES) == 1
