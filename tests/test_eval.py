"""mergetool eval: agreement with lm-evaluation-harness, records, summaries, adapters, k-shot, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from mergetool import evaluate as ev
from mergetool import scoring as sc
from mergetool.examples import add_contexts, check_examples
from mergetool.model import load_model

ROOT = Path(__file__).resolve().parents[1]


def capitals(n: int) -> list[dict]:
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    return [r for r in rows if r["task"] == "country-capital"][:n]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(stdout: bytes) -> list[dict]:
    return [json.loads(x) for x in stdout.decode().splitlines()]


def lm_eval_decisions(model_dir: Path, rows: list[dict]):
    """lm-eval's HF backend: per-choice log-likelihoods, acc and acc_norm decisions."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = HFLM(pretrained=m, tokenizer=AutoTokenizer.from_pretrained(model_dir), batch_size=8)
    reqs = [Instance("loglikelihood", {}, (r["prompt"], c), i) for r in rows for i, c in enumerate(r["choices"])]
    lls = [x[0] for x in lm.loglikelihood(reqs)]
    out, k = [], 0
    for r in rows:
        ll = lls[k:k + len(r["choices"])]
        k += len(r["choices"])
        norm = [x / len(c) for x, c in zip(ll, r["choices"])]
        out.append((ll, max(range(len(ll)), key=ll.__getitem__), max(range(len(ll)), key=norm.__getitem__)))
    return out


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_acc_and_acc_norm_identical_to_lm_eval(which, tiny_lm, smol):
    from mergetool.model import resolve_base

    model_dir = tiny_lm if which == "tiny" else smol[1]
    rows = capitals(12 if which == "smol" else 20)
    ref = lm_eval_decisions(model_dir, rows)
    model, tok = load_model(resolve_base(str(model_dir)), torch.device("cpu"))
    exs = check_examples(rows, "x")
    for e in exs:
        e.context = e.rec["prompt"]
    for norm, pick in (("none", 1), ("chars", 2)):
        got = ev.evaluate(model, tok, exs, norm)[0]
        for g, x in zip(got, ref):
            assert g["prediction"] == x[pick]
            if norm == "none":
                assert max(abs(a - b) for a, b in zip(g["logprobs"], x[0])) < 1e-3
        acc = sum(int(x[pick] == r["answer"]) for x, r in zip(ref, rows)) / len(rows)
        assert sum(g["correct"] for g in got) / len(got) == pytest.approx(acc)


def _items(tok, rows, shots_prefix=""):
    return sc.encode_choices(tok, [(shots_prefix + r["prompt"], r["choices"]) for r in rows])


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_packed_choices_score_like_one_sequence_per_choice(which, tiny_lm, smol):
    """The shared prompt encoded once with every choice packed after it gives each choice the log-likelihood
    of its own sequence; also with a long few-shot prefix and with batches cut mid-way."""
    from mergetool.model import resolve_base

    model, tok = load_model(resolve_base(str(tiny_lm if which == "tiny" else smol[1])), torch.device("cpu"))
    rows = capitals(10)
    prefix = "".join(f"{r['prompt']}{r['choices'][r['answer']]}\n\n" for r in capitals(14)[10:])
    for items in (_items(tok, rows), _items(tok, rows, prefix)):
        model._mergetool_packing = None
        packed = sc.choice_loglikelihoods(model, items, batch_tokens=300)[0]
        assert model._mergetool_packing is True  # the packed route was taken
        plain = sc.loglikelihoods(model, [(c, x) for c, cs in items for x in cs])
        flat = [x for ll in packed for x in ll]
        assert [n for _, n in flat] == [n for _, n in plain]
        assert max(abs(a - b) for (a, _), (b, _) in zip(flat, plain)) < 1e-3


def test_rows_hold_every_item_once_within_their_width():
    import random

    rng = random.Random(0)
    lens = [rng.randint(1, 90) for _ in range(500)]
    rows = sc._rows(lens, 256)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lens[i] for i in r) <= 256 for r in rows)
    assert sum(lens) / (256 * len(rows)) > 0.9  # little padding


def test_in_place_logsumexp_equals_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 49152, generator=g) * 8
    x[1] = float("-inf")
    x[2, 5] = float("inf")
    x[3, :100] = float("-inf")
    want = torch.logsumexp(x, -1)
    got = sc._logsumexp_(x.clone())
    assert torch.equal(got.isinf(), want.isinf()) and torch.allclose(got[~want.isinf()], want[~want.isinf()],
                                                                     rtol=0, atol=1e-5)


def test_a_model_that_ignores_the_mask_takes_the_plain_route(tiny_lm):
    """If the attention ignored the custom mask (or the positions), packing would be wrong: the check notices
    and the scores are still those of one sequence per choice."""
    from mergetool.model import resolve_base

    model, tok = load_model(resolve_base(str(tiny_lm)), torch.device("cpu"))
    decoder = model.get_decoder()
    forward = decoder.forward

    def careless(*a, attention_mask=None, position_ids=None, **kw):  # drops a 4D mask and the positions
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return forward(*a, attention_mask=attention_mask, **kw)

    decoder.forward = careless
    items = _items(tok, capitals(6))
    got = sc.choice_loglikelihoods(model, items)[0]
    assert model._mergetool_packing is False
    plain = sc.loglikelihoods(model, [(c, x) for c, cs in items for x in cs])
    assert [x for ll in got for x in ll] == plain


def test_encode_choices_matches_lm_eval_split(tiny_lm):
    """Batched tokenisation gives lm-eval's (context, continuation) split, trailing spaces and empty contexts
    included."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(tiny_lm), tokenizer=tok, batch_size=1)
    cases = [("The capital of France is", [" Paris", " Lyon"]), ("Q: 2+2 = ", ["4", "5 "]),
             ("Hello  \n", ["world", " x y"]), ("", ["hello", " x"])]
    for (ctx, conts), (c_ids, cont_ids) in zip(cases, sc.encode_choices(tok, cases)):
        for x, ids in zip(conts, cont_ids):
            assert sc.encode_pair(tok, ctx, x) == (c_ids, ids)
            if ctx:
                ref = lm._encode_pair(ctx, x)
            else:  # lm-eval conditions an empty context on its prefix token (end of text here)
                ref = ([lm.prefix_token_id], lm.tok_encode(x))
            assert (c_ids, ids) == (list(ref[0]), list(ref[1]))


def test_summary_through_the_cli(tiny_lm, tmp_path):
    rows = capitals(8)
    data = write(tmp_path / "d.jsonl", rows)
    per = records(run_cli("eval", "--base", str(tiny_lm), str(data), check=True).stdout)
    (s,) = records(run_cli("eval", "--base", str(tiny_lm), "--summary", str(data), check=True).stdout)
    assert s == {"task": "country-capital", "adapter": None, "n": 8,
                 "accuracy": pytest.approx(sum(p["correct"] for p in per) / 8)}


def test_base_accuracy_on_country_capitals_is_measured(smol, tmp_path):
    data = write(tmp_path / "d.jsonl", capitals(40))
    r = run_cli("eval", "--base", str(smol[1]), "--summary", str(data))
    (s,) = records(r.stdout)
    assert s["task"] == "country-capital" and s["n"] == 40 and 0.3 < s["accuracy"] < 1.0
    print(f"SmolLM2-135M base accuracy on 40 capital questions (8 choices): {s['accuracy']:.3f}")


def test_record_fields(tiny_lm, tmp_path):
    rows = capitals(3) + [{"id": "g", "task": "gen", "prompt": "Say hi:", "target": "hi"},
                          {"id": "t", "task": "lm", "text": "Paris is the capital of France."}]
    r = run_cli("eval", "--base", str(tiny_lm), str(write(tmp_path / "d.jsonl", rows)))
    got = records(r.stdout)
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    for g in got[:3]:
        assert {"correct", "prediction", "logprobs", "p_correct", "p_max", "rank", "gap"} <= set(g)
        assert g["gap"] == pytest.approx(g["p_max"] - g["p_correct"]) and (g["rank"] == 0) == bool(g["correct"])
    assert "rouge_l" in got[3] and got[4]["perplexity"] > 1


def test_adapter_is_applied_like_a_merged_model(tiny_lm, tmp_path):
    """eval --adapter A equals eval of the model saved with A merged in, and the base is restored."""
    from conftest import lora_blob, random_lora

    shapes = {"q_proj": (64, 64), "v_proj": (32, 64), "up_proj": (128, 64)}
    a = tmp_path / "a.safetensors"
    u = random_lora(3, rank=4, targets=shapes)
    for m in u.modules.values():
        m.B *= 20
    a.write_bytes(lora_blob(u))
    data = write(tmp_path / "d.jsonl", capitals(6))
    merged = tmp_path / "merged"
    run_cli("merge", "--base", str(tiny_lm), str(a), "--save-model", str(merged), check=True)
    for f in tiny_lm.iterdir():
        if f.name.startswith("tokenizer"):
            (merged / f.name).write_bytes(f.read_bytes())
    x = records(run_cli("eval", "--base", str(tiny_lm), "--adapter", str(a), str(data), check=True).stdout)
    y = records(run_cli("eval", "--base", str(merged), str(data), check=True).stdout)
    z = records(run_cli("eval", "--base", str(tiny_lm), str(data), check=True).stdout)
    for p, q, b in zip(x, y, z):
        assert max(abs(s - t) for s, t in zip(p["logprobs"], q["logprobs"])) < 1e-4
        assert p["adapter"] == "lora3" and b["adapter"] is None
    assert any(abs(p["logprobs"][0] - b["logprobs"][0]) > 1e-3 for p, b in zip(x, z))


def test_adapters_leave_the_weights_untouched_and_the_base_after_removal(tiny_lm):
    """Updates run beside the weights: the state dict never changes, and after removal the outputs are the
    base model's again."""
    from conftest import random_lora

    from mergetool.adapters import RowAdapters
    from mergetool.model import resolve_base

    model, tok = load_model(resolve_base(str(tiny_lm)), torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[1, 2, 3, 4]])
    base = model(ids).logits
    u = random_lora(1, targets={"q_proj": (64, 64)})
    for m in u.modules.values():
        m.B *= 10
    with RowAdapters(model, [u]) as ad:
        ad.use(0)
        assert not torch.allclose(model(ids).logits, base, atol=1e-4)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(ids).logits, base)


def test_k_shot_is_deterministic_and_never_the_example_itself():
    rows = capitals(10)
    exs = check_examples(rows, "x")
    add_contexts(exs, exs, 3, seed=1)
    again = check_examples(rows, "x")
    add_contexts(again, again, 3, seed=1)
    for e, f in zip(exs, again):
        assert e.context == f.context and e.context.endswith(e.rec["prompt"])
        demos = e.context[: -len(e.rec["prompt"])]
        assert demos.count("\n\n") == 3 and e.rec["prompt"] not in demos


def test_resume_after_an_interruption(tiny_lm, tmp_path):
    data = write(tmp_path / "d.jsonl", capitals(12))
    out = tmp_path / "r.jsonl"
    run_cli("eval", "--base", str(tiny_lm), str(data), "-o", str(out), check=True)
    full = out.read_text().splitlines()
    out.write_text("\n".join(full[:5]) + "\n" + full[5][:20])  # a crash mid-line
    run_cli("eval", "--base", str(tiny_lm), str(data), "-o", str(out), "--resume", check=True)
    again = [json.loads(x) for x in out.read_text().splitlines() if x.strip().endswith("}")]
    assert sorted(r["id"] for r in again) == sorted(json.loads(x)["id"] for x in full)
    first = {r["id"]: r for r in map(json.loads, full)}
    for r in again:  # the same records, to rounding (batch neighbours differ between the runs)
        f = first[r["id"]]
        assert r["prediction"] == f["prediction"] and r["logprobs"] == pytest.approx(f["logprobs"], abs=1e-5)


def test_normalisation_and_rouge():
    assert ev.normalise("  The  Capital, PARIS! ") == "the capital paris"
    assert ev.rouge_l("the cat sat", "the cat sat") == 1.0
    assert ev.rouge_l("a b c d", "a c") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert ev.rouge_l("x", "y") == 0.0


@pytest.mark.parametrize("line,needle", [
    ('{"task": "t", "prompt": "p", "choices": ["a", "b"], "answer": 0}', ":1: missing field 'id'"),
    ('{"id": "1", "prompt": "p", "choices": ["a"], "answer": 0}', "at least 2"),
    ('{"id": "1", "prompt": "p", "choices": ["a", "b"], "answer": 5}', "'answer' must be an index"),
    ('{"id": "1", "prompt": "p"}', "no 'choices'"),
    ('{"id": "1", "text": "x"}\n{"id": "1", "text": "y"}', ":2: duplicate id"),
    ('{"id": "1", "text": "x"}\n\n', ":2: empty line"),
    ('[1, 2]', "not a JSON object"),
    ('{"id": "1", "text": ', "malformed JSON"),
])
def test_bad_examples(line, needle, tiny_lm, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    r = run_cli("eval", "--base", str(tiny_lm), str(p))
    err = r.stderr.decode()
    assert r.returncode == 1 and needle in err and "Traceback" not in err and not r.stdout
    assert len(err.strip().splitlines()) == 1


def test_bad_usage(tiny_lm, tmp_path):
    data = write(tmp_path / "d.jsonl", capitals(2))
    for args, code, needle in [([str(data)], 2, "needs the base"),
                               (["--base", str(tiny_lm), "--norm", "x", str(data)], 2, "unknown norm"),
                               (["--base", str(tiny_lm), "--resume", str(data)], 2, "needs -o"),
                               (["--base", str(tmp_path / "nope"), str(data)], 1, "not a local path"),
                               (["--base", str(tiny_lm), "--adapter", "-", "-"], 2, "stdin is named twice")]:
        r = run_cli("eval", *args, input=b"")
        assert r.returncode == code and needle in r.stderr.decode(), (args, r.stderr)


def test_adapter_of_another_base_is_refused(tiny_lm, tmp_path):
    from conftest import lora_blob, random_lora

    a = tmp_path / "a.safetensors"
    a.write_bytes(lora_blob(random_lora(1, fingerprint="feedfeedfeedfeed")))
    r = run_cli("eval", "--base", str(tiny_lm), "--adapter", str(a), str(write(tmp_path / "d.jsonl", capitals(2))))
    assert r.returncode == 1 and b"another base" in r.stderr


def test_eval_on_a_gguf_base_equals_its_converted_directory(smol, tmp_path):
    """--base FILE.gguf loads the GGUF directly (transformers dequantises it) and scores like the directory
    that conversion was saved to."""
    data = write(tmp_path / "d.jsonl", capitals(6))
    g = records(run_cli("eval", "--base", str(smol[0]), str(data), check=True).stdout)
    d = records(run_cli("eval", "--base", str(smol[1]), str(data), check=True).stdout)
    for a, b in zip(g, d):
        assert a["prediction"] == b["prediction"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4


def test_chat_template_wraps_the_prompt(smol, tmp_path):
    from mergetool.model import resolve_base

    rows = capitals(4)
    _, tok = load_model(resolve_base(str(smol[1])), torch.device("cpu"))
    exs = check_examples(rows, "x")
    add_contexts(exs, exs, 0, 0, tok, chat=True)
    for e in exs:
        assert e.context == tok.apply_chat_template([{"role": "user", "content": e.rec["prompt"]}], tokenize=False,
                                                    add_generation_prompt=True)
        assert e.context.index(e.rec["prompt"]) < e.context.rindex("assistant")
    data = write(tmp_path / "d.jsonl", rows)
    plain = records(run_cli("eval", "--base", str(smol[1]), str(data), check=True).stdout)
    chat = records(run_cli("eval", "--base", str(smol[1]), "--chat", str(data), check=True).stdout)
    assert [r["id"] for r in chat] == [r["id"] for r in rows]
    assert all(a["logprobs"] != b["logprobs"] for a, b in zip(plain, chat))


def test_progress_bar_on_a_terminal_only(tiny_lm, tmp_path):
    """On a terminal, stderr shows a bar of examples done; in a pipe, stderr has no bar (and stdout is the same)."""
    import os
    import pty
    import subprocess
    import sys

    data = write(tmp_path / "d.jsonl", capitals(20))
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="100")
    p = subprocess.run([sys.executable, "-m", "mergetool", "eval", "--base", str(tiny_lm), str(data)],
                       stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert p.returncode == 0
    assert b"eval" in seen and b"20/20" in seen, seen[-400:]
    piped = run_cli("eval", "--base", str(tiny_lm), str(data), check=True)
    assert b"20/20" not in piped.stderr and piped.stdout == p.stdout


def test_many_adapters_in_one_run_and_resume_per_adapter(tiny_lm, tmp_path):
    """--adapter POOL evaluates every adapter in one run: records per (adapter, example), equal to one run per
    adapter; --resume continues per (adapter, id)."""
    from conftest import lora_blob, random_lora

    shapes = {"q_proj": (64, 64), "up_proj": (128, 64)}
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        u = random_lora(i, rank=4, targets=shapes, name=f"p{i}", layers=[1])
        for m in u.modules.values():
            m.B *= 20
        (pool / f"p{i}.safetensors").write_bytes(lora_blob(u))
    data = write(tmp_path / "d.jsonl", capitals(5))
    out = tmp_path / "r.jsonl"
    run_cli("eval", "--base", str(tiny_lm), "--adapter", str(pool), str(data), "-o", str(out), check=True)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["adapter"], r["id"]) for r in recs) == sorted((f"p{i}", r["id"]) for i in range(3)
                                                                   for r in capitals(5))
    one = records(run_cli("eval", "--base", str(tiny_lm), "--adapter", str(pool / "p1.safetensors"), str(data),
                          check=True).stdout)
    mine = [r for r in recs if r["adapter"] == "p1"]
    for a, b in zip(mine, one):
        assert a["prediction"] == b["prediction"] and a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:7]) + "\n")
    run_cli("eval", "--base", str(tiny_lm), "--adapter", str(pool), str(data), "-o", str(out), "--resume", check=True)
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["adapter"], r["id"]) for r in again) == sorted((r["adapter"], r["id"]) for r in recs)


def test_packing_probe_raises_out_of_memory_on_any_device(monkeypatch):
    """A model that rejects the packed mask takes the plain route; an allocation failure (CUDA's OutOfMemoryError,
    the CPU allocator's RuntimeError) is raised, not mistaken for "no packing"."""
    import torch

    from mergetool import scoring as sc

    items = [([1, 2, 3], [[4, 5], [6]])]
    for err, raised in [(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"), True),
                        (torch.OutOfMemoryError("CUDA out of memory"), True),
                        (RuntimeError("The size of tensor a (7) must match the size of tensor b (5)"), False),
                        (TypeError("forward() got an unexpected keyword argument 'position_ids'"), False)]:
        model = torch.nn.Linear(2, 2)

        def boom(*a, err=err, **k):
            raise err

        monkeypatch.setattr(sc, "_sums", boom)
        if raised:
            with pytest.raises(type(err)):
                sc.packing_works(model, items)
        else:
            assert sc.packing_works(model, items) is False and model._mergetool_packing is False
