"""Hardening of the readers and writers (issue 10): outputs that are not regular files, huge or lying inputs read
lazily, strict safetensors headers, typed errors for every malformed field, examples JSONL edge cases, pickles
behind --allow-pickle, a closed or full stdout, and property-based tests of every reader.

Every bad input gives one line on stderr (``mergetool CMD: error: WHAT: WHY; FIX``), exit 1 (bad data) or 2
(usage), no traceback, no ``internal:`` error and no partial output."""

from __future__ import annotations

import json
import math
import os
import shlex
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import lora_blob, random_lora, run_cli
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mergetool.errors import MergetoolError
from mergetool.blobs import blob_bytes, read_blobs, split_blobs
from mergetool.jsonl import read_jsonl
from mergetool.updates import from_blob

A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def run_in(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in-process (main.run maps every failure to a line and a code)."""
    from mergetool.cli.main import run

    code = run([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line(err: str, cmd: str = "merge") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mergetool {cmd}: error: "), err
    assert "internal" not in err and "Traceback" not in err, err
    return lines[0]


def header_blob(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def tiny_pair(meta: dict | None = None, rank: int = 4) -> bytes:
    tensors = {A0: torch.randn(rank, 64), B0: torch.randn(64, rank)}
    md = {"format": "pt"}
    if meta is not None:
        md["mergetool"] = json.dumps(meta)
    return blob_bytes(tensors, md)


def only_blob(path: Path):
    (b,) = read_blobs(str(path))
    return from_blob(b, "x")


# ----------------------------------------------------------------------------- 1, 2: outputs that are not regular files


def test_output_to_a_fifo_is_written_straight(adapters, tmp_path, capsys):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code, _, err = run_in(capsys, "merge", adapters[0], adapters[1], "-o", fifo)
    reader.join(30)
    assert code == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the FIFO, not a file renamed over it
    (b,) = split_blobs(bytearray(got[0]), "fifo")
    assert from_blob(b, "m").kind == "lora"
    assert not list(tmp_path.glob(".mergetool-*"))


def test_output_through_a_symlink_to_dev_null(adapters, tmp_path, capsys):
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    code, _, err = run_in(capsys, "merge", adapters[0], "-o", link)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == "/dev/null"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not list(tmp_path.glob(".mergetool-*"))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root could replace /dev/null")
def test_output_to_dev_null_as_root_keeps_the_device(adapters, tmp_path, capsys):
    # A code that would replace the device must not get near the real one: check a symlink to it first.
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    run_in(capsys, "merge", adapters[0], "-o", link)
    assert link.is_symlink(), "atomic_output replaces what -o names; not trying the real /dev/null"
    before = os.stat("/dev/null")
    code, _, err = run_in(capsys, "merge", adapters[0], "-o", "/dev/null")
    after = os.stat("/dev/null")
    assert code == 0, err
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
    assert not list(Path("/dev").glob(".mergetool-*"))


def test_output_through_a_symlink_to_proc_self_fd_1(adapters, tmp_path):
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    r = run_cli("merge", str(adapters[0]), "-o", str(link))
    assert r.returncode == 0, r.stderr
    assert link.is_symlink()
    (b,) = split_blobs(bytearray(r.stdout), "stdout")  # the blob went to the process's stdout (a pipe)
    assert from_blob(b, "m").kind == "lora"


def test_output_through_a_symlink_to_a_file_replaces_the_file(adapters, tmp_path, capsys):
    target = tmp_path / "real.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target.name)
    code, _, err = run_in(capsys, "merge", adapters[0], adapters[1], "-o", link)
    assert code == 0, err
    assert link.is_symlink() and only_blob(target).kind == "lora"
    assert not list(tmp_path.glob(".mergetool-*"))


def test_output_that_is_a_directory(adapters, tmp_path, capsys):
    d = tmp_path / "outdir"
    d.mkdir()
    code, _, err = run_in(capsys, "merge", adapters[0], "-o", d)
    assert code == 1
    assert "is a directory" in one_line(err)
    assert list(d.iterdir()) == [] and not list(tmp_path.glob(".mergetool-*"))


def test_output_in_a_missing_directory(adapters, tmp_path, capsys):
    code, _, err = run_in(capsys, "merge", adapters[0], "-o", tmp_path / "nope" / "x.safetensors")
    assert code == 1 and "does not exist" in one_line(err)


# ----------------------------------------------------------------------------- 3: huge inputs refused before read

RSS_PROBE = """
import resource, subprocess, sys
stdin = sys.argv[1]
inp = None if stdin in ("", "pipe") else open(stdin, "rb")
data = sys.stdin.buffer.read() if stdin == "pipe" else None
kw = {"input": data} if data is not None else {"stdin": inp or subprocess.DEVNULL}
r = subprocess.run(sys.argv[2:], capture_output=True, **kw)
sys.stderr.buffer.write(r.stderr)
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss(args: list[str], stdin: str = "", pipe: bytes | None = None) -> tuple[int, str, int]:
    """Exit code, stderr and peak RSS (KiB) of ``mergetool ARGS`` run alone under a fresh parent."""
    p = subprocess.run([sys.executable, "-c", RSS_PROBE, "pipe" if pipe is not None else stdin,
                        sys.executable, "-m", "mergetool", *args], input=pipe, capture_output=True)
    code, kb = p.stdout.split()
    return int(code), p.stderr.decode(), int(kb)


def sparse(path: Path, head: bytes, size: int = 2**30) -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def test_huge_inputs_are_refused_before_they_are_read(adapters, tmp_path):
    out = tmp_path / "o.safetensors"
    small = tmp_path / "small.safetensors"
    small.write_bytes(os.urandom(8))
    code, err, base_kb = peak_rss(["merge", str(small), "-o", str(out)])  # the interpreter, torch and mergetool
    assert code == 1, err
    limit_kb = base_kb + 60 * 1024

    rnd = sparse(tmp_path / "random.safetensors", os.urandom(8))
    lying = sparse(tmp_path / "lying.safetensors",  # a valid header whose tensor (2 GiB) ends beyond the 1 GiB file
                   header_blob({A0: {"dtype": "F32", "shape": [2**29, 1], "data_offsets": [0, 2**31]}}))
    for args, stdin, needle in [(["merge", str(rnd)], "", "beyond the file"),
                                (["merge", str(lying)], "", "beyond the file"),
                                (["merge", "-"], str(rnd), "beyond the file")]:
        code, err, kb = peak_rss([*args, "-o", str(out)], stdin)
        assert code == 1 and needle in one_line(err), (args, err)
        assert kb < limit_kb, (args, kb, base_kb)
    # a pipe of unknown length whose header claims 2 GiB of data: refused when the stream ends, with no 2 GiB read
    code, err, kb = peak_rss(["merge", "-", "-o", str(out)],
                             pipe=header_blob({A0: {"dtype": "F32", "shape": [2**29, 1],
                                                    "data_offsets": [0, 2**31]}}, b"\0" * 1000))
    assert code == 1 and "truncated" in one_line(err), err
    assert kb < limit_kb, kb
    assert not out.exists()


def test_huge_jsonl_line_is_refused_before_it_is_read(adapters, tmp_path):
    out = tmp_path / "o.safetensors"
    small = tmp_path / "w.jsonl"
    small.write_text("{oops\n")
    args = ["merge", "-m", "linear", str(adapters[0]), str(adapters[1]), "-o", str(out), "--weights"]
    code, err, base_kb = peak_rss([*args, str(small)])
    assert code == 1 and ":1: malformed JSON" in err, err
    big = sparse(tmp_path / "big.jsonl", b'{"adapter": "a0", "weight": 1, "pad": "')  # then 1 GiB of NULs, no newline
    code, err, kb = peak_rss([*args, str(big)])
    assert code == 1 and "big.jsonl:1: " in one_line(err) and "longer than" in err, err
    assert kb < base_kb + 100 * 1024, (kb, base_kb)  # at most one line's limit (64 MiB) is ever held
    assert not out.exists()


def test_jsonl_line_limit_counts_lines(tmp_path, monkeypatch):
    from mergetool import jsonl

    monkeypatch.setattr(jsonl, "MAX_JSONL_LINE", 64)
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"b": "' + "x" * 100 + '"}\n')
    with pytest.raises(MergetoolError, match=r"x\.jsonl:2: line is longer than"):
        read_jsonl(str(p))
    p.write_text('{"a": "' + "x" * 54 + '"}\n')  # exactly 64 bytes before the newline: fine
    assert read_jsonl(str(p)) == [{"a": "x" * 54}]


def test_stdin_is_read_blob_by_blob(adapters, monkeypatch):
    """Each blob of the stream is read into its own buffer (8 bytes, header, data), never all of stdin at once."""
    import io as pyio

    from mergetool import blobs as io

    data = b"".join(Path(a).read_bytes() for a in adapters)

    class Stdin:
        buffer = pyio.BufferedReader(pyio.BytesIO(data))

        def isatty(self):
            return False

    sizes = []
    real = io._alloc
    monkeypatch.setattr(io, "_alloc", lambda n, src: (sizes.append(n), real(n, src))[1])
    monkeypatch.setattr(sys, "stdin", Stdin())
    blobs = read_blobs("-")
    assert [from_blob(b, "x").name for b in blobs] == ["a0", "a1", "a2"]
    assert len(sizes) == 3 and sum(sizes) < len(data)  # data sections only, one buffer each


# ----------------------------------------------------------------------------- 4: byte ranges contiguous from 0


@pytest.mark.parametrize("offsets,needle", [
    ([[0, 1024], [512, 1536]], "overlap"),
    ([[0, 1024], [0, 1024]], "overlap"),
    ([[0, 1024], [1032, 2056]], "gap"),
    ([[8, 1032], [1032, 2056]], "gap"),
])
def test_overlapping_or_gapped_offsets_are_refused(offsets, needle, tmp_path, capsys):
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    hdr = {A0: {"dtype": "F32", "shape": [4, 64], "data_offsets": offsets[0]},
           B0: {"dtype": "F32", "shape": [64, 4], "data_offsets": offsets[1]}}
    blob = header_blob(hdr, b"\0" * max(o[1] for o in offsets))
    with pytest.raises(SafetensorError):  # the safetensors library refuses them too
        st_load(blob)
    with pytest.raises(MergetoolError, match=needle):
        split_blobs(bytearray(blob), "x")
    p = tmp_path / "x.safetensors"
    p.write_bytes(blob)
    code, _, err = run_in(capsys, "merge", p, "-o", tmp_path / "o.safetensors")
    assert code == 1 and needle in one_line(err) and "x.safetensors" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_contiguous_offsets_in_any_header_order_are_read():
    a, b = torch.randn(4, 64), torch.randn(64, 4)
    hdr = {B0: {"dtype": "F32", "shape": [64, 4], "data_offsets": [1024, 2048]},
           "z.delta": {"dtype": "F32", "shape": [0], "data_offsets": [1024, 1024]},
           A0: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}}
    raw = json.dumps(hdr).encode()
    raw += b" " * (-len(raw) % 8)
    (blob,) = split_blobs(bytearray(header_blob(raw, a.numpy().tobytes() + b.numpy().tobytes())), "x")
    assert torch.equal(blob.tensors[A0], a) and torch.equal(blob.tensors[B0], b)


# ----------------------------------------------------------------------------- 5: typed errors for malformed fields


def bad_fields() -> dict[str, tuple[bytes, str]]:
    ok = {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}
    ok_b = {"dtype": "F32", "shape": [64, 4], "data_offsets": [1024, 2048]}
    z = b"\0" * 2048

    def hdr(**a):
        return header_blob({A0: {**ok, **a}, B0: ok_b}, z)

    def cfg(**c):
        return tiny_pair({"name": "x", "peft_config": {"r": 4, "lora_alpha": 8, **c}})

    return {
        "dtype-list": (hdr(dtype=["F32"]), "dtype"),
        "dtype-number": (hdr(dtype=3), "dtype"),
        "dtype-unknown": (hdr(dtype="F33"), "dtype"),
        "shape-float": (hdr(shape=[4.0, 64]), "shape"),
        "shape-negative": (hdr(shape=[-4, -64]), "shape"),
        "shape-bool": (header_blob({A0: {"dtype": "F32", "shape": [True, 64], "data_offsets": [0, 256]}}, z[:256]),
                       "shape"),
        "shape-not-list": (hdr(shape="4x64"), "shape"),
        "offsets-float": (hdr(data_offsets=[0.0, 1024]), "data_offsets"),
        "offsets-three": (hdr(data_offsets=[0, 512, 1024]), "data_offsets"),
        "entry-not-object": (header_blob({A0: [1, 2], B0: ok_b}, z), "header entry"),
        "metadata-list": (header_blob({"__metadata__": ["x"], A0: ok, B0: ok_b}, z), "__metadata__"),
        "metadata-empty-list": (header_blob({"__metadata__": [], A0: ok, B0: ok_b}, z), "__metadata__"),
        "metadata-number": (header_blob({"__metadata__": 0, A0: ok, B0: ok_b}, z), "__metadata__"),
        "metadata-value": (header_blob({"__metadata__": {"format": 1}, A0: ok, B0: ok_b}, z), "__metadata__"),
        "header-array": (header_blob([1, 2]), "not a JSON object"),
        "header-deep": (header_blob(b"[" * 100_000), "not valid JSON"),
        "header-huge-int": (header_blob(b'{"a": ' + b"1" * 5000 + b"}"), "not valid JSON"),
        "duplicate-tensor": (header_blob(b'{"%s": %s, "%s": %s, "%s": %s}' % (
            A0.encode(), json.dumps(ok).encode(), A0.encode(), json.dumps(ok).encode(), B0.encode(),
            json.dumps(ok_b).encode()), z), "twice"),
        "mergetool-list": (tiny_pair([1, 2]), "mergetool"),
        "mergetool-deep": (blob_bytes({A0: torch.ones(4, 64), B0: torch.ones(64, 4)},
                                      {"format": "pt", "mergetool": "[" * 100_000}), "mergetool"),
        "peft-config-list": (tiny_pair({"peft_config": [1]}), "peft_config"),
        "peft-config-string": (tiny_pair({"peft_config": "r=4"}), "peft_config"),
        "alpha-string": (cfg(lora_alpha="8"), "lora_alpha"),
        "alpha-bool": (cfg(lora_alpha=True), "lora_alpha"),
        "alpha-nan": (cfg(lora_alpha=float("nan")), "lora_alpha"),
        "alpha-inf": (cfg(lora_alpha=float("inf")), "lora_alpha"),
        "alpha-negative": (cfg(lora_alpha=-8), "lora_alpha"),
        "r-zero": (cfg(r=0), "'r'"),
        "r-string": (cfg(r="4"), "'r'"),
        "rslora-string": (cfg(use_rslora="yes"), "use_rslora"),
        "alpha-pattern-list": (cfg(alpha_pattern=["q_proj"]), "alpha_pattern"),
        "alpha-pattern-value": (cfg(alpha_pattern={"q_proj": "16"}), "alpha_pattern"),
        "alpha-pattern-regex": (cfg(alpha_pattern={"q_proj(": 16}), "alpha_pattern"),
        "rank-pattern-list": (cfg(rank_pattern=["q_proj"]), "rank_pattern"),
        "rank-pattern-zero": (cfg(rank_pattern={"q_proj": 0}), "rank_pattern"),
        "name-list": (tiny_pair({"name": ["x"]}), "'name'"),
        "task-object": (tiny_pair({"task": {"a": 1}}), "'task'"),
        "fingerprint-number": (tiny_pair({"base_fingerprint": 12}), "'base_fingerprint'"),
        "rank-zero": (blob_bytes({A0: torch.ones(0, 64), B0: torch.ones(64, 0)}, {"format": "pt"}), "rank 0"),
    }


@pytest.mark.parametrize("case", list(bad_fields()))
def test_malformed_fields_give_one_line(case, tmp_path, capsys):
    data, needle = bad_fields()[case]
    p = tmp_path / f"{case}.safetensors"
    p.write_bytes(data)
    out = tmp_path / "o.safetensors"
    code, _, err = run_in(capsys, "merge", p, "-o", out)
    line = one_line(err)
    assert code == 1 and needle in line and f"{case}.safetensors" in line, line
    assert not out.exists()


def peft_dir(tmp_path: Path, cfg, name: str = "peft") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    (d / "adapter_model.safetensors").write_bytes(tiny_pair())
    return d


@pytest.mark.parametrize("cfg,needle", [
    ([{"r": 4}], "not a JSON object"),
    ("\"LORA\"", "not a JSON object"),
    ({"r": 4, "lora_alpha": 8, "use_rslora": "true"}, "use_rslora"),
    ({"r": 4, "lora_alpha": 8, "alpha_pattern": "q_proj"}, "alpha_pattern"),
    ({"r": 4, "lora_alpha": 8, "rank_pattern": [4]}, "rank_pattern"),
    ({"r": 4, "lora_alpha": "8"}, "lora_alpha"),
    ({"r": 4, "lora_alpha": -1}, "lora_alpha"),
    ({"r": 4, "lora_alpha": 8, "peft_type": ["LORA"]}, "peft_type"),
    ({"r": 4, "lora_alpha": 8, "base_model_name_or_path": 7}, "base_model_name_or_path"),
    ("{\"r\": 4, \"lora_alpha\": NaN}", "lora_alpha"),
    ("[" * 100_000, "adapter_config.json"),
])
def test_malformed_adapter_config(cfg, needle, tmp_path, capsys):
    d = peft_dir(tmp_path, cfg)
    code, _, err = run_in(capsys, "merge", d, "-o", tmp_path / "o.safetensors")
    line = one_line(err)
    assert code == 1 and needle in line and "adapter_config.json" in line, line


def test_adapter_config_not_utf8(tmp_path, capsys):
    d = peft_dir(tmp_path, "{}")
    (d / "adapter_config.json").write_bytes(b'{"r": 4, "x": "\xff"}')
    code, _, err = run_in(capsys, "merge", d, "-o", tmp_path / "o.safetensors")
    assert code == 1 and "adapter_config.json" in one_line(err)


def test_valid_configs_still_load(tmp_path):
    """The checks refuse only wrong types: rslora, patterns, zero alpha and nulls read as before."""
    from mergetool.inputs import load_inputs

    d = peft_dir(tmp_path, {"r": 4, "lora_alpha": 8, "use_rslora": True, "alpha_pattern": {"q_proj": 2},
                            "rank_pattern": {}, "base_model_name_or_path": None})
    (u,) = load_inputs([str(d)])
    assert next(iter(u.modules.values())).scale == pytest.approx(2 / math.sqrt(4))
    p = tmp_path / "z.safetensors"
    p.write_bytes(tiny_pair({"name": None, "task": None, "peft_config": {"r": 4, "lora_alpha": 0}}))
    assert next(iter(only_blob(p).modules.values())).scale == 0


# ----------------------------------------------------------------------------- 6: examples JSONL


def examples_of(tmp_path: Path, text: str, name: str = "e.jsonl"):
    from mergetool.examples import check_examples

    p = tmp_path / name
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    return check_examples(read_jsonl(str(p)), str(p))


@pytest.mark.parametrize("line,needle", [
    ('{"id": "1", "text": ""}', "'text'"),
    ('{"id": "1", "text": 5}', "'text'"),
    ('{"id": "1", "prompt": "p", "choices": ["a", "b"], "answer": 0, "text": ""}', "'text'"),
    ('{"id": "1", "prompt": "p", "targets": []}', "'targets'"),
    ('{"id": "1", "prompt": "p", "targets": ["a", 3]}', "'targets'"),
    ('{"id": "1", "prompt": "p", "target": "a", "targets": []}', "'targets'"),
    ('{"id": "1", "prompt": "p", "choices": ["a", ""], "answer": 0}', "'choices'"),
    ('{"id": "1", "prompt": "\\udc80", "choices": ["a", "b"], "answer": 0}', "surrogate"),
    ('{"id": "\\ud800x", "text": "t"}', "surrogate"),
    ('{"id": "1", "text": "t", "extra": {"\\udfff": 1}}', "surrogate"),
    ('{"id": "1", "prompt": "p", "choices": ["a", "b"], "answer": NaN}', "'answer'"),
    ('{"id": "1", "prompt": "p", "choices": ["a", "b"], "answer": 1.0}', "'answer'"),
    ('{"id": "1", "prompt": "p", "choices": ["a", "b"], "answer": Infinity}', "'answer'"),
])
def test_bad_examples(line, needle, tmp_path):
    with pytest.raises(MergetoolError) as e:
        examples_of(tmp_path, '{"id": "0", "text": "fine"}\n' + line + "\n")
    assert ":2" in e.value.what and needle in e.value.line() and "\n" not in e.value.line()


def test_examples_that_stay_valid(tmp_path):
    exs = examples_of(tmp_path, "\n".join([
        '{"id": "1", "prompt": "", "choices": ["a", "b"], "answer": 1}',  # lm-eval conditions on BOS
        '{"id": "2", "prompt": "Q", "target": "", "targets": ["", "b"]}',
        '{"id": "3", "prompt": "\\ud83d\\ude00", "targets": ["x"]}',  # a surrogate pair is one character
        '{"id": "4", "text": "\\\\udc80"}',  # an escaped backslash, not a surrogate
    ]) + "\n")
    assert [e.kind for e in exs] == ["mc", "gen", "gen", "ppl"] and exs[2].rec["prompt"] == "\U0001F600"


@pytest.mark.parametrize("data,needle", [
    (b'{"a": 1}\n{"b": "\xff"}\n', ":2: not valid UTF-8"),
    (b'{"a": 1}\n' + b"[" * 100_000 + b"\n", ":2: malformed JSON"),
    (b'{"a": ' + b"9" * 5000 + b"}\n", ":1: malformed JSON"),
    (b'{"a": "\\udc80"}\n', ":1: "),
])
def test_jsonl_reader_errors(data, needle, tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(data)
    with pytest.raises(MergetoolError) as e:
        read_jsonl(str(p))
    assert needle in e.value.line() and "\n" not in e.value.line()


def test_jsonl_numbers_that_matter_must_be_finite(adapters, tmp_path, capsys):
    from mergetool.weights import base_accuracy

    w = tmp_path / "w.jsonl"
    for bad in ["NaN", "Infinity", "-Infinity", "true"]:
        w.write_text(f'{{"adapter": "a0", "weight": {bad}}}\n{{"adapter": "a1", "weight": 1}}\n')
        code, _, err = run_in(capsys, "merge", "-m", "linear", "--weights", w, adapters[0], adapters[1],
                              "-o", tmp_path / "o.safetensors")
        assert code == 1 and "w.jsonl:1" in one_line(err) and "'weight'" in err, err
    acc = tmp_path / "acc.jsonl"
    for rec in ['{"task": "t", "adapter": null, "accuracy": NaN}', '{"task": "t", "adapter": null, "correct": NaN}']:
        acc.write_text(rec + "\n")
        with pytest.raises(MergetoolError, match="acc.jsonl:1"):
            base_accuracy(str(acc))


def test_jsonl_surrogate_in_a_weights_file(adapters, tmp_path, capsys):
    w = tmp_path / "w.jsonl"
    w.write_text('{"adapter": "a0", "weight": 1}\n{"adapter": "a1\\udc80", "weight": 1}\n')
    code, _, err = run_in(capsys, "merge", "-m", "linear", "--weights", w, adapters[0], adapters[1],
                          "-o", tmp_path / "o.safetensors")
    assert code == 1 and "w.jsonl:2" in one_line(err) and "surrogate" in err


# ----------------------------------------------------------------------------- 7: pickles: --allow-pickle, weights_only


def pickle_of(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_bin_adapter_loads_with_allow_pickle(adapters, tmp_path, capsys):
    u = only_blob(adapters[0])
    sd = {f"{m}.lora_{ab}.weight": getattr(mod, ab) for m, mod in u.modules.items() for ab in "AB"}
    p = pickle_of(sd, tmp_path / "a0.bin")
    out = tmp_path / "o.safetensors"
    code, _, err = run_in(capsys, "merge", p, "-o", out)
    assert code == 1 and "pickle" in one_line(err) and "--allow-pickle" in err
    code, _, err = run_in(capsys, "merge", "--allow-pickle", p, "-o", out)
    assert code == 0, err
    got = only_blob(out)
    for m, mod in u.modules.items():  # no peft_config in a bare .bin: alpha = r (scale 1), as a warning says
        assert torch.allclose(got.modules[m].delta(), mod.B @ mod.A, atol=1e-6)


def test_peft_dir_with_adapter_model_bin(tmp_path, capsys):
    lora = random_lora(3, rank=4, alpha=16)
    d = tmp_path / "peft"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16, "peft_type": "LORA"}))
    pickle_of({f"{m}.lora_{ab}.weight": getattr(mod, ab) for m, mod in lora.modules.items() for ab in "AB"},
              d / "adapter_model.bin")
    out = tmp_path / "o.safetensors"
    code, _, err = run_in(capsys, "merge", d, "-o", out)
    assert code == 1 and "--allow-pickle" in one_line(err)
    code, _, err = run_in(capsys, "merge", "--allow-pickle", d, "-o", out)
    assert code == 0, err
    got = only_blob(out)
    for m, mod in lora.modules.items():
        assert torch.allclose(got.modules[m].delta(), mod.delta(), atol=1e-6)


@pytest.mark.parametrize("what", ["object", "random", "truncated", "not-a-dict", "non-tensor"])
def test_bad_pickles_give_one_line(what, tmp_path, capsys):
    import argparse

    p = tmp_path / "x.bin"
    if what == "object":  # Trainer checkpoints carry such objects; weights_only refuses them
        pickle_of({A0: torch.ones(4, 64), "args": argparse.Namespace(lr=1)}, p)
    elif what == "random":
        p.write_bytes(b"\x80\x04pickle")
    elif what == "truncated":
        p.write_bytes(pickle_of({A0: torch.ones(4, 64)}, tmp_path / "t.bin").read_bytes()[:100])
    elif what == "not-a-dict":
        pickle_of([torch.ones(2)], p)
    else:
        pickle_of({A0: torch.ones(4, 64), "epoch": 3}, p)
    code, _, err = run_in(capsys, "merge", "--allow-pickle", p, "-o", tmp_path / "o.safetensors")
    line = one_line(err)
    assert code == 1 and "x.bin" in line and "weights_only=False" not in err and "trust" not in err, line


def test_full_model_of_refused_pickles_gives_one_line(tmp_path):
    import argparse

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "config.json").write_text((base / "config.json").read_text())
    pickle_of({"model.norm.weight": torch.ones(8), "args": argparse.Namespace(lr=1)}, ft / "pytorch_model.bin")
    r = run_cli("merge", "--allow-pickle", "--base", str(base), str(ft), "-o", str(tmp_path / "o.safetensors"))
    err = r.stderr.decode()
    assert r.returncode == 1 and "argparse.Namespace" in one_line(err) and "weights_only" not in err, err


def test_full_model_pickles_skip_training_args(tmp_path):
    """A Trainer's output directory holds training_args.bin (a pickled object) beside pytorch_model.bin."""
    import argparse

    from mergetool.model import Base, ModelTensors

    d = tmp_path / "ft"
    d.mkdir()
    pickle_of({"model.norm.weight": torch.ones(8)}, d / "pytorch_model.bin")
    pickle_of(argparse.Namespace(lr=1), d / "training_args.bin")
    mt = ModelTensors(Base("ft", d), allow_pickle=True)
    assert mt.keys() == ["model.norm.weight"]


# ----------------------------------------------------------------------------- 9: stdout closed or full


def sh(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.parametrize("redirect,needle", [(">&-", "closed"), ("> /dev/full", "No space left")])
def test_stdout_closed_or_full(redirect, needle, adapters):
    r = sh(f"{sys.executable} -m mergetool merge {adapters[0]} {adapters[1]} {redirect}")
    err = r.stderr.decode()
    assert r.returncode == 1 and "stdout" in one_line(err) and needle in err, err


@pytest.mark.parametrize("redirect,needle", [(">&-", "closed"), ("> /dev/full", "No space left")])
def test_jsonl_to_stdout_closed_or_full(redirect, needle):
    code = ("import sys\nfrom mergetool.errors import MergetoolError\nfrom mergetool.jsonl import write_jsonl_line\n"
            "try:\n    write_jsonl_line({'a': 1})\n"
            "except MergetoolError as e:\n    sys.stderr.write(e.line() + '\\n'); sys.exit(1)\n")
    r = sh(f"{sys.executable} -c {shlex.quote(code)} {redirect}")
    err = r.stderr.decode()
    assert r.returncode == 1 and len(err.strip().splitlines()) == 1 and "stdout" in err and needle in err, err


# ----------------------------------------------------------------------------- 8: properties of every reader

# derandomize: the same 400 examples on every run, so the suite passes or fails alike everywhere (an unseeded
# search found the lone-surrogate header in one CI run and not in the next); to search further, run these with
# derandomize=False (a new draw each run) when the readers change.
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                    derandomize=True)


def _valid_blobs() -> list[bytes]:
    small = {"q_proj": (8, 8)}
    out = [lora_blob(random_lora(s, rank=r, targets=small, layers=range(1), name=f"v{s}", task="t"))
           for s, r in ((1, 1), (2, 3))]
    out.append(blob_bytes({"m.delta": torch.randn(3, 5), "n.delta": torch.randn(7).half(),
                           "o.delta": torch.randn(2, 3).bfloat16(), "z.delta": torch.zeros(0)},
                          {"format": "pt", "mergetool": json.dumps({"name": "d", "kind": "dense"})}))
    out.append(blob_bytes({A0: torch.randn(2, 3), B0: torch.randn(5, 2)},
                          {"format": "pt", "mergetool": json.dumps({"peft_config": {
                              "r": 2, "lora_alpha": 4, "use_rslora": True, "alpha_pattern": {"q_proj": 3},
                              "rank_pattern": {"q_proj": 2}}})}))
    out.append(blob_bytes({A0: torch.randn(2, 3), B0: torch.randn(5, 2)}, {}))
    return out


VALID = _valid_blobs()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
    | st.sampled_from(["F32", "F16", "BF16", "I64", "\udc80", "", "q_proj", "x" * 50]),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=8)


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


@st.composite
def _set_field(draw, doc: dict) -> None:
    """Replace or drop one field somewhere in a header (its tensors, __metadata__, the mergetool JSON and its
    peft_config)."""
    tensors = [k for k in doc if k != "__metadata__"]
    where = draw(st.sampled_from(["tensor", "metadata", "mergetool", "peft"]))
    if where == "tensor" and tensors:
        ent = doc[draw(st.sampled_from(tensors))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if draw(st.booleans()) and isinstance(ent, dict):
            ent.pop(field, None)
        elif field == "data_offsets" and draw(st.booleans()):
            ent[field] = [draw(st.integers(0, 4096)), draw(st.integers(0, 4096))]
        elif field == "shape" and draw(st.booleans()):
            ent[field] = draw(st.lists(st.integers(-2, 2**40), max_size=3))
        else:
            ent[field] = draw(JSON_VALUES)
        return
    md = doc.setdefault("__metadata__", {})
    if where == "metadata" or not isinstance(md, dict):
        doc["__metadata__"] = draw(JSON_VALUES)
        return
    try:
        meta = json.loads(md.get("mergetool", "{}"))
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    target = meta
    if where == "peft":
        target = meta.setdefault("peft_config", {})
        if not isinstance(target, dict):
            target = meta["peft_config"] = {}
    key = draw(st.sampled_from(["name", "task", "base_fingerprint", "training", "peft_config"] if where == "mergetool"
                               else ["r", "lora_alpha", "use_rslora", "alpha_pattern", "rank_pattern"]))
    target[key] = draw(JSON_VALUES | st.dictionaries(st.sampled_from(["q_proj", "(", ".*"]), JSON_VALUES,
                                                     max_size=2))
    md["mergetool"] = json.dumps(meta)


@st.composite
def safetensors_inputs(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "valid", "flip", "truncate", "header-length", "field", "concat"]))
    if kind == "bytes":
        return draw(st.binary(max_size=600))
    data = bytearray(draw(st.sampled_from(VALID)))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "header-length":
        n = struct.unpack("<Q", data[:8])[0]
        new = draw(st.integers(max(0, n - 24), n + 24) | st.integers(0, 2**64 - 1)
                   | st.sampled_from([0, 100_000_000, 100_000_001, 2**63, 2**64 - 1]))
        data[:8] = struct.pack("<Q", new)
    elif kind == "field":
        doc, rest = _split(bytes(data))
        draw(_set_field(doc))
        data = bytearray(header_blob(json.dumps(doc).encode(), rest))
    else:
        data += draw(st.sampled_from(VALID))
    return bytes(data)


def _outcome(fn):
    """What a reader gives: its result, or the MergetoolError it raised (one line). Anything else fails."""
    try:
        return fn()
    except MergetoolError as e:
        assert "\n" not in e.line() and e.what and e.why, e.line()
        return e


def _same(a, b) -> None:
    if isinstance(a, MergetoolError) or isinstance(b, MergetoolError):
        assert type(a) is type(b) and a.why == b.why, (a, b)
        return
    assert [u.name for u in a] == [u.name for u in b]
    for u, v in zip(a, b):
        assert u.modules.keys() == v.modules.keys()
        for k in u.modules:
            assert torch.equal(u.modules[k].delta(), v.modules[k].delta())


class _Stdin:
    def __init__(self, f):
        self.buffer = f

    def isatty(self):
        return False


@SETTINGS
@given(data=safetensors_inputs())
def test_property_safetensors_reader(data, tmp_path_factory):
    import io as pyio

    from mergetool import blobs as io

    d = tmp_path_factory.mktemp("st")
    p = d / "x.safetensors"
    p.write_bytes(data)
    allocs: list[int] = []
    real = io._alloc
    io._alloc = lambda n, src: (allocs.append(n), real(n, src))[1]
    old_stdin = sys.stdin
    try:
        def updates(blobs):
            return [from_blob(b, f"b{i}") for i, b in enumerate(blobs)]

        mem = _outcome(lambda: updates(split_blobs(bytearray(data), "x")))
        assert not allocs  # an in-memory buffer is viewed, never copied
        from_file = _outcome(lambda: updates(read_blobs(str(p))))
        with open(p, "rb") as f:
            sys.stdin = _Stdin(f)
            from_stdin = _outcome(lambda: updates(read_blobs("-")))
        sys.stdin = _Stdin(pyio.BufferedReader(pyio.BytesIO(data)))
        _outcome(lambda: updates(read_blobs("-")))
    finally:
        io._alloc = real
        sys.stdin = old_stdin
    # never more memory than the input holds: sizes come from the header only after checking them against the file
    assert sum(allocs) <= 3 * len(data)
    _same(mem, from_file)
    _same(mem, from_stdin)
    event("refused" if isinstance(mem, MergetoolError) else f"read {len(mem)} blob(s)")
    if not isinstance(mem, MergetoolError) and len(mem) == 1:
        from safetensors.torch import load as st_load

        ref = st_load(data)  # one whole blob we accept is one the safetensors library accepts, with the same tensors
        (b,) = split_blobs(bytearray(data), "x")
        assert ref.keys() == b.tensors.keys()
        for k, v in ref.items():
            assert torch.equal(v, b.tensors[k])


JSONL = {  # families of valid records: examples, merge weights, base accuracy (summaries and per-example rows)
    "examples": ['{"id": "1", "task": "t", "prompt": "Q", "choices": ["a", "b"], "answer": 1, "text": "ctx"}',
                 '{"id": "2", "prompt": "Q", "target": "x", "targets": ["x", "y"]}',
                 '{"id": "3", "text": "passage", "split": "train"}',
                 '{"id": "4", "prompt": "", "choices": ["\\u00e9", "\\ud83d\\ude00"], "answer": 0}'],
    "weights": ['{"adapter": "a0", "weight": 0.5}', '{"adapter": "a1", "weight": -2}'],
    "accuracy": ['{"task": "t", "adapter": null, "accuracy": 0.25}', '{"task": "u", "adapter": null, "accuracy": 1}'],
    "correct": ['{"task": "u", "adapter": null, "correct": 1}', '{"task": "u", "adapter": "x", "correct": 0}',
                '{"task": "v", "adapter": null, "correct": 0}'],
}


@st.composite
def jsonl_inputs(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "lines", "flip", "truncate", "field", "escape"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400))
    family = JSONL[draw(st.sampled_from(sorted(JSONL)))]
    if family is JSONL["examples"]:
        lines = draw(st.lists(st.sampled_from(family), min_size=1, max_size=4, unique=True))
    else:
        lines = draw(st.permutations(family))
    if kind == "field":
        i = draw(st.integers(0, len(lines) - 1))
        obj = json.loads(lines[i])
        key = draw(st.sampled_from(sorted(obj) + ["choices", "answer", "targets", "text", "weight", "id"]))
        if draw(st.booleans()):
            obj.pop(key, None)
        else:
            obj[key] = draw(JSON_VALUES | st.lists(st.text(max_size=3), max_size=3))
        lines[i] = json.dumps(obj)  # NaN and Infinity are written as such, and lone surrogates as escapes
    elif kind == "escape":
        i = draw(st.integers(0, len(lines) - 1))
        at = draw(st.integers(0, len(lines[i])))
        lines[i] = lines[i][:at] + draw(st.sampled_from(["\\udc80", "\\ud800", "\\\\", "\\u0000", "NaN", "\n",
                                                         "\x00", "\r"])) + lines[i][at:]
    data = bytearray(("\n".join(lines) + draw(st.sampled_from(["", "\n", "\n\n"]))).encode())
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            j = draw(st.integers(0, len(data) - 1))
            data[j] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@SETTINGS
@given(data=jsonl_inputs())
def test_property_jsonl_readers(data, tmp_path_factory):
    import io as pyio

    from mergetool.examples import check_examples
    from mergetool.weights import base_accuracy, read_weights

    p = tmp_path_factory.mktemp("jl") / "x.jsonl"
    p.write_bytes(data)
    rows = _outcome(lambda: read_jsonl(str(p)))
    old = sys.stdin
    try:
        sys.stdin = _Stdin(pyio.BufferedReader(pyio.BytesIO(data)))
        again = _outcome(lambda: read_jsonl("-"))
    finally:
        sys.stdin = old
    if isinstance(rows, MergetoolError):
        assert isinstance(again, MergetoolError) and again.why == rows.why
        event("jsonl refused")
        return
    assert again == rows or str(again) == str(rows)  # NaN != NaN
    for r in rows:  # every string is Unicode text that can be written back out
        assert isinstance(r, dict)
        json.dumps(r, ensure_ascii=False).encode("utf-8")
    exs = _outcome(lambda: check_examples(rows, str(p)))
    event("examples refused" if isinstance(exs, MergetoolError) else "examples read")
    if not isinstance(exs, MergetoolError):
        for e in exs:
            assert isinstance(e.id, str) and e.id and isinstance(e.task, str)
            if e.kind == "mc":
                assert isinstance(e.rec["prompt"], str) and all(isinstance(c, str) and c for c in e.rec["choices"])
                assert type(e.rec["answer"]) is int and 0 <= e.rec["answer"] < len(e.rec["choices"])
            elif e.kind == "gen":
                t = e.rec.get("targets", [e.rec.get("target")])
                assert isinstance(e.rec["prompt"], str) and t and all(isinstance(x, str) for x in t)
            if "text" in e.rec:
                assert isinstance(e.rec["text"], str) and e.rec["text"]
    w = _outcome(lambda: read_weights(str(p), ["a0", "a1"]))
    if not isinstance(w, MergetoolError):
        assert len(w) == 2 and all(math.isfinite(x) for x in w)
        event("weights read")
    acc = _outcome(lambda: base_accuracy(str(p)))
    if not isinstance(acc, MergetoolError):
        assert all(type(a) is float and math.isfinite(a) and 0 <= a <= 1 for a in acc.by_task.values())
        event("base accuracy read")


def test_a_header_with_a_lone_surrogate_is_refused_as_the_safetensors_library_refuses_it(tmp_path):
    """JSON's \\u escapes let a lone surrogate through Python's parser; the safetensors library refuses such a
    header, so mergetool does too, in one line (found by the reader's property test)."""
    from safetensors.torch import load as st_load

    from mergetool.blobs import read_blobs

    header = b'{"__metadata__": {"": "\\udc80"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    data = len(header).to_bytes(8, "little") + header + b"\x00" * 4
    with pytest.raises(Exception):
        st_load(data)
    p = tmp_path / "x.safetensors"
    p.write_bytes(data)
    with pytest.raises(MergetoolError, match="lone surrogate"):
        read_blobs(str(p))
    r = run_cli("merge", "-m", "mean", str(p), str(p), "-o", str(tmp_path / "out.safetensors"))
    assert r.returncode == 1 and len(r.stderr.decode().strip().splitlines()) == 1 and b"lone surrogate" in r.stderr
    assert not (tmp_path / "out.safetensors").exists()
