"""Round three of the adversarial pass, beyond outputs: values that must not pass (a temperature that overflowed,
a negative seed), an adapter given twice, chat templates that are not there, merges of updates that are zero or
ill-conditioned, signals while transformers is imported, Ray addresses, and the messages of odd files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import lora_blob, random_lora, run_cli

ROOT = Path(__file__).resolve().parents[1]


def inproc(capsys, *args) -> tuple[int, str, str]:
    from mergetool.cli.main import run

    rc = run(list(args))
    got = capsys.readouterr()
    return rc, got.out, got.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "internal" not in err and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- weight


def test_weight_with_a_tiny_tau_is_the_arg_max(tmp_path, capsys):
    """τ = 1e-320 once gave NaN weights (s/τ = inf, inf − inf): the softmax is now taken after subtracting the
    largest s, so a tiny τ gives the arg-max (ties shared) and a huge one the uniform weights."""
    recs = tmp_path / "base.jsonl"
    recs.write_text("".join(json.dumps({"task": t, "adapter": None, "accuracy": a}) + "\n"
                            for t, a in (("t1", 0.7), ("t2", 0.3), ("t3", 0.3))))
    for tau, want in (("1e-320", [0.0, 0.5, 0.5]), ("5e-324", [0.0, 0.5, 0.5]), ("1e308", [1 / 3] * 3)):
        rc, out, err = inproc(capsys, "weight", "--records", str(recs), "--tau", tau)
        assert rc == 0, err
        got = [json.loads(x)["weight"] for x in out.splitlines()]
        assert got == pytest.approx(want, abs=1e-12), (tau, got)
    rc, out, err = inproc(capsys, "weight", "--records", str(recs), "--tau", "0.5")
    s = [0.3, 0.7, 0.7]
    want = [math.exp(x / 0.5) / sum(math.exp(y / 0.5) for y in s) for x in s]
    assert [json.loads(x)["weight"] for x in out.splitlines()] == pytest.approx(want, rel=1e-12)


def test_weight_refuses_an_adapter_given_twice(tmp_path, capsys):
    d = tmp_path / "pool"
    d.mkdir()
    (d / "a.safetensors").write_bytes(lora_blob(random_lora(0, name="a", task="t1")))
    (d / "b.safetensors").write_bytes(lora_blob(random_lora(1, name="b", task="t2")))
    recs = tmp_path / "base.jsonl"
    recs.write_text("".join(json.dumps({"task": t, "adapter": None, "accuracy": 0.5}) + "\n" for t in ("t1", "t2")))
    rc, out, err = inproc(capsys, "weight", "--records", str(recs), str(d), str(d / "a.safetensors"))
    assert rc == 1 and out == "" and "a: two inputs have this name" in one_line(err)
    rc, out, err = inproc(capsys, "weight", "--records", str(recs), str(d))
    assert rc == 0 and [json.loads(x)["adapter"] for x in out.splitlines()] == ["a", "b"]


# ----------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("cmd", ["merge", "eval", "score", "diagnose", "train-expert"])
def test_negative_seeds_are_refused(cmd, capsys):
    """``random.Random(-1)`` is ``random.Random(1)``: --seed -1 gave the plan of --seed 1. Every --seed is ≥ 0."""
    rc, out, err = inproc(capsys, cmd, "--seed", "-1", "x")
    assert rc == 2 and "--seed" in one_line(err) and "greater than or equal to 0" in err, err
    rc, out, err = inproc(capsys, cmd, "--seed", str(2**64), "x")
    assert rc == 2 and "--seed" in one_line(err), err


# ----------------------------------------------------------------------------- --chat without a template


@pytest.fixture(scope="module")
def no_template(tiny_lm, tmp_path_factory):
    """tiny_lm with a tokenizer that has no chat template."""
    import shutil

    d = tmp_path_factory.mktemp("no_template")
    for f in tiny_lm.iterdir():
        if f.name != "chat_template.jinja":
            shutil.copy(f, d / f.name)
    return d


@pytest.mark.parametrize("cmd", ["eval", "score", "diagnose"])
def test_chat_without_a_template_is_one_line(cmd, no_template, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "task": f"t{i % 2}", "prompt": "2+2=", "choices": ["4", "5"],
                                        "answer": 0}) + "\n" for i in range(4)))
    pool = []
    for i in range(2):
        p = tmp_path / f"a{i}.safetensors"
        p.write_bytes(lora_blob(random_lora(i, name=f"a{i}", task=f"t{i}")))
        pool.append(str(p))
    args = {"eval": ["--adapter", pool[0], str(data)],
            "score": ["--data", str(data), "--level", "task", "--partners", "1", "--trials", "1", *pool],
            "diagnose": ["--data", str(data), *pool]}[cmd]
    r = run_cli(cmd, "--base", str(no_template), "--chat", *args)  # a subprocess: a user's stderr, bars off
    rc, out, err = r.returncode, r.stdout.decode(), r.stderr.decode()
    err = "\n".join(x for x in err.splitlines() if ": error: " in x or "Traceback" in x or "internal" in x)
    assert rc == 1 and out == "" and "--chat: the base model's tokenizer has no chat template" in one_line(err), err


def test_a_chat_template_that_fails_is_one_line():
    from mergetool.errors import MergetoolError
    from mergetool.examples import add_contexts, check_examples

    class Tok:
        chat_template = "{{ raise_exception('System role not supported') }}"

        def apply_chat_template(self, *a, **k):
            from jinja2.exceptions import TemplateError

            raise TemplateError("System role not supported")

    exs = check_examples([{"id": "q", "task": "t", "prompt": "p", "choices": ["a", "b"], "answer": 0}], "d")
    with pytest.raises(MergetoolError, match=r"--chat: example q: the chat template fails on it \(TemplateError: "
                                             r"System role not supported\)"):
        add_contexts(exs, exs, 0, 0, Tok(), True)


# ----------------------------------------------------------------------------- merges of zero or ill-conditioned updates


def zero_lora(seed: int, name: str):
    """peft's default initialisation: B = 0, so ΔW = 0."""
    import torch

    from mergetool.updates import LowRank

    u = random_lora(seed, name=name, task=name)
    u.modules = {k: LowRank(m.A, torch.zeros_like(m.B), m.scale) for k, m in u.modules.items()}
    return u


def method_args(m: str, files: list[str], tmp_path: Path) -> list[str]:
    from mergetool.methods import get

    files = files[:get(m).max_inputs]  # slerp two, nearswap one
    if m == "weighted-base":
        acc = tmp_path / "acc.jsonl"
        acc.write_text("".join(json.dumps({"task": Path(f).stem, "adapter": None, "accuracy": 0.5}) + "\n"
                               for f in files))
        return ["--base-acc", str(acc), *files]
    if m == "emr":
        return ["--for-task", Path(files[0]).stem, *files]
    return files


def test_every_method_merges_zero_updates_into_a_readable_zero(tiny_base, tmp_path, capsys):
    """All-zero adapters (peft's default init) or zero weights: the exact-LoRA methods wrote rank-0 LoRAs that
    mergetool itself refused to read back (r = 0); every method now writes a zero update that mergetool reads and
    (a LoRA) peft loads."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergetool.inputs import load_inputs
    from mergetool.methods.registry import METHODS

    files = []
    for i in range(3):
        p = tmp_path / f"z{i}.safetensors"
        p.write_bytes(lora_blob(zero_lora(i, f"z{i}")))
        files.append(str(p))
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        want = base(ids).logits
    for m in sorted(k for k, spec in METHODS.items() if not spec.data):  # data-aware: test_auto.py
        out = tmp_path / f"{m}.safetensors"
        rc, _, err = inproc(capsys, "merge", "-q", "-m", m, *method_args(m, files, tmp_path), "-o", str(out))
        assert rc == 0, (m, err)
        (u,) = load_inputs([str(out)], None, False)
        assert all(float(mod.delta().abs().max()) == 0 for mod in u.modules.values()), m
        if METHODS[m].coefficients is None and all(hasattr(mod, "A") for mod in u.modules.values()):
            pdir = tmp_path / f"{m}-peft"
            rc, _, err = inproc(capsys, "merge", "-q", "-m", m, *method_args(m, files, tmp_path), "--save-peft",
                                str(pdir))
            assert rc == 0, (m, err)
            with torch.no_grad():
                got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), pdir).eval()(ids)
            assert torch.equal(got.logits, want), m
    # zero weights on non-zero adapters: the same zero, readable
    live = []
    for i in range(2):
        p = tmp_path / f"l{i}.safetensors"
        p.write_bytes(lora_blob(random_lora(i, name=f"l{i}")))
        live.append(str(p))
    w = tmp_path / "w.jsonl"
    w.write_text("".join(json.dumps({"adapter": f"l{i}", "weight": 0.0}) + "\n" for i in range(2)))
    for m in ("tsv", "iso-c", "iso-cts", "star", "knots"):
        out = tmp_path / f"w-{m}.safetensors"
        rc, _, err = inproc(capsys, "merge", "-q", "-m", m, "--weights", str(w), *live, "-o", str(out))
        assert rc == 0, (m, err)
        (u,) = load_inputs([str(out)], None, False)
        assert all(float(mod.delta().abs().max()) == 0 for mod in u.modules.values()), m


@pytest.mark.parametrize("method,bad", [("core-space", "huge"), ("core-space", "nan"), ("iso-cts", "huge"),
                                        ("iso-cts", "nan"), ("knots", "nan"), ("tsv", "nan")])
def test_a_factorisation_that_fails_names_the_module_and_adapters(method, bad):
    """A LoRA scale of 1e300 (products overflow fp64) or a NaN factor: LAPACK does not converge, and the merge was
    ``internal: _LinAlgError``; it is one line naming the module and the adapters."""
    import torch

    from mergetool.errors import MergetoolError
    from mergetool.methods.base import Params
    from mergetool.methods.engine import merge
    from mergetool.updates import LowRank

    a, b = random_lora(0, name="a"), random_lora(1, name="b")
    for k, m in a.modules.items():
        B = m.B.clone()
        B[0, 0] = math.nan
        a.modules[k] = LowRank(m.A, m.B, 1e300) if bad == "huge" else LowRank(m.A, B, m.scale)
    with pytest.raises(MergetoolError, match=r"layers\.0\.self_attn\.q_proj.*: the factorisation of the updates of "
                                             r"a, b fails \(linalg\.\w+ does not converge"):
        merge([a, b], method, Params(), torch.device("cpu"))


# ----------------------------------------------------------------------------- messages and memory


def test_odd_paths_say_what_they_are(tmp_path, capsys):
    """A symlink loop read "no such file or directory"; a permission ("/proc/1/mem") had no FIX part."""
    loop_a, loop_b, dangling = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "d.jsonl"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    dangling.symlink_to(tmp_path / "gone.jsonl")
    cases = [(["merge", "-m", "mean", str(loop_a)], "is a symbolic link loop"),
             (["weight", "--records", str(loop_a)], "is a symbolic link loop"),
             (["merge", "-m", "mean", str(dangling)], f"is a symbolic link to a missing file ({tmp_path / 'gone.jsonl'})"),
             (["weight", "--records", str(dangling)], "is a symbolic link to a missing file"),
             (["merge", "-m", "mean", str(tmp_path / "none")], "no such file or directory; check the path")]
    if Path("/proc/1/mem").exists():
        cases += [(["merge", "-m", "mean", "/proc/1/mem"], "cannot read ("),
                  (["weight", "--records", "/proc/1/mem"], "cannot read (")]
    for args, needle in cases:
        rc, out, err = inproc(capsys, *args)
        line = one_line(err)
        assert rc == 1 and needle in line and line.count(";") >= 1 and line.rstrip().split(";")[-1].strip(), (args, err)


def test_a_huge_valid_adapter_is_refused_in_bounded_memory(tmp_path):
    """A valid header and a 1 GiB body of a tensor no adapter holds: refused after reading it, with RSS near the
    body's size (the NaN check of the whole tensor at once took it from 1.2 to 3.0 GB)."""
    import struct

    from test_hardening_io import peak_rss, sparse

    small = tmp_path / "small.safetensors"
    small.write_bytes(b"\0" * 8)
    code, err, base_kb = peak_rss(["merge", str(small), "-o", str(tmp_path / "o.safetensors")])
    n = 2**28
    raw = json.dumps({"junk": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
                      "__metadata__": {"format": "pt"}}).encode()
    head = struct.pack("<Q", len(raw)) + raw
    big = sparse(tmp_path / "big.safetensors", head, len(head) + 4 * n)
    code, err, kb = peak_rss(["merge", str(big), "-o", str(tmp_path / "o.safetensors")])
    assert code == 1 and "unsupported tensor 'junk'" in one_line(err), err
    assert kb < base_kb + (4 * n >> 10) + 300 * 1024, (kb >> 10, base_kb >> 10)


# ----------------------------------------------------------------------------- eval's resume key


def test_eval_resume_refuses_other_data_under_the_same_ids_and_another_dtype(tiny_lm, tmp_path, capsys):
    """eval --resume once continued a file written for other examples of the same ids, or in another --dtype,
    mixing records of two runs: the run key holds the examples' contents and the dtype."""
    rows = [{"id": f"q{i}", "task": "t", "prompt": f"{i}+{i}=", "choices": [str(2 * i), "7"], "answer": 0}
            for i in range(3)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.jsonl"
    assert inproc(capsys, "eval", "-q", "--base", str(tiny_lm), str(data), "-o", str(out))[0] == 0
    keep = out.read_bytes()
    assert inproc(capsys, "eval", "-q", "--base", str(tiny_lm), str(data), "-o", str(out), "--resume")[0] == 0
    rows[1]["prompt"] = "1+1 is"
    edited = tmp_path / "e.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for args in ([str(edited)], [str(data), "--dtype", "bfloat16"]):
        rc, _, err = inproc(capsys, "eval", "-q", "--base", str(tiny_lm), *args, "-o", str(out), "--resume")
        assert rc == 1 and "was written by eval with" in one_line(err) and out.read_bytes() == keep, (args, err)
