"""mergetool diagnose: each metric on hand-computable cases, the factor route against the dense route, the
bounds of Theorem 1, the predictor, the statistics against scipy, and the command end to end."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import lora_blob, random_lora, run_cli

from mergetool.diagnose import representation as rep
from mergetool.diagnose.weightspace import pair_metrics
from mergetool.updates import adapter_stats
from mergetool.updates import Dense, LowRank, Update

ROOT = Path(__file__).resolve().parents[1]


def dense_copy(u: Update, name: str) -> Update:
    return Update(name, {k: Dense(m.delta()) for k, m in u.modules.items()}, {"name": name})


def test_identical_adapters_agree_completely():
    a = random_lora(1, rank=4)
    b = random_lora(2, rank=4)
    res = pair_metrics([a, dense_copy(a, "a2"), b], budget=30000)
    assert float(res["sign_change_ratio"][0, 1]) == 0 and float(res["magnitude_change_ratio"][0, 1]) == pytest.approx(0, abs=1e-6)
    assert float(res["conflict_magnitude_ratio"][0, 1]) == pytest.approx(0, abs=1e-7)
    assert float(res["cosine"][0, 1]) == pytest.approx(1, abs=1e-6) and float(res["cosine_global"][0, 1]) == pytest.approx(1, abs=1e-6)
    neg = Update("neg", {k: LowRank(m.A, -m.B, m.scale) for k, m in a.modules.items()})
    res = pair_metrics([a, neg])
    assert float(res["sign_change_ratio"][0, 1]) == 1 and float(res["sign_change_ratio_strict"][0, 1]) == 1
    assert float(res["magnitude_change_ratio"][0, 1]) == pytest.approx(1) and float(res["cosine"][0, 1]) == pytest.approx(-1)


def test_all_pairs_at_once_equal_a_plain_loop_over_dense_deltas():
    """Every metric from the block products (and the LoRA factor route for inner products) equals eq. 4-7
    computed pair by pair on the dense ΔW, zeros included (a sparse dense update, a module only one has)."""
    us = [random_lora(i, rank=2 + i) for i in range(4)]
    g = torch.Generator().manual_seed(9)
    d = torch.randn(64, 64, generator=g)
    d[d.abs() < 0.7] = 0
    first = next(iter(us[0].modules))
    us.append(Update("sparse", {first: Dense(d)}))
    res = pair_metrics(us, budget=40000)
    mods = list(dict.fromkeys(k for u in us for k in u.modules))
    size = {m: next(u.modules[m].delta().numel() for u in us if m in u.modules) for m in mods}

    def per_module(u):
        return [u.modules[m].delta().double().reshape(-1) if m in u.modules else torch.zeros(size[m], dtype=torch.float64)
                for m in mods]

    V = [per_module(u) for u in us]
    for i, j in itertools.combinations(range(len(us)), 2):
        a, b = torch.cat(V[i]), torch.cat(V[j])
        tot = a.abs().sum() + b.abs().sum()
        diff = torch.sign(a) != torch.sign(b)
        want = {"magnitude_change_ratio": (a - b).abs().sum() / tot,
                "sign_change_ratio": diff.double().mean(),
                "sign_change_ratio_strict": (a * b < 0).double().mean(),
                "conflict_magnitude_ratio": ((a - b).abs() * diff).sum() / tot,
                "conflict_magnitude_ratio_strict": ((a - b).abs() * (a * b < 0)).sum() / tot,
                "cosine_global": (a @ b) / (a.norm() * b.norm()),
                "l2_distance": (a - b).norm()}
        cos = [(x @ y) / (x.norm() * y.norm()) for x, y in zip(V[i], V[j]) if x.norm() > 0 and y.norm() > 0]
        want["cosine"] = sum(cos) / len(cos)
        for k, v in want.items():
            assert float(res[k][i, j]) == pytest.approx(float(v), rel=1e-5, abs=1e-7), (k, i, j)
            assert float(res[k][j, i]) == pytest.approx(float(v), rel=1e-5, abs=1e-7)


def test_factor_route_equals_dense_route():
    us = [random_lora(i, rank=3) for i in range(3)]
    a = pair_metrics(us)
    b = pair_metrics([dense_copy(u, u.name) for u in us])
    for k in ("cosine", "cosine_global", "l2_distance", "magnitude_change_ratio"):
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_adapter_stats_from_factors():
    u = random_lora(3, rank=4)
    s = adapter_stats(u)
    dense = [m.delta().double() for m in u.modules.values()]
    assert s["norm_f"] == pytest.approx(math.sqrt(sum(float(d.pow(2).sum()) for d in dense)))
    assert s["sigma_max"] == pytest.approx(max(float(torch.linalg.svdvals(d)[0]) for d in dense))
    assert 1 <= s["effective_rank"] <= 4


# ----------------------------------------------------------------------------- representations


def test_jung_bounds_on_a_regular_simplex():
    """N vertices of a regular simplex with edge Δ: the smallest enclosing ball has r² = (N−1)/(2N)·Δ² exactly
    (Jung's bound is tight there), its centre the uniform weights; two points: r² = Δ²/4 at the midpoint."""
    for N in (2, 3, 5, 8):
        pts = torch.eye(N, dtype=torch.float64) * 3.0  # edge 3√2
        d2 = torch.cdist(pts, pts).pow(2)
        t1 = rep.theorem1(d2, hidden_dim=N, names=[str(i) for i in range(N)])
        delta2 = 18.0
        assert t1["diameter2"] == pytest.approx(delta2)
        assert t1["meb_radius2"] == pytest.approx((N - 1) / (2 * N) * delta2, rel=1e-6)
        assert t1["lower_bound"] <= t1["meb_radius2"] + 1e-9 <= t1["upper_bound_jung"] + 2e-9
        assert t1["upper_bound_jung"] <= t1["upper_bound_paper"] + 1e-9
        assert list(t1["jung_weights"].values()) == pytest.approx([1 / N] * N, abs=1e-4)


def test_hidden_sim_and_mds_by_hand():
    d = torch.tensor([[0, 1, 3], [1, 0, 2], [3, 2, 0]], dtype=torch.float64)
    sim, degenerate = rep.hidden_sim(d)
    assert not degenerate
    assert sim.tolist() == [[1, 1, 0], [1, 1, 0.5], [0, 0.5, 1]]
    assert rep.mds(sim) == pytest.approx([2.0, 1 / 0.75, 4.0])
    sim2, degenerate = rep.hidden_sim(torch.tensor([[0, 2.0], [2.0, 0]], dtype=torch.float64))
    assert degenerate and sim2.tolist() == [[1, 1], [1, 1]]
    assert rep.mds(torch.tensor([[1, 0, 0], [0, 1, 1], [0, 1, 1]], dtype=torch.float64))[0] is None
    same, _ = rep.hidden_sim(torch.tensor([[0, 0, 3], [0, 0, 3], [3, 3, 0]], dtype=torch.float64))
    assert same[0, 1] == 1 and same[1, 0] == 1  # identical hidden states: HiddenSim 1


def test_a_copy_of_an_adapter_is_identical_in_every_metric(tiny_lm, tmp_path):
    """End to end: an adapter and its copy under another name have sign change 0, cosine 1, HiddenSim 1 and
    the distance 0 between their hidden states."""

    pool, data = pool_of(tmp_path, 3)
    from mergetool.blobs import read_blobs
    from mergetool.updates import from_blob

    u = from_blob(read_blobs(str(pool / "e0.safetensors"))[0], "e0")
    u.name = "copy"
    u.meta["name"] = "copy"
    (pool / "copy.safetensors").write_bytes(lora_blob(u))
    out = records(run_cli("diagnose", "--base", str(tiny_lm), "--data", str(data), str(pool), check=True).stdout.decode())
    (p,) = [r for r in out if r["kind"] == "pair" and {r["a"], r["b"]} == {"copy", "e0"}]
    assert p["sign_change_ratio"] == 0 and p["cosine"] == pytest.approx(1, abs=1e-6)
    assert p["hidden_sim"] == 1 and p["hidden_distance"] == pytest.approx(0, abs=1e-6), p
    others = [r["hidden_sim"] for r in out if r["kind"] == "pair" and {r["a"], r["b"]} != {"copy", "e0"}]
    assert max(others) < 1 or len(others) == 0


# ----------------------------------------------------------------------------- predictor and statistics


def test_predictor_recovers_a_planted_sparse_weight_vector():
    import random

    from mergetool.diagnose.forecast import leave_one_task_out
    from mergetool.diagnose.predict import fit

    g = torch.Generator().manual_seed(0)
    tasks = [f"t{i}" for i in range(6)]
    rows = []
    for k in range(300):
        x = torch.rand(6, generator=g).tolist()
        rows.append({**{f"f{i}": x[i] for i in range(6)}, "y": 2 * x[0] - x[3] + 0.05 * float(torch.randn(1, generator=g)),
                     "tasks": random.Random(k).sample(tasks, 2)})
    feats = [f"f{i}" for i in range(6)]
    m = fit(rows, feats, "y")
    w = dict(zip(feats, m.weights))
    assert w["f0"] > 0 and w["f3"] < 0 and w["f0"] > 1.5 * abs(w["f3"])
    assert all(abs(w[f]) < 0.25 * w["f0"] for f in ("f1", "f2", "f4", "f5"))
    v = leave_one_task_out(rows, feats, "y")
    assert v["pearson"] > 0.9 and len(v["folds"]) == 6 and v["nonzero_frequency"]["f0"] == 1


def test_anova_against_scipy_on_a_planted_effect():
    from scipy import stats

    from mergetool.diagnose.analysis import anovas

    g = torch.Generator().manual_seed(1)
    cells = []
    for t, effect in zip("abcd", (0, -30, -5, -60)):
        for m in ("mean", "ties", "knots"):
            for rep_ in range(3):
                cells.append({"method": m, "task": t, "group": f"g{rep_}",
                              "loss": effect + float(torch.randn(1, generator=g)) * 3})
    out = {(r["test"], r.get("factor")): r for r in anovas(cells)}
    by_task = [[c["loss"] for c in cells if c["task"] == t] for t in "abcd"]
    assert out[("anova1", "task")]["p_value"] == pytest.approx(stats.f_oneway(*by_task).pvalue)
    assert out[("anova1", "task")]["p_value"] < 1e-10 and out[("anova1", "method")]["p_value"] > 0.05
    two = out[("anova2", None)]
    assert two["task"]["p_value"] < 1e-10 and two["method"]["p_value"] > 0.01
    assert two["task"]["p_permutation"] == pytest.approx(1 / 1000) and two["method"]["p_permutation"] > 0.01


# ----------------------------------------------------------------------------- the command


def pool_of(tmp_path, n, tasks=("country-capital", "country-currency"), rank=8):
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    pool = tmp_path / "pool"
    pool.mkdir(exist_ok=True)
    for i in range(n):
        u = random_lora(i, rank=rank, targets={"up_proj": (128, 64), "q_proj": (64, 64)}, layers=[1],
                        name=f"e{i}", task=tasks[i % len(tasks)])
        for m in u.modules.values():
            m.B *= 30
        (pool / f"e{i}.safetensors").write_bytes(lora_blob(u))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:60]))
    return pool, data


def records(text):
    return [json.loads(x) for x in text.splitlines()]


def test_representations_and_an_actual_merge(tiny_lm, tmp_path):
    """The measured distortion of any merge is at least r², which is at least Δ²/4; a 'merge' equal to an
    expert has distortion 0 for that expert; a merge of some of the adapters is measured against its parents,
    on their tasks' inputs."""
    pool, data = pool_of(tmp_path, 4)
    merged = tmp_path / "m.safetensors"
    run_cli("merge", "-m", "ties", str(pool), "-o", str(merged), check=True)
    two = tmp_path / "two.safetensors"
    run_cli("merge", "-m", "mean", str(pool / "e0.safetensors"), str(pool / "e2.safetensors"), "-o", str(two),
            check=True)
    out = records(run_cli("diagnose", "--base", str(tiny_lm), "--data", str(data), "--merged", str(merged),
                          "--merged", str(two), "--budget", "1e9", str(pool), check=True).stdout.decode())
    (g,) = [r for r in out if r["kind"] == "group" and len(r["adapters"]) == 4]
    m = {r["merged"]: r for r in out if r["kind"] == "merge"}
    assert set(m) == {"m", "two"} and m["m"]["method"] == "ties" and m["two"]["adapters"] == ["e0", "e2"]
    assert m["m"]["distortion_max"] >= m["m"]["meb_radius2"] - 1e-6 >= m["m"]["lower_bound"] - 2e-6
    assert m["m"]["meb_radius2"] == g["meb_radius2"] and all(m["m"]["holds"][b] for b in ("lower_bound", "meb_radius2"))
    assert set(m["two"]["distortion"]) == {"e0", "e2"} and m["two"]["met"]
    (g2,) = [r for r in out if r["kind"] == "group" and r["adapters"] == ["e0", "e2"]]
    assert m["two"]["lower_bound"] == g2["lower_bound"] == g2["meb_radius2"]  # two points: r² = Δ²/4
    assert g["n_inputs"] == 10 and g["hidden_dim"] == 64 and g["verdict"] == "yes_if_linear"
    ads = [r for r in out if r["kind"] == "adapter"]
    assert all(r["mds"] >= 1 for r in ads) and g["mds"] == {r["adapter"]: r["mds"] for r in ads}
    pairs = [r for r in out if r["kind"] == "pair"]
    assert len(pairs) == 6 and max(p["hidden_sim"] for p in pairs) == 1 and min(p["hidden_sim"] for p in pairs) == 0
    same = records(run_cli("diagnose", "--base", str(tiny_lm), "--data", str(data), "--merged",
                           str(pool / "e1.safetensors"), str(pool), check=True).stdout.decode())
    (d,) = [r["distortion"] for r in same if r["kind"] == "merge"]  # no parents: a merge of all the adapters
    assert d["e1"] == pytest.approx(0, abs=1e-6) and min(v for k, v in d.items() if k != "e1") > 0


def test_gradients_explain_scores_fit_and_predict(tiny_lm, tmp_path):
    pool, data = pool_of(tmp_path, 6)
    scores = tmp_path / "s.jsonl"
    scores.write_text("".join(json.dumps({"adapter": f"e{i}", "score": s}) + "\n"
                              for i, s in enumerate([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])))
    model = tmp_path / "m.json"
    r = run_cli("diagnose", "--base", str(tiny_lm), "--data", str(data), "--gradients", "--explain", "--scores",
                str(scores), "--fit", str(model), str(pool), "--plot", str(tmp_path / "figs"), check=True)
    out = records(r.stdout.decode())
    pairs = [x for x in out if x["kind"] == "pair"]
    assert all(p["grad_cosine"] is not None and p["grad_l2"] >= 0 for p in pairs)
    ads = [x for x in out if x["kind"] == "adapter"]
    assert all({"gap", "p_correct", "finetuned", "perplexity"} <= set(a) for a in ads)
    stats = [x for x in out if x["kind"] == "stat" and x["test"] == "correlation"]
    assert {s["x"] for s in stats} >= {"mds", "norm_f", "gap"} and all(s["y"] == "score" for s in stats)
    m = json.loads(model.read_text())
    assert m["kind"] == "model" and m["target"] == "score" and len(m["weights"]) == len(m["features"])
    pred = records(run_cli("diagnose", "--base", str(tiny_lm), "--data", str(data), "--explain", "--gradients",
                           "--predict", str(model), str(pool), check=True).stdout.decode())
    assert sum(x["kind"] == "prediction" for x in pred) == 6
    figs = tmp_path / "figs"
    assert (figs / "hidden_sim.png").exists() and list(figs.glob("bins_*.png")), sorted(figs.iterdir())


def test_losses_join_pairs_and_groups(tiny_lm, tmp_path):
    pool, data = pool_of(tmp_path, 4, tasks=("a", "b", "c", "d"))
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    tasks = ["a", "b", "c", "d"]
    data.write_text("".join(json.dumps({**r, "task": tasks[i % 4]}) + "\n" for i, r in enumerate(rows)))
    loss = []
    names = [f"e{i}" for i in range(4)]
    for method, shift in (("mean", -10), ("ties", -5)):
        for a, b in itertools.combinations(range(4), 2):
            for x in (a, b):
                loss.append({"group": f"{a}{b}", "adapters": [names[a], names[b]], "method": method, "adapter": names[x],
                             "task": tasks[x], "loss": shift - 3 * (a + b) - x})
        for x in range(4):
            loss.append({"adapters": names, "method": method, "adapter": names[x], "task": tasks[x], "loss": shift - 7 * x})
    lf = tmp_path / "l.jsonl"
    lf.write_text("".join(json.dumps(x) + "\n" for x in loss))
    model = tmp_path / "pair.json"
    out = records(run_cli("diagnose", "--base", str(tiny_lm), "--data", str(data), "--losses", str(lf), str(pool),
                          "--plot", str(tmp_path / "figs"), "--fit", str(model), "--fit-method", "mean",
                          check=True).stdout.decode())
    assert (tmp_path / "figs" / "metrics_vs_loss.png").exists()
    # the pair model forecasts every pair, and the group of all four from its pairs (mean, and the worst pair)
    pred = records(run_cli("diagnose", "--base", str(tiny_lm), "--data", str(data), "--predict", str(model),
                           str(pool), check=True).stdout.decode())
    per_pair = [x for x in pred if x["kind"] == "prediction" and "a" in x]
    (grp,) = [x for x in pred if x["kind"] == "prediction" and "group" in x]
    assert len(per_pair) == 6 and grp["group"] == "e0,e1,e2,e3"
    assert grp["predicted"] == pytest.approx(sum(x["predicted"] for x in per_pair) / 6)
    assert grp["worst_pair"]["predicted"] == min(x["predicted"] for x in per_pair)
    # a model whose features these records lack says which (no hidden states without --base and --data)
    r = run_cli("diagnose", "--predict", str(model), str(pool))
    assert r.returncode == 1 and b"missing: " in r.stderr and not r.stdout, r.stderr
    stats = [x for x in out if x["kind"] == "stat"]
    assert {s["factor"] for s in stats if s["test"] == "anova1"} == {"method", "task"}
    assert sum(s["test"] == "correlation" and s["y"] == "pair_loss" for s in stats) >= 2 * 8
    assert any(s["test"] == "correlation" and s["x"] == "mds" and s["n"] == 4 for s in stats)
    assert any(s["test"] == "merging_loss" and s["n_members"] == 4 for s in stats)


def test_select_replaces_the_most_incompatible_member(tiny_lm, tmp_path):
    pool, data = pool_of(tmp_path, 6)
    group = [str(pool / f"e{i}.safetensors") for i in range(4)]
    cands = tmp_path / "cands"
    cands.mkdir()
    for i in (4, 5):
        (pool / f"e{i}.safetensors").rename(cands / f"e{i}.safetensors")
    out = records(run_cli("diagnose", "--base", str(tiny_lm), "--data", str(data), "--select", "4", "--candidates",
                          str(cands), *group, check=True).stdout.decode())
    (s,) = [x for x in out if x["kind"] == "selection"]
    assert len(s["group"]) == 4 and s["worst_mds_after"] <= s["worst_mds_before"]


@pytest.mark.parametrize("args,code,needle", [
    (["@pool", "--base", "@base"], 2, "both --base and --data"),
    (["@pool", "--budget", "5"], 2, "needs the model"),
    (["@pool", "--budget", "nan", "--base", "@base", "--data", "@data"], 2, "finite"),
    (["@pool", "--fit", "m.json"], 2, "needs measured"),
    (["@pool", "--pool", "max"], 2, "unknown pooling"),
    (["@pool", "--scores", "@badscores"], 1, "no adapter of the score records"),
    (["@one"], 2, "at least two"),
    (["@pool", "--predict", "@junk"], 1, "not a diagnose model"),
    (["@pool", "--scores", "@nanscore"], 1, "finite"),
    (["@pool", "--scores", "@bigscore"], 1, "outside [0, 1]"),
    (["@pool", "--scores", "@twoscores"], 1, "has a second score"),
    (["@pool", "--losses", "@otherpairs"], 1, "no merged pair is a pair of the adapters diagnosed"),
    (["@pool", "--losses", "@onemember"], 1, "a loss for each of its two members"),
    (["@pool", "--losses", "@badmembers"], 1, "a list of names"),
    (["@pool", "--losses", "@boolloss"], 1, "finite number"),
    (["@pool", "--predict", "@listmodel"], 1, "not a diagnose model"),
    (["@pool", "--predict", "@nanmodel"], 1, "not a diagnose model"),
    (["@pool", "--predict", "@bogusmodel"], 1, "unknown target"),
    (["@pool", "--base", "@base", "--data", "@data", "--losses", "@othergroup"], 1,
     "no merged group of three or more is a group of the adapters diagnosed"),
])
def test_bad_inputs(args, code, needle, tiny_lm, tmp_path, capsys):
    from mergetool.cli.main import run

    pool, data = pool_of(tmp_path, 3)
    (tmp_path / "bs.jsonl").write_text('{"adapter": "nobody", "score": 0.5}\n')
    (tmp_path / "junk.json").write_text('{"kind": "other"}')
    files = {"nanscore": '{"adapter": "e0", "score": NaN}\n', "bigscore": '{"adapter": "e0", "score": 1.5}\n',
             "twoscores": '{"adapter": "e0", "score": 0.5}\n{"adapter": "e0", "score": 0.25}\n',
             "otherpairs": '{"adapters": ["x", "y"], "adapter": "x", "method": "mean", "loss": -3}\n',
             "othergroup": '{"adapters": ["x", "y", "z"], "adapter": "x", "method": "mean", "loss": -3}\n',
             "onemember": '{"adapters": ["e0", "e1"], "adapter": "e0", "method": "mean", "loss": -3}\n',
             "badmembers": '{"adapters": ["e0", 1], "adapter": "e0", "method": "mean", "loss": -3}\n',
             "boolloss": '{"adapters": ["e0", "e1"], "adapter": "e0", "method": "mean", "loss": true}\n'}
    good = {"kind": "model", "target": "score", "features": ["norm_f"], "lo": [0], "hi": [1], "weights": [1], "lam": 1}
    for k, doc in {"listmodel": [good], "nanmodel": {**good, "weights": [float("nan")]},
                   "bogusmodel": {**good, "target": "bogus"}}.items():
        (tmp_path / f"{k}.jsonl").write_text(json.dumps(doc))
        files[k] = json.dumps(doc)
    for k, text in files.items():
        (tmp_path / f"{k}.jsonl").write_text(text)
    subst = {"@pool": str(pool), "@base": str(tiny_lm), "@data": str(data), "@badscores": str(tmp_path / "bs.jsonl"),
             "@one": str(pool / "e0.safetensors"), "@junk": str(tmp_path / "junk.json"),
             **{f"@{k}": str(tmp_path / f"{k}.jsonl") for k in files}}
    rc = run(["diagnose", *[subst.get(a, a) for a in args]])
    got = capsys.readouterr()
    assert rc == code and needle in got.err and "Traceback" not in got.err, got.err
    assert len(got.err.strip().splitlines()) == 1 and not got.out


# ----------------------------------------------------------------------------- records, fits compared, hardening


def pair_losses_file(tmp_path, names, methods=(("mean", -10), ("ties", -5)), alone=None):
    rows = []
    for method, shift in methods:
        for a, b in itertools.combinations(range(len(names)), 2):
            for x in (a, b):
                r = {"adapters": [names[a], names[b]], "method": method, "adapter": names[x], "task": names[x]}
                if alone is None:
                    r["loss"] = shift - 3 * (a + b) - x
                else:
                    r.update(merged=0.5, alone=alone)
                rows.append(r)
    f = tmp_path / "l.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return f


def test_records_rebuild_the_statistics_fits_and_figures_without_the_adapters(tmp_path):
    """diagnose --records on its own output gives the same statistics and the same fitted model as the run that
    measured them; a fit per method, then --compare-fits on the two models."""
    names = [f"e{i}" for i in range(5)]
    pool, _ = pool_of(tmp_path, 5, tasks=names)
    lf = pair_losses_file(tmp_path, names)
    common = ["--losses", str(lf), "--fit-method", "ties", "--resamples", "50", "--permutations", "49", "-q"]
    first = records(run_cli("diagnose", str(pool), *common, "--fit", str(tmp_path / "a.json"), "-o",
                            str(tmp_path / "diag.jsonl"), check=True).stdout.decode() or
                    (tmp_path / "diag.jsonl").read_text())
    again = records(run_cli("diagnose", "--records", str(tmp_path / "diag.jsonl"), *common, "--fit",
                            str(tmp_path / "b.json"), "--plot", str(tmp_path / "figs"), check=True).stdout.decode())
    assert {r["kind"] for r in again} == {"stat", "model"}
    assert [r for r in first if r["kind"] == "stat"] == [r for r in again if r["kind"] == "stat"]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a == b and a["method"] == "ties" and a["baselines"]
    figs = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {"pair_metrics.png", "pair_loss.png", "metrics_vs_loss.png"} <= figs, figs
    run_cli("diagnose", "--records", str(tmp_path / "diag.jsonl"), "--losses", str(lf), "--fit-method", "mean",
            "--fit", str(tmp_path / "c.json"), "--resamples", "0", "--permutations", "0", "-q", check=True)
    r = run_cli("diagnose", "--compare-fits", str(tmp_path / "a.json"), str(tmp_path / "c.json"), check=True)
    (c,) = records(r.stdout.decode())
    assert b"mean top-5 overlap" in r.stderr and b"(paper 64.0%)" in r.stderr
    assert c["kind"] == "comparison" and [f["label"] for f in c["fits"]] == ["ties", "mean"]
    assert 0 <= c["mean_top5_overlap"] <= 1 and len(c["pairs"]) == 1


def test_records_of_two_runs_that_disagree_are_refused(tmp_path):
    pool, _ = pool_of(tmp_path, 3)
    one = run_cli("diagnose", str(pool), "-q", check=True).stdout.decode()
    other = [json.loads(x) for x in one.splitlines()]
    for r in other:
        if r["kind"] == "pair":
            r["cosine"] = 0.5
    (tmp_path / "one.jsonl").write_text(one)
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))
    ok = run_cli("diagnose", "--records", str(tmp_path / "one.jsonl"), "--records", str(tmp_path / "one.jsonl"))
    assert ok.returncode == 0, ok.stderr
    r = run_cli("diagnose", "--records", str(tmp_path / "one.jsonl"), "--records", str(tmp_path / "two.jsonl"))
    assert r.returncode == 1 and b"appears again with other values" in r.stderr and not r.stdout


def test_fit_onto_the_records_file_is_refused(tmp_path):
    """--fit F -o F once wrote the model, then the records over it (issue 22)."""
    pool, _ = pool_of(tmp_path, 4)
    lf = pair_losses_file(tmp_path, [f"e{i}" for i in range(4)])
    same = tmp_path / "m.json"
    r = run_cli("diagnose", str(pool), "--losses", str(lf), "--fit", str(same), "-o", str(same))
    assert r.returncode == 2 and b"--fit" in r.stderr and b"overwrite each other" in r.stderr
    assert not same.exists() and not r.stdout


@pytest.mark.parametrize("where", ["file", "missing", "readonly"])
def test_plot_is_checked_before_the_run(tmp_path, where):
    """--plot onto a file, into a missing parent, or into a directory that cannot be written: one line before
    any work, and no records written (they were written first, then the figures failed)."""
    import os

    pool, _ = pool_of(tmp_path, 3)
    target = {"file": tmp_path / "f.png", "missing": tmp_path / "no" / "figs", "readonly": tmp_path / "ro"}[where]
    if where == "file":
        target.write_bytes(b"x")
    if where == "readonly":
        target.mkdir()
        target.chmod(0o500)
        if os.access(target, os.W_OK):  # root writes anywhere
            pytest.skip("running as a user who can write into a read-only directory")
    out = tmp_path / "out.jsonl"
    r = run_cli("diagnose", str(pool), "--plot", str(target), "-o", str(out))
    assert r.returncode == 2 and b"--plot" in r.stderr and not out.exists(), r.stderr


def test_an_l1_the_optimiser_cannot_use_is_refused(tmp_path):
    """--l1 1e300 once returned the random initial weights (Adam's second moment overflowed)."""
    pool, _ = pool_of(tmp_path, 3)
    lf = pair_losses_file(tmp_path, ["e0", "e1", "e2"])
    r = run_cli("diagnose", str(pool), "--losses", str(lf), "--fit", str(tmp_path / "m.json"), "--l1", "1e300")
    assert r.returncode == 2 and b"--l1" in r.stderr and b"optimiser" in r.stderr and not (tmp_path / "m.json").exists()


def test_predict_refuses_a_huge_model_file_without_reading_it(tmp_path):
    """--predict read a model file whole (1 GB: 2.2 GB of memory); a file larger than any model is refused
    from its size."""
    pool, _ = pool_of(tmp_path, 3)
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: no disk, but a whole read would take a gigabyte of memory
    import subprocess
    import sys

    # a fresh parent whose only child is the command: its peak memory, in KiB
    probe = ("import resource, subprocess, sys; r = subprocess.run([sys.executable, '-m', 'mergetool', 'diagnose', "
             f"{str(pool)!r}, '--predict', {str(big)!r}], capture_output=True); sys.stderr.buffer.write(r.stderr); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True)
    code, peak = map(int, r.stdout.split())
    assert code == 1 and b"is not a diagnose model" in r.stderr and b"bytes" in r.stderr, r.stderr
    assert peak < 900 * 1024  # far below the gigabyte a whole read takes


def test_losses_whose_alone_is_zero_say_so(tmp_path):
    """'alone': 0 makes the loss undefined; the error once blamed missing records."""
    pool, _ = pool_of(tmp_path, 3)
    lf = pair_losses_file(tmp_path, ["e0", "e1", "e2"], alone=0)
    r = run_cli("diagnose", str(pool), "--losses", str(lf))
    assert r.returncode == 1 and b"'alone' is 0" in r.stderr and b"records" not in r.stderr.split(b":")[-1], r.stderr


def test_theorem1_across_merges_from_records(tmp_path):
    """The Theorem 1 analysis runs from committed records: merge and group records (as a model run writes them)
    with the loss records give how often each bound holds and the group correlations, and the figures."""
    import random

    rng = random.Random(3)
    names = [f"t{i}" for i in range(6)]
    recs = [{"kind": "adapter", "adapter": n, "task": n} for n in names]
    recs += [{"kind": "pair", "a": a, "b": b, "cosine": rng.uniform(-0.1, 0.1)} for a, b in itertools.combinations(names, 2)]
    losses = []
    for g in range(8):
        members = sorted(rng.sample(names, 3))
        d2 = rng.uniform(1, 3)
        recs.append({"kind": "group", "group": f"g{g}", "adapters": members, "mds": {m: rng.uniform(1, 2) for m in members},
                     "diameter2": d2, "lower_bound": d2 / 4, "meb_radius2": d2 / 3, "upper_bound_paper": d2 * 0.49,
                     "upper_bound_jung": d2 / 3})
        dmax = d2 / 3 * rng.uniform(1, 2)
        recs.append({"kind": "merge", "merged": f"ties-g{g}", "method": "ties", "group": f"g{g}", "adapters": members,
                     "tasks": members, "distortion_max": dmax, "distortion_excess": dmax - d2 / 3, "diameter2": d2,
                     "lower_bound": d2 / 4, "meb_radius2": d2 / 3, "upper_bound_paper": d2 * 0.49,
                     "upper_bound_jung": d2 / 3, "holds": {"lower_bound": True, "meb_radius2": True,
                                                          "upper_bound_jung": dmax <= d2 / 3,
                                                          "upper_bound_paper": dmax <= d2 * 0.49}})
        losses += [{"group": f"g{g}", "adapters": members, "adapter": m, "task": m, "method": "ties",
                    "loss": -20 * dmax + rng.gauss(0, 1)} for m in members]
    rf, lf = tmp_path / "r.jsonl", tmp_path / "l.jsonl"
    rf.write_text("".join(json.dumps(r) + "\n" for r in recs))
    lf.write_text("".join(json.dumps(r) + "\n" for r in losses))
    r = run_cli("diagnose", "--records", str(rf), "--losses", str(lf), "--resamples", "100", "--permutations", "19",
                "--plot", str(tmp_path / "figs"), check=True)
    out = records(r.stdout.decode())
    (b,) = [x for x in out if x["test"] == "theorem1_bounds" and x["method"] == "all"]
    assert b["n"] == 8 and b["holds"]["lower_bound"] == 8
    corr = {(x["x"], x["y"]): x for x in out if x["test"] == "group_correlation"}
    assert corr[("distortion_max", "mean_loss")]["pearson"] < -0.8 and ("pairs_mean_cosine", "worst_loss") in corr
    assert any(x["test"] == "theorem1_vs_weights" for x in out)
    assert any(x["test"] == "correlation" and x["x"] == "mds" for x in out)  # Table 5 from the group records
    assert b"how often each bound holds" in r.stderr
    assert {"theorem1.png", "collapse_limits.png"} <= {p.name for p in (tmp_path / "figs").iterdir()}


def test_pair_loss_heat_maps_share_one_colour_scale(tmp_path, monkeypatch):
    """Every method's pair-loss panel is drawn on the range of all the methods' losses, so one colour is one loss
    across panels (each panel on its own range made a −5 % pair look like a −60 % one)."""
    from mergetool import plots
    from mergetool.diagnose.figures import write_figures

    calls = {}
    monkeypatch.setattr(plots, "heatmaps", lambda names, panels, path, unit=None: calls.__setitem__(path.name, unit))
    records = [{"kind": "adapter", "adapter": a} for a in "abc"] + \
              [{"kind": "pair", "a": a, "b": b} for a, b in (("a", "b"), ("a", "c"), ("b", "c"))]
    loss = {"mean": {"ab": (-60.0, -40.0), "ac": (-10.0, -10.0)}, "ties": {"ab": (-2.0, -4.0), "bc": (0.0, 2.0)}}
    losses = [{"group": k, "adapters": list(k), "adapter": x, "task": x, "method": m, "loss": v}
              for m, per in loss.items() for k, vs in per.items() for x, v in zip(k, vs)]
    write_figures(records, losses, tmp_path)
    assert calls["pair_loss.png"] == (-50.0, 1.0)  # pair means: mean −50 and −10, ties −3 and +1
