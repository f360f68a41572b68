"""Round three of the adversarial pass, outputs: no output lands on an input (or inside an input directory), figure
outputs are checked before the run, every output gets the mode a plain ``open`` gives, and no record carries a
number JSON cannot hold."""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

import pytest
from conftest import lora_blob, random_lora

from mergetool.errors import MergetoolError, UsageError
from mergetool.outputs import atomic_output, check_figure_output, refuse_destroying_inputs

ROOT = Path(__file__).resolve().parents[1]


def inproc(capsys, *args) -> tuple[int, str, str]:
    from mergetool.cli.main import run

    rc = run(list(args))
    got = capsys.readouterr()
    return rc, got.out, got.err


# ----------------------------------------------------------------------------- outputs that would destroy inputs


@pytest.fixture
def pool(tmp_path):
    d = tmp_path / "pool"
    d.mkdir()
    for i in range(2):
        (d / f"a{i}.safetensors").write_bytes(lora_blob(random_lora(i, name=f"a{i}")))
    return d


def test_an_output_inside_an_input_directory_is_refused(pool, tmp_path):
    for out in (pool / "a0.safetensors", pool / "new.jsonl", pool / "sub" / ".." / "x.jsonl"):
        with pytest.raises(UsageError, match="inside the input directory"):
            refuse_destroying_inputs(out, [str(pool)])
    refuse_destroying_inputs(tmp_path / "elsewhere.jsonl", [str(pool), "-", None])  # beside it: fine


def test_an_output_that_is_an_input_through_links_is_refused(pool, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    sym = tmp_path / "sym.jsonl"
    sym.symlink_to(data)
    hard = tmp_path / "hard.jsonl"
    os.link(data, hard)
    for out in (data, sym, hard):
        with pytest.raises(UsageError, match="is the input"):
            refuse_destroying_inputs(out, [str(data)])
    # a link to a file inside a pool, or a hard link to it elsewhere
    lnk = tmp_path / "lnk.safetensors"
    lnk.symlink_to(pool / "a1.safetensors")
    hl = tmp_path / "hl.safetensors"
    os.link(pool / "a1.safetensors", hl)
    for out in (lnk, hl):
        with pytest.raises(UsageError, match="inside the input directory"):
            refuse_destroying_inputs(out, [str(pool)])


def test_a_file_a_directory_input_links_to_is_covered(tmp_path):
    """A Hugging Face cache snapshot is a directory of links into ``blobs/``: its blobs are what is read."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    (blobs / "123").write_bytes(b"weights")
    (snap / "model.safetensors").symlink_to(blobs / "123")
    (snap / "loop").symlink_to(snap)  # a link loop inside is walked once
    with pytest.raises(UsageError, match="inside the input directory"):
        refuse_destroying_inputs(blobs / "123", [str(snap)])


def test_eval_output_on_the_base_or_an_adapter_is_refused_before_the_model_loads(tiny_lm, pool, tmp_path, capsys,
                                                                                 monkeypatch):
    import mergetool.model

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mergetool.model, "load_model", no_load)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "q", "task": "t", "prompt": "2+2=", "choices": ["4", "5"], "answer": 0}) + "\n")
    weights = tiny_lm / "model.safetensors"
    size = weights.stat().st_size
    for out, word in ((weights, "inside the input directory"), (pool / "a0.safetensors", "inside the input directory"),
                      (pool / "new.jsonl", "inside the input directory"), (data, "is the input")):
        for extra in ([], ["--summary"]):
            rc, so, err = inproc(capsys, "eval", "--base", str(tiny_lm), "--adapter", str(pool), str(data), "-o",
                                 str(out), *extra)
            assert rc == 2 and word in err and len(err.strip().splitlines()) == 1, err
    assert weights.stat().st_size == size and (pool / "a0.safetensors").read_bytes()[:8] != b"{"
    assert not (pool / "new.jsonl").exists() and not (pool / "new.jsonl.records").exists()
    # -o a directory, or into a missing one: refused before anything is read, let alone loaded
    for out, word in ((tmp_path, "is a directory"), (tmp_path / "no" / "r.jsonl", "does not exist")):
        rc, so, err = inproc(capsys, "eval", "--base", str(tiny_lm), str(data), "-o", str(out))
        assert rc == 1 and word in err, err


# ----------------------------------------------------------------------------- figure outputs


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_figure_outputs_are_checked_before_the_run(kind, tmp_path):
    a_file = tmp_path / "f.png"
    a_file.write_bytes(b"")
    bad = {"file": [(tmp_path / "no" / "f.png", "does not exist"), (tmp_path, "is a directory"),
                    (Path("/sys/f.png"), "cannot write"), (Path("/proc/self/f.png"), "cannot write")],
           "dir": [(tmp_path / "no" / "figs", "does not exist"), (a_file, "is not a directory"),
                   (Path("/sys/figs"), "cannot write"), (Path("/sys"), "cannot write")]}[kind]
    for path, word in bad:
        with pytest.raises(UsageError, match=word):
            check_figure_output(str(path), kind)
    ok = [tmp_path / "new.png", a_file] if kind == "file" else [tmp_path, tmp_path / "figs"]
    for path in ok:
        check_figure_output(str(path), kind)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]  # the probe leaves nothing behind


# ----------------------------------------------------------------------------- modes


def test_outputs_get_the_mode_a_plain_open_gives(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_output(str(tmp_path / "new")) as fh:
            fh.write(b"x")
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o640
        kept = tmp_path / "kept"
        kept.write_bytes(b"old")
        os.chmod(kept, 0o604)
        with atomic_output(str(kept)) as fh:
            fh.write(b"new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o604 and kept.read_bytes() == b"new"
    finally:
        os.umask(old)


def test_figures_get_the_umask_mode(tmp_path):
    """The demo's PNGs came out 0600: ``plots`` made its own temporary file (mkstemp) instead of the atomic writer."""
    from mergetool.plots import bars

    old = os.umask(0o022)
    try:
        bars([{"bin": "0-0.2", "x_mean": 1.0, "x_se": 0.1}], "x", "t", tmp_path / "b.png")
    finally:
        os.umask(old)
    png = tmp_path / "b.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and stat.S_IMODE(png.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["b.png"]


# ----------------------------------------------------------------------------- finite records


def test_a_record_with_a_nan_is_refused_naming_the_field():
    from mergetool.jsonl import record_line

    assert json.loads(record_line({"a": [1.5, {"b": 2}], "é": "ü"})) == {"a": [1.5, {"b": 2}], "é": "ü"}
    for rec, field in (({"logprobs": [0.1, math.nan]}, "logprobs[1]"), ({"x": {"y": -math.inf}}, "x.y"),
                       ({"score": math.inf}, "score")):
        with pytest.raises(MergetoolError, match=re.escape(f"adapter a: field '{field}'") + ".*not a finite number"):
            record_line(rec, "adapter a")


def test_eval_writes_no_record_with_a_nan(tiny_lm, tmp_path, capsys, monkeypatch):
    """A NaN logprob (an overflowing update, a bf16 overflow) is an error that names the example and the field."""
    import mergetool.evaluate as ev

    real = ev.mc_record
    monkeypatch.setattr(ev, "mc_record", lambda e, lls, norm: {**real(e, lls, norm), "p_correct": math.nan})
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "q", "task": "t", "prompt": "2+2=", "choices": ["4", "5"], "answer": 0}) + "\n")
    for extra in ([], ["-o", str(tmp_path / "r.jsonl")], ["--summary"]):
        rc, out, err = inproc(capsys, "eval", "--base", str(tiny_lm), str(data), *extra)
        assert rc == 1 and "example q: field 'p_correct'" in err and out == "", err
    assert not (tmp_path / "r.jsonl").exists()
