"""The merge command as users run it: CliRunner, real subprocess pipelines, and every bad input."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import lora_blob, random_lora, run_cli
from typer.testing import CliRunner

from mergetool.blobs import blob_bytes, read_blobs
from mergetool.updates import from_blob

runner = CliRunner()


def cli(*args, input=None):
    from mergetool.cli import commands  # noqa: F401
    from mergetool.cli.main import app

    return runner.invoke(app, list(args), input=input)


def load(path_or_bytes):
    if isinstance(path_or_bytes, (bytes, bytearray)):
        from mergetool.blobs import split_blobs

        return [from_blob(b, "x") for b in split_blobs(bytearray(path_or_bytes), "out")]
    return [from_blob(b, "x") for b in read_blobs(str(path_or_bytes))]


def dense(u):
    return {k: m.delta() for k, m in u.modules.items()}


def test_merge_writes_self_describing_blob(adapters, tmp_path):
    out = tmp_path / "ab.safetensors"
    r = cli("merge", "--method", "knots", str(adapters[0]), str(adapters[1]), "-o", str(out))
    assert r.exit_code == 0, r.output
    (u,) = load(out)
    assert u.name == "ab" and u.kind == "lora"
    assert u.meta["method"] == "knots" and u.meta["parents"] == ["a0", "a1"]
    assert u.meta["peft_config"]["peft_type"] == "LORA"
    assert all(m.rank <= 2 + 4 for m in u.modules.values())


def test_list_methods_names_every_method_with_its_paper():
    from mergetool.methods import all_methods

    r = cli("merge", "--list-methods")
    assert r.exit_code == 0
    for name, m in all_methods().items():
        assert name in r.output and m.reference in r.output


def test_subprocess_pipeline(adapters, tmp_path):
    """mergetool merge ... | mergetool merge --method ties - c.safetensors -o out.safetensors"""
    a, b, c = (str(p) for p in adapters)
    first = run_cli("merge", "--method", "mean", a, b, check=True)
    assert first.stdout[:8] == struct.pack("<Q", struct.unpack("<Q", first.stdout[:8])[0])
    out = tmp_path / "out.safetensors"
    run_cli("merge", "--method", "ties", "-", c, "-o", str(out), input=first.stdout, check=True)
    (u,) = load(out)
    assert u.meta["parents"] == ["mean-merge", "a2"]
    # the same through the library
    from mergetool.methods import Params, get, merge_stream

    ab = load(first.stdout)[0]
    want = {k: v for k, v in merge_stream([ab, load(c)[0]], get("ties"), Params(density=0.2), torch.device("cpu"))}
    got = dense(u)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6)


def test_concatenated_stream_of_several_adapters(adapters, tmp_path):
    stream = b"".join(p.read_bytes() for p in adapters)
    r = run_cli("merge", "--method", "mean", "-", input=stream, check=True)
    (u,) = load(r.stdout)
    assert u.meta["parents"] == ["a0", "a1", "a2"]


def test_pool_directory_and_weights_file(adapters, tmp_path):
    w = tmp_path / "w.jsonl"
    w.write_text("".join(json.dumps({"adapter": f"a{i}", "weight": x}) + "\n" for i, x in enumerate([1, -1, 0.5])))
    out = tmp_path / "o.safetensors"
    r = cli("merge", "--method", "linear", "--weights", str(w), str(adapters[0].parent), "-o", str(out))
    assert r.exit_code == 0, r.output
    (u,) = load(out)
    ds = [dense(load(p)[0]) for p in adapters]
    got = dense(u)
    for k in got:
        assert torch.allclose(got[k], ds[0][k] - ds[1][k] + 0.5 * ds[2][k], atol=1e-6)


def test_weights_from_stdin(adapters, tmp_path):
    w = "".join(json.dumps({"adapter": f"a{i}", "weight": 2.0}) + "\n" for i in range(2))
    out = tmp_path / "o.safetensors"
    r = run_cli("merge", "-m", "linear", "--weights", "-", str(adapters[0]), str(adapters[1]), "-o", str(out),
                input=w.encode())
    assert r.returncode == 0, r.stderr


def test_weighted_base_reads_eval_summaries(tmp_path):
    us = [random_lora(i, name=f"e{i}", task=f"t{i}") for i in range(2)]
    paths = []
    for u in us:
        p = tmp_path / f"{u.name}.safetensors"
        p.write_bytes(lora_blob(u))
        paths.append(str(p))
    acc = tmp_path / "acc.jsonl"
    acc.write_text('{"task": "t0", "adapter": null, "n": 10, "accuracy": 0.9}\n'
                   '{"task": "t1", "adapter": null, "n": 10, "accuracy": 0.2}\n')
    out = tmp_path / "o.safetensors"
    r = cli("merge", "-m", "weighted-base", "--base-acc", str(acc), "--tau", "0.5", *paths, "-o", str(out))
    assert r.exit_code == 0, r.output
    w = torch.softmax(torch.tensor([0.1 / 0.5, 0.8 / 0.5]), 0)
    got = dense(load(out)[0])
    ds = [dense(u) for u in us]
    for k in got:
        assert torch.allclose(got[k], w[0] * ds[0][k] + w[1] * ds[1][k], atol=1e-6)


def test_rank_truncation_reports_energy(adapters, tmp_path):
    out = tmp_path / "o.safetensors"
    r = run_cli("merge", "-m", "ties", "--rank", "3", *map(str, adapters), "-o", str(out))
    assert r.returncode == 0
    assert b"energy" in r.stderr
    (u,) = load(out)
    assert u.kind == "lora" and max(m.rank for m in u.modules.values()) <= 3


def test_closed_stdout_ends_quietly(adapters):
    import subprocess
    import sys

    cmd = f"{sys.executable} -m mergetool merge -m mean {adapters[0]} {adapters[1]} | head -c 10 > /dev/null"
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True)
    assert p.returncode == 0 and b"Traceback" not in p.stderr


def test_refuses_to_write_binary_to_a_terminal(adapters, monkeypatch, capsys):
    import mergetool.streams as io
    from mergetool.cli.main import run

    monkeypatch.setattr(io, "stdout_is_tty", lambda: True)
    assert run(["merge", str(adapters[0])]) == 2
    assert "terminal" in capsys.readouterr().err


def test_refuses_to_read_stdin_from_a_terminal(adapters, monkeypatch, tmp_path):
    import sys

    class TTY:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", TTY())
    from mergetool.cli.main import run

    assert run(["merge", "-", "-o", str(tmp_path / "x.safetensors")]) == 2


# ----------------------------------------------------------------------------- bad inputs (docs/formats.md: one line, no partial output)


def _bad(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _blob_with(tensors, meta=None):
    return blob_bytes(tensors, meta or {"format": "pt"}, finite=False)


def _header_blob(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


GOOD = random_lora(9)
A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def bad_inputs():
    good = lora_blob(GOOD)
    nan = torch.ones(4, 64)
    nan[0, 0] = float("nan")
    return {
        "truncated": (good[: len(good) // 2], "truncated"),
        "tiny": (b"\x01\x02", "truncated"),
        "header-beyond": (struct.pack("<Q", 10**6) + b"{}", "beyond the file"),
        "not-json": (struct.pack("<Q", 4) + b"abcd", "not valid JSON"),
        "meta-not-str": (_header_blob({"__metadata__": {"x": 1}}), "strings to strings"),
        "wrong-dtype": (_blob_with({A0: torch.ones(4, 64, dtype=torch.int32), B0: torch.ones(64, 4)}), "floating"),
        "nan": (_blob_with({A0: nan, B0: torch.ones(64, 4)}), "NaN"),
        "rank-mismatch": (_blob_with({A0: torch.ones(4, 64), B0: torch.ones(64, 3)}), "mismatched ranks"),
        "half-pair": (_blob_with({A0: torch.ones(4, 64)}), "without its pair"),
        "bad-offsets": (_header_blob({A0: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 12]}}, b"\0" * 12),
                        "do not match"),
        "unknown-key": (_blob_with({"model.foo": torch.ones(2)}), "unsupported tensor"),
        "bad-mergetool-meta": (_blob_with({A0: torch.ones(4, 64), B0: torch.ones(64, 4)},
                                          {"format": "pt", "mergetool": "{oops"}), "not valid JSON"),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_adapter_file(case, tmp_path, adapters):
    data, needle = bad_inputs()[case]
    p = _bad(tmp_path, f"{case}.safetensors", data)
    out = tmp_path / "out.safetensors"
    r = run_cli("merge", str(p), str(adapters[0]), "-o", str(out))
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("mergetool merge: error: ")
    assert not out.exists() and not list(tmp_path.glob(".mergetool-*"))


@pytest.mark.parametrize("args,code,needle", [
    (["--method", "nope"], 2, "unknown method"),
    (["--method", "ties", "--density", "0"], 2, "outside (0, 1]"),
    (["--method", "ties", "--density", "1.5"], 2, "outside (0, 1]"),
    (["--method", "slerp", "@0", "@1", "@2"], 2, "at most 2"),
    (["--bogus"], 2, "No such option"),
    (["--trim-scope", "row"], 2, "unknown scope"),
    (["--device", "tpu"], 2, "unknown device"),
    (["--method", "knots", "--inner", "knots"], 2, "own inner"),
    (["--method", "weighted-base"], 2, "base model's accuracy"),
    (["missing.safetensors"], 1, "no such file"),
    (["x.bin"], 1, "pickle"),
    (["-", "-"], 2, "more than once"),
    (["--save-model", "m"], 2, "needs the base"),
    (["--method", "ties", "--save-peft", "@dir"], 1, "PEFT cannot hold"),
])
def test_bad_usage(args, code, needle, adapters, tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x80\x04pickle")
    subst = {"@0": str(adapters[0]), "@1": str(adapters[1]), "@2": str(adapters[2]), "@dir": str(tmp_path / "peft"),
             "x.bin": str(tmp_path / "x.bin")}
    args = [subst.get(a, a) for a in args]
    if not any(a.endswith((".safetensors", ".bin")) or a == "-" for a in args):
        args += [str(adapters[0]), str(adapters[1])]
    out = tmp_path / "out.safetensors"
    r = run_cli("merge", *args, "-o", str(out), input=b"")
    err = r.stderr.decode()
    assert r.returncode == code, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "peft").exists()


def test_different_bases_are_refused(tmp_path):
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    a.write_bytes(lora_blob(random_lora(1, name="a", fingerprint="aaaa")))
    b.write_bytes(lora_blob(random_lora(2, name="b", fingerprint="bbbb")))
    r = run_cli("merge", str(a), str(b), "-o", str(tmp_path / "o.safetensors"))
    assert r.returncode == 1 and b"another base" in r.stderr or b"fingerprint" in r.stderr


def test_mismatched_shapes_are_refused(tmp_path):
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    a.write_bytes(lora_blob(random_lora(1, name="a")))
    b.write_bytes(lora_blob(random_lora(2, name="b", targets={"q_proj": (32, 64)})))
    r = run_cli("merge", str(a), str(b), "-o", str(tmp_path / "o.safetensors"))
    assert r.returncode == 1 and b"has shape" in r.stderr


def test_bad_weights_jsonl(adapters, tmp_path):
    w = tmp_path / "w.jsonl"
    for text, needle in [('{"adapter": "a0", "weight": 1}\n\n', "empty line"),
                         ('{"adapter": "a0", "weight": 1}\n{oops\n', ":2: malformed JSON"),
                         ('{"adapter": "a0"}\n', "needs 'adapter'"),
                         ('{"adapter": "a0", "weight": 1}\n', "no weight for a1")]:
        w.write_text(text)
        r = run_cli("merge", "-m", "linear", "--weights", str(w), str(adapters[0]), str(adapters[1]),
                    "-o", str(tmp_path / "o.safetensors"))
        assert r.returncode == 1 and needle in r.stderr.decode(), (text, r.stderr)


def test_metadata_records_the_effective_parameters(adapters, tmp_path):
    """merge --method ties records the density that ran (0.2), not the CLI's None; knots records its inner
    method's defaults; linear methods record their coefficients."""
    for args, want in [(["-m", "ties"], {"density": 0.2, "trim_scope": "global", "lambda": 1.0}),
                       (["-m", "knots"], {"inner": "ties", "density": 0.2}),
                       (["-m", "knots", "--inner", "dare-ties"], {"inner": "dare-ties", "density": 0.5, "seed": 0,
                                                                  "rescale": "paper"}),
                       (["-m", "mean"], {"coefficients": [0.5, 0.5]}),
                       (["-m", "ties", "--rank", "3"], {"rank": 3})]:
        out = tmp_path / "o.safetensors"
        r = cli("merge", *args, str(adapters[0]), str(adapters[1]), "-o", str(out))
        assert r.exit_code == 0, r.output
        (u,) = load(out)
        assert {k: u.meta["params"][k] for k in want} == want, args


def test_options_a_method_would_ignore_are_refused(adapters, tmp_path):
    w = tmp_path / "w.jsonl"
    w.write_text('{"adapter": "a0", "weight": 2}\n{"adapter": "a1", "weight": 1}\n')
    for args, needle in [(["-m", "mean", "--weights", str(w)], "mean does not take --weights"),
                         (["-m", "weighted-base", "--base-acc", str(w), "--weights", str(w)], "does not take --weights"),
                         (["-m", "ties", "--base-acc", str(w)], "does not take --base-acc")]:
        r = run_cli("merge", *args, str(adapters[0]), str(adapters[1]), "-o", str(tmp_path / "o.safetensors"))
        assert r.returncode == 2 and needle in r.stderr.decode(), (args, r.stderr)
        assert not (tmp_path / "o.safetensors").exists()


def test_base_accuracy_must_come_from_base_rows(tmp_path):
    """--base-acc takes only the base model's rows (adapter null); a file holding another adapter's rows for a
    task says so instead of using them."""
    us = [random_lora(i, name=f"e{i}", task=f"t{i}") for i in range(2)]
    paths = []
    for u in us:
        p = tmp_path / f"{u.name}.safetensors"
        p.write_bytes(lora_blob(u))
        paths.append(str(p))
    acc = tmp_path / "acc.jsonl"
    acc.write_text('{"task": "t0", "adapter": null, "n": 10, "accuracy": 0.9}\n'
                   '{"task": "t1", "adapter": "e1", "n": 10, "accuracy": 0.2}\n')
    r = run_cli("merge", "-m", "weighted-base", "--base-acc", str(acc), *paths, "-o", str(tmp_path / "o.safetensors"))
    err = r.stderr.decode()
    assert r.returncode == 1 and "no base-model row" in err and "'t1'" in err and "'e1'" in err, err
