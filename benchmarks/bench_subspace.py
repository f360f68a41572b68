"""Subspace merges benchmark, side by side in one run; prints ratios and writes JSON.

n rank-r LoRAs on q/k/v/o of every layer of a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads,
8 kv heads: q/o 2048x2048, k/v 512x2048). Each method (core-space with --inner tsv, the Core Space paper's
headline setting, then tsv, iso-c, iso-cts, star, cart at their defaults) runs

- from the LoRA factors (mergetool's route: exact cores of Σr x Σr), on every layer and on the compared layers
  (best of 3 runs there);
- by its dense route, the same algorithm on the dense fp64 ΔW_i (what the papers' code does), formed on demand,
  on the compared layers (--dense-layers; the dense SVDs take minutes per layer on a CPU);
- by fusion-bench's function where it has the method (TSV-M, Iso-C, Iso-CTS), on fp32 dense ΔW as it is used,
  the ΔW formed inside the timing, on the compared layers;

and the merged ΔW are compared module by module (LoRA route against dense route; fusion-bench differs by design
on LoRAs, see the docs: its result within the updates' span is reported for Iso-C).

    python benchmarks/bench_subspace.py --small              # CI-sized shapes
    python benchmarks/bench_subspace.py --device cpu --json benchmarks/results/subspace-cpu-2026-11-25.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, random_loras  # noqa: E402

from mergetool.methods import Params, get, merge_stream  # noqa: E402
from mergetool.updates import Dense, LowRank, Update  # noqa: E402

METHODS = [("core-space", {"inner": "tsv"}), ("tsv", {}), ("iso-c", {}), ("iso-cts", {}), ("star", {}), ("cart", {})]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def layer_of(mod: str) -> int:
    return int(mod.split(".layers.")[1].split(".")[0])


def as_dense(updates):
    """The same updates as dense fp64 ΔW, formed on demand (inside the timing)."""
    return [Update(u.name, {k: Dense(loader=lambda d, m=m: m.delta(d, torch.float64), shape_=m.shape)
                            for k, m in u.modules.items()}) for u in updates]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(updates, method, kw, dev):
    def go():
        out = {k: r for k, r in merge_stream(updates, get(method), Params(**kw), dev)}
        sync(dev)
        return out
    return timed(go)


def fusion_bench():
    """fusion-bench's TSV-M and Iso functions, loaded from their files (its method subpackages import the training
    stack on import, which these pure-tensor functions do not use); None when it is not installed."""
    try:
        import fusion_bench
    except ImportError:
        return None

    def load(path):
        file = Path(fusion_bench.__file__).parent / path
        spec = importlib.util.spec_from_file_location(f"fusion_bench_peer_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    tsvm = load("method/task_singular_vector/utils/TSVM_utils.py")
    iso = load("method/isotropic_merging/iso_utils.py")
    return {"tsv": lambda sds, dev: tsvm.compute_and_sum_svd_mem_reduction(sds, accelerator=dev),
            "iso-c": lambda sds, dev: iso.iso_c(sds, accelerator=dev),
            "iso-cts": lambda sds, dev: iso.iso_cts(sds, common_space_fraction=0.8, accelerator=dev)}


def compare(a: dict, b: dict) -> tuple[float, float]:
    """Relative error of a against b over all modules, and the worst module's."""
    num = den = worst = 0.0
    for k in b:
        x, y = a[k].double(), b[k].double()
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
        worst = max(worst, float((x - y).norm() / y.norm()))
    return (num / den) ** 0.5, worst


def delta(r) -> torch.Tensor:
    return r.delta(dtype=torch.float64) if isinstance(r, LowRank) else r.double()


def within_span(fb: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """fusion-bench's Iso-C projected on the span of ours, rescaled by min(m, n)/r (see the Iso-C docstring)."""
    U, S, Vh = torch.linalg.svd(ours, full_matrices=False)
    r = int((S > 1e-6 * S[0]).sum())
    return U[:, :r] @ (U[:, :r].T @ fb.double() @ Vh[:r].T) @ Vh[:r] * (min(ours.shape) / r)


def bench(args, dev) -> dict:
    hidden, kv, layers = (256, 64, 2) if args.small else (2048, 512, 16)
    n, rank = (4, 4) if args.small else (args.adapters, args.rank)
    compared = min(layers, args.dense_layers or layers)
    ups = random_loras(n, rank, layers, hidden, kv, dev)
    sub = [Update(u.name, {k: m for k, m in u.modules.items() if layer_of(k) < compared}) for u in ups]
    peers = fusion_bench()
    warm = random_loras(2, 2, 1, 32, 16, dev, seed=1)
    res = {"shape": f"{n} x rank {rank} LoRAs on q/k/v/o, hidden {hidden}, kv {kv}, {layers} layers",
           "layers_compared": compared, "fusion_bench": peers is not None, "methods": {}}
    print(res["shape"] + f"; dense routes on {compared} layer(s)", flush=True)
    for method, kw in METHODS:
        run(warm, method, kw, dev)
        run(as_dense(warm), method, kw, dev)
        t_all, _ = run(ups, method, kw, dev)
        t_lora, lora = min((run(sub, method, kw, dev) for _ in range(3)), key=lambda t: t[0])  # best of 3: ~0.1 s
        t_dense, dense = run(as_dense(sub), method, kw, dev)
        err, worst = compare({k: delta(r) for k, r in lora.items()}, {k: delta(r) for k, r in dense.items()})
        row = {"options": kw, "lora_s_all_layers": t_all, "lora_s": t_lora, "dense_s": t_dense,
               "speedup": t_dense / t_lora, "lora_vs_dense_rel_err": err, "lora_vs_dense_worst_module": worst,
               "out_ranks": sorted({r.rank for r in lora.values()})}
        line = (f"{method:10} LoRA {t_all:7.3f} s all layers, {t_lora:7.3f} s compared; dense {t_dense:8.2f} s "
                f"= {row['speedup']:7.1f}x; rel. err {err:.1e}")
        if peers and method in peers:
            fn = peers[method]

            def fb_run(sds=None, fn=fn):
                sds = sds or [{k: m.delta(dev) for k, m in u.modules.items()} for u in sub]  # fp32, as it is used
                with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per module
                    out = fn(sds, dev.type)
                sync(dev)
                return out
            fb_run([{"w": torch.ones(8, 8)}] * 2)  # warm-up
            t_fb, fb = timed(fb_run)
            ours = {k: delta(r) for k, r in lora.items()}
            row.update(fusion_bench_s=t_fb, speedup_vs_fusion_bench=t_fb / t_lora,
                       fusion_bench_rel_diff=compare(ours, {k: v.double() for k, v in fb.items()})[0])
            line += f"; fusion-bench {t_fb:8.2f} s = {row['speedup_vs_fusion_bench']:7.1f}x"
            if method == "iso-c":
                row["fusion_bench_within_span_rel_err"] = compare(
                    {k: within_span(fb[k], ours[k]) for k in ours}, ours)[0]
                line += f" (within the span: rel. err {row['fusion_bench_within_span_rel_err']:.1e})"
        print(line + f"; ranks {row['out_ranks']}", flush=True)
        res["methods"][method] = row
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CI-sized shapes (4 rank-4 LoRAs, hidden 256, 2 layers)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dense-layers", type=int, default=1, help="layers the dense routes run on (0: all)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    res = {"machine": machine(dev), "device": str(dev), "command": " ".join(sys.argv)}
    print(f"machine: {json.dumps(res['machine'])}", flush=True)
    res.update(bench(args, dev))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
