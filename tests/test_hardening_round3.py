"""Round three of the adversarial pass, beyond outputs: values that must not pass (a temperature that overflowed,
a negative seed), an adapter given twice, chat templates that are not there, merges of updates that are zero or
ill-conditioned, signals while transformers is imported, Ray addresses, and the messages of odd files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import lora_blob, random_lora

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
