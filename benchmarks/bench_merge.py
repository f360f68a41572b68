"""Merge benchmark, side by side in one run; prints ratios and writes JSON.

(a) KnOTS from the LoRA factors vs the plain algorithm (fp64 SVD of the dense side-by-side ΔW, as the
    KnOTS paper's code does): n rank-r adapters on q/k/v/o of every layer; the same inner TIES; the
    merged ΔW compared module by module.
(b) Full-model TIES (density 0.2, per-tensor trim as mergekit does) of 4 task vectors vs mergekit's
    ``mergekit-yaml`` on the same inputs and device: wall time and peak host memory (max RSS) of each
    tool run as its own process, and the merged weights compared.

    python benchmarks/bench_merge.py --small            # CPU-sized shapes (CI)
    python benchmarks/bench_merge.py --device cuda      # Mistral-7B / Llama-3.2-1B shapes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DTYPE = torch.bfloat16
from common import machine, random_loras  # noqa: E402

from mergetool.methods import Params, get, merge_stream  # noqa: E402
from mergetool.updates import Dense, Update  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- (a) KnOTS


def as_dense(updates):
    """The same updates as dense ΔW, formed on demand in fp64 (the paper's code forms them in fp32 and
    casts; fp64 keeps rounding out of the comparison, since TIES's hard threshold flips entries that
    sit within rounding of it)."""
    return [Update(u.name, {k: Dense(loader=lambda d, m=m: m.delta(d, torch.float64), shape_=m.shape)
                            for k, m in u.modules.items()})
            for u in updates]


def run_knots(updates, dev, p):
    sync(dev)
    t = time.perf_counter()
    out = {k: r for k, r in merge_stream(updates, get("knots"), p, dev)}
    sync(dev)
    return time.perf_counter() - t, out


def bench_knots(args, dev) -> dict:
    hidden, kv, layers = (256, 64, 4) if args.small else (4096, 1024, 32)
    plain_layers = min(layers, args.plain_layers or layers)
    ups = random_loras(args.adapters, args.rank, layers, hidden, kv, dev)
    p = Params(inner="ties", density=0.2)
    sub = [Update(u.name, {k: m for k, m in u.modules.items() if int(k.split(".layers.")[1].split(".")[0]) < plain_layers})
           for u in ups]
    run_knots(random_loras(2, 4, 1, hidden, kv, dev, seed=1), dev, p)  # warm-up (kernels, handles)
    t_fact_all, _ = run_knots(ups, dev, p)
    t_fact, fact = run_knots(sub, dev, p)
    t_plain, plain = run_knots(as_dense(sub), dev, p)
    num = den = 0.0
    worst = 0.0
    for k in plain:
        a, b = fact[k].delta(), plain[k].delta()
        num += float((a - b).pow(2).sum())
        den += float(b.pow(2).sum())
        worst = max(worst, float((a - b).norm() / b.norm()))
    ranks = sorted({r.rank for r in fact.values()})
    res = {"shape": f"{args.adapters} x rank {args.rank} on q/k/v/o, hidden {hidden}, kv {kv}",
           "layers_total": layers, "layers_compared": plain_layers,
           "factor_s_all_layers": t_fact_all, "factor_s": t_fact, "plain_s": t_plain,
           "speedup": t_plain / t_fact, "rel_err": (num / den) ** 0.5, "worst_module_rel_err": worst,
           "out_ranks": ranks}
    print(f"(a) KnOTS-TIES, {res['shape']}: factors {t_fact_all:.3f} s for all {layers} layers; on {plain_layers} "
          f"layers factors {t_fact:.3f} s vs plain {t_plain:.3f} s = {res['speedup']:.1f}x; "
          f"ΔW rel. err {res['rel_err']:.2e} (worst module {worst:.2e}); output ranks {ranks}", flush=True)
    return res


# ----------------------------------------------------------------------------- (b) full-model TIES vs mergekit


def make_models(root: Path, small: bool, dev) -> list[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    else:  # Llama-3.2-1B's shapes
        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                          rope_theta=500000.0, max_position_embeddings=131072)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(DTYPE)
    paths = [root / "base"]
    model.save_pretrained(paths[0])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(4):
        g = torch.Generator(device=dev).manual_seed(100 + i)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(base[k] + 0.002 * torch.randn(v.shape, generator=g, device=dev, dtype=torch.float32).to(v.dtype))
        paths.append(root / f"ft{i}")
        model.save_pretrained(paths[-1])
    del model, base
    return paths


def timed(cmd: list[str], env=None) -> dict:
    """Run a command as its own process; wall time and its peak RSS (via a wrapper process)."""
    wrapper = ("import json,resource,subprocess,sys,time;t=time.perf_counter();"
               "r=subprocess.run(sys.argv[1:]);w=time.perf_counter()-t;"
               "print(json.dumps({'rc':r.returncode,'wall_s':w,"
               "'max_rss_mb':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024}))")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{out.stderr[-3000:]}")
    return res


def bench_ties(args, dev) -> dict:
    from mergetool.blobs import LazySafetensors

    root = Path(tempfile.mkdtemp(prefix="bench-ties-", dir=args.workdir))
    t = time.perf_counter()
    base, *fts = make_models(root, args.small, dev)
    made = time.perf_counter() - t
    for p in [base, *fts]:  # both tools read from the page cache
        for f in p.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
    cfg = root / "ties.yml"
    cfg.write_text("merge_method: ties\nbase_model: %s\nmodels:\n%s\nparameters:\n  normalize: true\n"
                   "dtype: float32\nout_dtype: %s\n" % (
                       base, "".join(f"  - model: {f}\n    parameters:\n      weight: 1.0\n      density: 0.2\n"
                                     for f in fts), args.model_dtype))
    mk_cmd = [sys.executable, "-c", "from mergekit.scripts.run_yaml import main; main()", str(cfg),
              str(root / "out-mergekit")]
    if dev.type == "cuda":
        mk_cmd.append("--cuda")
    ours_cmd = [sys.executable, "-m", "mergetool", "merge", "-m", "ties", "--density", "0.2", "--trim-scope",
                "tensor", "--base", str(base), *map(str, fts), "--save-model", str(root / "out-mergetool"),
                "--device", dev.type, "--dtype", args.model_dtype, "-q"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    # import both tools once first, so neither run pays for compiling its modules to bytecode
    subprocess.run([sys.executable, "-c", "import mergekit.scripts.run_yaml, mergekit.merge"], env=env, check=True)
    subprocess.run([sys.executable, "-c", "import mergetool.cli.merge, mergetool.methods.families, mergetool.model"],
                   env=env, check=True)
    r_mk = timed(mk_cmd, env)
    r_ours = timed(ours_cmd, env)
    # compare the merged weights
    def tensors(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            lz = LazySafetensors(f)
            out.update({k: (lz, k) for k in lz.keys()})
        return out

    a, b, bt = tensors(root / "out-mergetool"), tensors(root / "out-mergekit"), tensors(base)
    common = sorted(set(a) & set(b))
    num = den = 0.0
    for k in common:
        x = a[k][0].read(k).float()
        y = b[k][0].read(k).float()
        z = bt[k][0].read(k).float()
        num += float((x - y).pow(2).sum())
        den += float((y - z).pow(2).sum())
    res = {"models": ("Llama-3.2-1B shape" if not args.small else "small Llama") + f", {args.model_dtype}",
           "setup_s": made, "mergekit": r_mk, "mergetool": r_ours,
           "speedup": r_mk["wall_s"] / r_ours["wall_s"], "rss_ratio": r_ours["max_rss_mb"] / r_mk["max_rss_mb"],
           "tensors_compared": len(common), "tensors_only_one_side": sorted(set(a) ^ set(b))[:5],
           "merged_delta_rel_diff": (num / den) ** 0.5 if den else None}
    print(f"(b) TIES 4 task vectors ({res['models']}): mergekit {r_mk['wall_s']:.2f} s, {r_mk['max_rss_mb']:.0f} MB "
          f"RSS; mergetool {r_ours['wall_s']:.2f} s, {r_ours['max_rss_mb']:.0f} MB RSS; speedup "
          f"{res['speedup']:.2f}x, memory ratio {res['rss_ratio']:.2f}; merged-delta rel. diff "
          f"{res['merged_delta_rel_diff']:.2e} over {len(common)} tensors", flush=True)
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU-sized shapes")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--part", choices=["knots", "ties", "all"], default="all")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--plain-layers", type=int, default=0, help="layers the plain algorithm runs on (0: all)")
    ap.add_argument("--model-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="dtype of the models of (b); bf16 deltas tie at the trim threshold, where each tool "
                         "keeps a different subset of the tied entries, so only float32 compares exactly")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.model_dtype)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    res = {"machine": machine(dev), "device": str(dev)}
    print(f"machine: {json.dumps(res['machine'])}", flush=True)
    if args.part in ("knots", "all"):
        res["knots"] = bench_knots(args, dev)
    if args.part in ("ties", "all"):
        res["ties"] = bench_ties(args, dev)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
