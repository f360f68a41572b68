"""What an adversarial pass found in the commands, kept found: signals and exit codes, values that must not pass,
outputs that must not be clobbered or left half-written, inputs checked before the model loads."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import default_sigint, lora_blob, random_lora, run_cli, signal_at

ROOT = Path(__file__).resolve().parents[1]


def capitals(n):
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    return [r for r in rows if r["task"] == "country-capital"][:n]


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def inproc(capsys, *args) -> tuple[int, str, str]:
    from mergetool.cli.main import run

    rc = run(list(args))
    got = capsys.readouterr()
    return rc, got.out, got.err


# ----------------------------------------------------------------------------- signals


def stopped_at(point: str, sig, args) -> tuple[int, str]:
    """Run the CLI and stop it with ``sig`` at ``point`` (``conftest.signal_at``): (exit code, stderr)."""
    r = signal_at(point, sig, *args)
    return r.returncode, r.stderr.decode()


CODES = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_is_one_line(sig, adapters, tmp_path):
    """Interrupted as torch starts being imported: the exit code and one line, no traceback."""
    rc, err = stopped_at("torch", sig, ["merge", "-m", "mean", *map(str, adapters), "-o", str(tmp_path / "o.safetensors")])
    code, word = CODES[sig]
    assert rc == code and err.strip() == f"mergetool merge: error: {word}", err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("point", ["numpy.dtypes", "transformers.models.llama.configuration_llama"])
def test_a_signal_during_transformers_lazy_import_is_one_line(point, sig, tiny_lm, tmp_path):
    """A signal while transformers imports a model's modules lazily (numpy.dtypes, through accelerate): the half-done
    import made transformers raise ModuleNotFoundError (or numpy "cannot load module more than once"), and the
    run ended "internal: ModuleNotFoundError" with exit 1. A failure after a signal is the signal's."""
    data = write(tmp_path / "d.jsonl", capitals(2))
    rc, err = stopped_at(point, sig, ["eval", "-q", "--base", str(tiny_lm), str(data)])
    code, word = CODES[sig]
    assert rc == code and err.strip() == f"mergetool eval: error: {word}", err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("module", ["mergetool.weights", "mergetool.streams"])
def test_a_signal_during_a_commands_last_import_is_not_lost(module, sig, tmp_path):
    """A signal inside an import is raised once the import ends, in the code that started it. It was sent again
    50 ms later by a timer: a short command (weight) finished its work in that time, the signal then fell on the
    end's SIG_IGN, and the run exited 0 with its output written."""
    rec = write(tmp_path / "r.jsonl", [{"task": "t", "adapter": a, "accuracy": x}
                                       for a, x in ((None, 0.2), ("a", 0.5), ("b", 0.7))])
    r = signal_at(module, sig, "weight", "--records", str(rec))
    code, word = CODES[sig]
    assert r.returncode == code and r.stdout == b"", r.stderr
    assert r.stderr.decode().strip() == f"mergetool weight: error: {word}", r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_commands_are_imported_names_itself(sig):
    """The handler installed while the package is imported (before ``run`` installs its own) says which signal
    came: a SIGTERM there once reported "interrupted" with exit 143."""
    p = subprocess.run([sys.executable, "-c", f"import os, time, mergetool.cli; os.kill(os.getpid(), {int(sig)}); "
                        "time.sleep(600)"], capture_output=True, preexec_fn=default_sigint)
    code, word = CODES[sig]
    assert p.returncode == code and p.stderr.decode().strip() == f"mergetool: error: {word}", p.stderr


def test_signals_at_moments_of_a_run_then_resume(tiny_lm, tmp_path):
    """SIGINT or SIGTERM at moments of eval (with -o): after the first chunk's records are on disk, before any new
    record of a resumed run, while transformers is imported: exit 130/143 and one line, the records on disk are
    whole lines, and --resume completes to the records of an uninterrupted run."""
    data = write(tmp_path / "d.jsonl", capitals(60) * 1)
    whole = {r["id"]: r for r in map(json.loads, run_cli("eval", "--base", str(tiny_lm), str(data), check=True)
                                     .stdout.decode().splitlines())}
    rng = random.Random(0)
    out = tmp_path / "r.jsonl"
    for k, point in enumerate(["mergetool.evaluate:evaluate#2", "mergetool.evaluate:evaluate", "safetensors.torch"]):
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        args = ["eval", "--base", str(tiny_lm), str(data), "-o", str(out)] + (["--resume"] if k else [])
        rc, err = stopped_at(point, sig, args)
        assert rc == CODES[sig][0], err
        one_error_line(err, rc)
        assert all(json.loads(x)["id"] for x in out.read_text().splitlines())  # whole lines only
        if k == 0:
            assert 0 < len(out.read_text().splitlines()) < 60  # the first chunk reached the disk before the end
    run_cli("eval", "--base", str(tiny_lm), str(data), "-o", str(out), "--resume", check=True)
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(got) == set(whole)
    for i, r in got.items():
        assert r["prediction"] == whole[i]["prediction"] and r["logprobs"] == pytest.approx(whole[i]["logprobs"], abs=1e-5)


def one_error_line(err: str, rc: int) -> None:
    """A stopped command says so in one line (its last), and nothing else went wrong on the way."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and sum("error:" in x for x in lines) == 1, err
    assert lines[-1].endswith("error: interrupted" if rc == 130 else "error: terminated"), err


def test_merge_stopped_at_each_moment_leaves_nothing_and_reruns_to_the_same_bytes(tmp_path):
    """SIGINT or SIGTERM while importing, reading, merging and writing a merge: exit 130/143 with one line and no
    output file or temporary beside it; run again, it writes the bytes of an uninterrupted merge (a merge has no
    --resume: it is atomic, and a rerun is the resume)."""
    from conftest import lora_blob, random_lora

    ins = []
    for i in range(12):
        p = tmp_path / f"big{i}.safetensors"
        p.write_bytes(lora_blob(random_lora(i, rank=64, name=f"big{i}")))
        ins.append(str(p))
    want = tmp_path / "want" / "m.safetensors"  # the same file name: the merge's name in its metadata comes from it
    want.parent.mkdir()
    run_cli("merge", "-m", "ties", "--density", "0.5", *ins, "-o", str(want), check=True)
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    rng = random.Random(1)
    for point in ("torch", "mergetool.blobs:read_blobs#5", "mergetool.methods.primitives:elect_sign",
                  "mergetool.blobs:write_blob"):
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        rc, err = stopped_at(point, sig, ["merge", "-m", "ties", "--density", "0.5", *ins, "-o", str(out)])
        assert rc == CODES[sig][0], (point, err)
        one_error_line(err, rc)
        assert list(out.parent.iterdir()) == []  # nothing half-written, nothing left beside it
    run_cli("merge", "-m", "ties", "--density", "0.5", *ins, "-o", str(out), check=True)
    assert out.read_bytes() == want.read_bytes()


def test_training_stopped_at_moments_resumes_to_the_same_experts(tiny_lm, tmp_path):
    """SIGINT or SIGTERM during per-example training into --out-dir (after a batch of experts is written, as a
    resumed run starts training, as it writes): exit 130/143 with one line, only whole expert files on disk, and
    --resume trains what is missing to the experts of an uninterrupted run."""
    from mergetool.blobs import read_blobs
    from mergetool.updates import from_blob

    data = write(tmp_path / "d.jsonl", capitals(8))
    base = ["train-expert", "--base", str(tiny_lm), "--per-example", "--epochs", "12", "--rank", "4",
            "--batch-size", "2", str(data)]
    run_cli(*base, "--out-dir", str(tmp_path / "whole"), check=True)
    out = tmp_path / "part"
    rng = random.Random(2)
    for k, point in enumerate(["mergetool.train:train_stacked#2", "mergetool.train:train_stacked",
                               "mergetool.blobs:blob_bytes#2"]):
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        rc, err = stopped_at(point, sig, [*base, "--out-dir", str(out)] + (["--resume"] if k else []))
        assert rc == CODES[sig][0], (point, err)
        one_error_line(err, rc)
        for f in out.iterdir() if out.exists() else []:  # whole files only (each one readable), no temporaries
            assert f.suffix == ".safetensors" and from_blob(read_blobs(str(f))[0], f.stem).modules
        if k == 0:
            assert 0 < len(list(out.iterdir())) < 8  # a batch's experts were written before the stop
    run_cli(*base, "--out-dir", str(out), "--resume", check=True)
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in out.iterdir()) and names
    for n in names:
        x = from_blob(read_blobs(str(tmp_path / "whole" / n))[0], "x")
        y = from_blob(read_blobs(str(out / n))[0], "y")
        for m in x.modules:
            assert (x.modules[m].delta() - y.modules[m].delta()).abs().max() < 1e-5, (n, m)


def test_interrupted_training_leaves_nothing(tiny_lm, tmp_path, adapters):
    data = write(tmp_path / "d.jsonl", capitals(1))  # one expert: -o FILE holds one
    rc, err = stopped_at("mergetool.train:train_stacked", signal.SIGINT, [
        "train-expert", "--base", str(tiny_lm), "--per-example", "--epochs", "200", "--rank", "4", str(data), "-o",
        str(tmp_path / "x.safetensors")])
    assert rc == 130 and err.strip().splitlines()[-1].endswith("error: interrupted"), err
    assert not (tmp_path / "x.safetensors").exists() and not list(tmp_path.glob(".mergetool-*"))


def test_closed_pipe_after_the_first_record_exits_0(tiny_lm, tmp_path):
    data = write(tmp_path / "d.jsonl", capitals(40))
    cmd = f"{sys.executable} -m mergetool eval --base {tiny_lm} {data} | head -n 1"
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 1 and b"Traceback" not in p.stderr, p.stderr


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("args,needle", [
    (["--lambda", "nan"], "--lambda"), (["--lambda", "inf"], "--lambda"), (["-m", "ties", "--density", "nan"], "finite"),
    (["-m", "breadcrumbs", "--gamma", "2"], "--gamma"), (["-m", "breadcrumbs", "--gamma", "-1"], "--gamma"),
    (["-m", "della", "--epsilon", "-1"], "--epsilon"), (["-m", "slerp", "--t", "nan"], "--t"),
])
def test_merge_refuses_out_of_range_and_non_finite_options(args, needle, adapters, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    rc, stdout, err = inproc(capsys, "merge", *args, str(adapters[0]), str(adapters[1]), "-o", str(out))
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1 and not out.exists(), err


def test_non_finite_and_duplicate_weights(adapters, tmp_path, capsys):
    w = tmp_path / "w.jsonl"
    for text, needle in [('{"adapter": "a0", "weight": NaN}\n{"adapter": "a1", "weight": 1}\n', "finite"),
                         ('{"adapter": "a0", "weight": Infinity}\n{"adapter": "a1", "weight": 1}\n', "finite"),
                         ('{"adapter": "a0", "weight": 1}\n{"adapter": "a0", "weight": 2}\n', "'a0' has a second")]:
        w.write_text(text)
        rc, _, err = inproc(capsys, "merge", "-m", "linear", "--weights", str(w), str(adapters[0]), str(adapters[1]),
                            "-o", str(tmp_path / "o.safetensors"))
        assert rc == 1 and needle in err, err


@pytest.mark.parametrize("opt,value", [("--rank", "0"), ("--lr", "0"), ("--lr", "nan"), ("--epochs", "0"),
                                       ("--alpha", "0"), ("--alpha", "nan"), ("--batch-size", "0")])
def test_train_expert_refuses_out_of_range_options(opt, value, tiny_lm, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", capitals(2))
    rc, _, err = inproc(capsys, "train-expert", "--base", str(tiny_lm), opt, value, str(data), "-o",
                        str(tmp_path / "o.safetensors"))
    assert rc == 2 and opt in err and "pass a value" in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- files and outputs


def test_eval_refuses_to_overwrite_its_input(tiny_lm, tmp_path, capsys, adapters):
    data = write(tmp_path / "same.jsonl", capitals(3))
    before = data.read_text()
    rc, _, err = inproc(capsys, "eval", "--base", str(tiny_lm), str(data), "-o", str(data))
    assert rc == 2 and "is the input" in err and data.read_text() == before
    # score writes its records as they complete too: -o onto its --data is refused the same way
    rc, _, err = inproc(capsys, "score", "--base", str(tiny_lm), "--data", str(data), "-o", str(data),
                        *map(str, adapters))
    assert rc == 2 and "is the input" in err and data.read_text() == before


def test_out_dir_file_names_are_distinct_and_reversible(tiny_lm, tmp_path):
    from urllib.parse import unquote

    rows = [{**r, "id": i} for r, i in zip(capitals(3), ["x/1", "x_1", "x:1"])]
    data = write(tmp_path / "d.jsonl", rows)
    d = tmp_path / "pool"
    r = run_cli("train-expert", "--base", str(tiny_lm), "--per-example", "--epochs", "1", "--rank", "2", str(data),
                "--out-dir", str(d))
    assert r.returncode == 0, r.stderr
    files = sorted(p.name.removesuffix(".safetensors") for p in d.iterdir())
    assert len(files) == 3 and sorted(unquote(f) for f in files) == sorted(["x/1", "x_1", "x:1"])


def test_eval_resume_refuses_another_run(tiny_lm, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", capitals(4))
    out = tmp_path / "r.jsonl"
    run_cli("eval", "--base", str(tiny_lm), str(data), "-o", str(out), check=True)
    before = out.read_text()
    rc, _, err = inproc(capsys, "eval", "--base", str(tiny_lm), "--norm", "chars", str(data), "-o", str(out), "--resume")
    assert rc == 1 and "another base model, other adapters" in err and out.read_text() == before


def test_eval_resume_refuses_another_adapter_or_its_retrained_content(tiny_lm, tmp_path, adapters, capsys):
    """A file written for adapter A is not continued with adapter B, nor with A retrained (same name, other
    weights); resuming with A itself adds nothing."""
    from conftest import lora_blob, random_lora

    data = write(tmp_path / "d.jsonl", capitals(3))
    out = tmp_path / "r.jsonl"
    a, b = adapters[0], adapters[1]
    run_cli("eval", "--base", str(tiny_lm), "--adapter", str(a), str(data), "-o", str(out), check=True)
    before = out.read_text()
    retrained = tmp_path / "again" / a.name
    retrained.parent.mkdir()
    retrained.write_bytes(lora_blob(random_lora(7, rank=2, name="a0")))  # the name a0, other weights
    for other in (b, retrained):
        rc, _, err = inproc(capsys, "eval", "--base", str(tiny_lm), "--adapter", str(other), str(data), "-o", str(out),
                            "--resume")
        assert rc == 1 and "other adapters" in err and out.read_text() == before, err
    rc, _, err = inproc(capsys, "eval", "--base", str(tiny_lm), "--adapter", str(a), str(data), "-o", str(out), "--resume")
    assert rc == 0 and out.read_text() == before, err


def test_a_refused_resume_leaves_the_file_as_it_was(tiny_lm, tmp_path, capsys):
    """Another base of the same shapes (other weights), a file that is not eval's, a binary file: refused in one
    line, and a last line without its newline is not cut from a file that is refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    data = write(tmp_path / "d.jsonl", capitals(2))
    other = tmp_path / "other"  # the same shapes, one layer's weights moved: another model
    shutil.copytree(tiny_lm, other)
    sd = load_file(str(other / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] += 1e-3
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "r.jsonl"
    run_cli("eval", "--base", str(tiny_lm), str(data), "-o", str(out), check=True)
    out.write_text(out.read_text().rstrip("\n"))  # as a crash leaves it: the last line without its newline
    before = out.read_text()
    rc, _, err = inproc(capsys, "eval", "--base", str(other), str(data), "-o", str(out), "--resume")
    assert rc == 1 and "another base model" in err and out.read_text() == before, err
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nline two without newline")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    for f, needle in ((notes, "is not a line eval wrote"), (binary, "not UTF-8")):
        keep = f.read_bytes()
        rc, _, err = inproc(capsys, "eval", "--base", str(tiny_lm), str(data), "-o", str(f), "--resume")
        assert rc == 1 and needle in err and len(err.strip().splitlines()) == 1 and f.read_bytes() == keep, err


def test_a_failed_run_leaves_nothing_new(tiny_lm, tmp_path, adapters):
    data = write(tmp_path / "d.jsonl", capitals(2))
    out = tmp_path / "r.jsonl"
    r = run_cli("eval", "--base", str(tmp_path / "nomodel"), str(data), "-o", str(out))
    assert r.returncode == 1 and not out.exists()
    model, peft = tmp_path / "model", tmp_path / "peft"
    r = run_cli("merge", "-m", "ties", "--base", str(tiny_lm), *map(str, adapters), "--save-model", str(model),
                "--save-peft", str(peft))
    assert r.returncode == 1 and b"PEFT cannot hold" in r.stderr, r.stderr
    assert not model.exists() and not peft.exists() and not list(tmp_path.glob(".model-*"))


# ----------------------------------------------------------------------------- checked before the model loads


def test_eval_checks_demonstrations_before_loading_and_skips_a_finished_resume(tiny_lm, tmp_path, capsys, monkeypatch):
    import mergetool.model as model

    data = write(tmp_path / "d.jsonl", capitals(3))
    loads = []
    real = model.load_model
    monkeypatch.setattr(model, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    rc, _, err = inproc(capsys, "eval", "--base", str(tiny_lm), "--shots", "2", str(data))
    assert rc == 1 and "demonstrations" in err and not loads
    out = tmp_path / "r.jsonl"
    assert inproc(capsys, "eval", "--base", str(tiny_lm), str(data), "-o", str(out))[0] == 0
    loads.clear()
    assert inproc(capsys, "eval", "--base", str(tiny_lm), str(data), "-o", str(out), "--resume")[0] == 0
    assert not loads and len(out.read_text().splitlines()) == 3


def test_eval_takes_the_base_from_the_adapter(tiny_lm, tmp_path):
    u = random_lora(1, targets={"q_proj": (64, 64)})
    u.meta["base_model"] = str(tiny_lm)
    a = tmp_path / "a.safetensors"
    a.write_bytes(lora_blob(u))
    data = write(tmp_path / "d.jsonl", capitals(2))
    r = run_cli("eval", "--adapter", str(a), str(data))
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr
    r = run_cli("eval", str(data))
    assert r.returncode == 2 and b"--base" in r.stderr


def test_perplexity_and_generation_are_cut_to_the_context(tmp_path, tiny_lm):
    """A GPT-2-style base (n_positions 32): long passages and prompts are cut from the left, no IndexError."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(d)
    for f in tiny_lm.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, d / f.name)
    long = " ".join(["The capital of France is Paris."] * 20)
    data = write(tmp_path / "d.jsonl", [{"id": "p", "text": long}, {"id": "g", "prompt": long, "target": "x"},
                                        {"id": "m", "prompt": long, "choices": [" a b c", " d"], "answer": 0}])
    r = run_cli("eval", "--base", str(d), "--max-new-tokens", "4", str(data))
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert recs[0]["tokens"] <= 32 and recs[0]["perplexity"] > 1 and "prediction" in recs[1]


def test_per_task_training_prints_no_warning(tiny_lm, tmp_path):
    data = write(tmp_path / "d.jsonl", capitals(4))
    r = run_cli("train-expert", "--base", str(tiny_lm), "--epochs", "1", str(data), "-o", str(tmp_path / "o.safetensors"))
    assert r.returncode == 0 and b"Warning" not in r.stderr, r.stderr


def test_a_model_saved_from_a_gguf_base_is_plain_safetensors(smol, tmp_path):
    """The cached base and a merge --save-model from the GGUF base both write plain safetensors whose config says
    nothing of GGUF (its weights are no longer quantised)."""
    from conftest import lora_blob, random_lora

    cfg = json.loads((smol[1] / "config.json").read_text())
    assert "quantization_config" not in cfg
    ad = tmp_path / "a.safetensors"
    ad.write_bytes(lora_blob(random_lora(0, rank=4, targets={"q_proj": (576, 576)}, layers=[0], name="a")))
    out = tmp_path / "merged"
    run_cli("merge", "-m", "mean", "--base", str(smol[0]), str(ad), "--save-model", str(out), check=True)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert not list(out.glob("*.gguf")) and list(out.glob("*.safetensors"))


def test_long_expert_names_sharing_a_prefix_get_distinct_short_files():
    """Names whose encodings pass 200 characters keep a prefix and a hash of the whole name: two ids sharing
    their first 250 characters get two files, each within the file systems' 255 bytes."""
    from mergetool.train_run import file_names

    a, b = "q" * 250 + "/1", "q" * 250 + "/2"
    names = file_names([a, b, "x/1"])
    assert len(set(names.values())) == 3 and names["x/1"] == "x%2F1"
    assert all(len((f + ".safetensors").encode()) <= 255 for f in names.values())
    assert file_names([a])[a] == names[a]  # the same name always gets the same file (--resume finds it)


def test_an_output_that_overflows_its_dtype_is_an_error_not_a_file(tiny_lm, tmp_path):
    """Every output is checked finite as written: a merge whose values pass float16's range (65504) is refused
    for the adapter file and for --save-model, and leaves neither behind."""
    from conftest import lora_blob, random_lora

    big = []
    for i in range(2):
        u = random_lora(i, rank=4, name=f"big{i}")
        for m in u.modules.values():
            m.B *= 1e8
        p = tmp_path / f"big{i}.safetensors"
        p.write_bytes(lora_blob(u))
        big.append(str(p))
    out, model = tmp_path / "o.safetensors", tmp_path / "model"
    for args in (["-o", str(out)], ["--rank", "8", "-o", str(out)], ["--base", str(tiny_lm), "--save-model", str(model)]):
        r = run_cli("merge", "-m", "task-arithmetic", "--dtype", "float16", *big, *args)
        assert r.returncode == 1 and b"NaN or Inf as float16" in r.stderr, r.stderr
        assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr
        assert not out.exists() and not model.exists() and not list(tmp_path.glob(".*"))
    assert run_cli("merge", "-m", "task-arithmetic", "--dtype", "float32", *big, "-o", str(out)).returncode == 0
