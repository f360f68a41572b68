"""diagnose's weight-space metrics for all pairs at once against a plain per-pair loop over dense ΔW, side by side;
and the cost of the "Demystifying Mergeability" family on top of the conflicts, in the same run.

64 random rank-16 LoRAs on q/k/v of every layer of a Llama-3.2-1B-shaped model (hidden 2048, k/v 512,
16 layers): 2016 pairs, each with the four conflict metrics of "Task-level model-merging collapse" (eq. 4-7,
the sign and conflict ratios in both readings), the cosines and the L2 distance. The plain loop forms both dense ΔW of a pair
module by module and computes each metric from them; it is timed on --plain-pairs pairs (each pair costs the
same) and carried to all pairs, and its values are compared with diagnose's on those pairs.

Then ``spectral.pair_spectra`` on the same adapters (the subspace, spectral and Gram metrics diagnose adds): its
time beside ``pair_metrics``'s is the overhead of the family (diagnose runs the two, one after the other). Its
Gram-derived values are compared with the plain loop's dense ones on the timed pairs; the SVD-based ones are
checked against dense SVDs in tests/test_diagnose_spectral.py (a dense fp64 SVD of a 2048x2048 module takes
seconds to a minute on the 2-core box, too slow for 48 modules here).

    python benchmarks/bench_diagnose.py [--adapters 64] [--plain-pairs 24] [--device cpu] [--json out.json]
    python benchmarks/bench_diagnose.py --small --json out.json          # CI size
    python benchmarks/bench_diagnose.py --shape mistral-7b --device cuda --json out.json   # the GPU figure
"""

from __future__ import annotations

import argparse
import math
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, pick, random_loras, sync  # noqa: E402

from mergetool.diagnose.spectral import pair_spectra  # noqa: E402
from mergetool.diagnose.weightspace import pair_metrics  # noqa: E402
from mergetool.updates import Update  # noqa: E402

METRICS = ("magnitude_change_ratio", "sign_change_ratio", "sign_change_ratio_strict", "conflict_magnitude_ratio",
           "conflict_magnitude_ratio_strict", "cosine", "cosine_global", "l2_distance")
GRAM = ("dot_product", "weight_space_angle", "magnitude_ratio", "pair_effective_rank", "pair_stable_rank",
        "spectral_gap")


@torch.no_grad()
def plain_pair(a: Update, b: Update, dev) -> dict:
    """Eq. 4-7 of one pair, computed from the two dense task vectors, module by module."""
    l1a = l1b = l1d = 0.0
    sign_ne = strict = conf = conf_strict = 0.0
    dot = na = nb = diff_sq = 0.0
    entries = 0
    cos = []
    for mod in a.modules:
        x, y = a.modules[mod].delta(dev).double(), b.modules[mod].delta(dev).double()
        entries += x.numel()
        l1a += float(x.abs().sum())
        l1b += float(y.abs().sum())
        diff = (x - y).abs()
        l1d += float(diff.sum())
        ne = torch.sign(x) != torch.sign(y)
        opp = x * y < 0
        sign_ne += float(ne.sum())
        strict += float(opp.sum())
        conf += float(diff[ne].sum())
        conf_strict += float(diff[opp].sum())
        diff_sq += float((diff * diff).sum())
        d, sa, sb = float((x * y).sum()), float((x * x).sum()), float((y * y).sum())
        dot, na, nb = dot + d, na + sa, nb + sb
        cos.append(d / (sa * sb) ** 0.5)
    tot = l1a + l1b
    return {"dots": (dot, na, nb), "magnitude_change_ratio": l1d / tot, "sign_change_ratio": sign_ne / entries,
            "sign_change_ratio_strict": strict / entries, "conflict_magnitude_ratio": conf / tot,
            "conflict_magnitude_ratio_strict": conf_strict / tot, "cosine": sum(cos) / len(cos),
            "cosine_global": dot / (na * nb) ** 0.5, "l2_distance": float((diff_sq) ** 0.5)}


@torch.no_grad()
def plain_gram(a: Update, b: Update, dots: tuple[float, float, float], dev) -> dict:
    """The Gram-derived metrics of one pair, the plain way: the singular values of the 2×D stack [τ_a; τ_b] by
    Gram-Schmidt on the dense vectors (the residual τ_b − c τ_a summed module by module, never a difference of
    Gram entries), then the 2×2 R's SVD."""
    dot, na, nb = dots
    c = dot / na
    res = 0.0
    for mod in a.modules:
        x, y = a.modules[mod].delta(dev).double(), b.modules[mod].delta(dev).double()
        res += float((y - c * x).pow(2).sum())
    R = torch.tensor([[na ** 0.5, dot / na ** 0.5], [0.0, res ** 0.5]], dtype=torch.float64)
    s1, s2 = (float(v) for v in torch.linalg.svdvals(R))
    p = [s1 / (s1 + s2), s2 / (s1 + s2)]
    return {"dot_product": dot, "weight_space_angle": math.degrees(math.atan2(res ** 0.5 * na ** 0.5, dot)),
            "magnitude_ratio": min(na, nb) ** 0.5 / max(na, nb) ** 0.5,
            "pair_effective_rank": math.exp(-sum(x * math.log(x) for x in p if x > 0)),
            "pair_stable_rank": (s1 + s2) ** 2 / (s1 * s1 + s2 * s2), "spectral_gap": (s1 - s2) / s1}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--plain-pairs", type=int, default=24)
    ap.add_argument("--small", action="store_true", help="hidden 256, 4 layers, 8 adapters")
    ap.add_argument("--shape", choices=["llama-3.2-1b", "mistral-7b"], default="llama-3.2-1b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = pick(args.device)
    shapes = {"llama-3.2-1b": (16, 2048, 512), "mistral-7b": (32, 4096, 1024)}
    n, layers, hidden, kv = (8, 4, 256, 64) if args.small else (args.adapters, *shapes[args.shape])
    us = random_loras(n, args.rank, layers, hidden, kv, "cpu", projs=("q_proj", "k_proj", "v_proj"))
    pairs = list(itertools.combinations(range(n), 2))
    info = {"machine": machine(dev, ()), "device": str(dev), "adapters": n, "pairs": len(pairs), "rank": args.rank,
            "shape": f"q/k/v of {layers} layers, hidden {hidden}, k/v {kv}"}
    print(f"machine: {json.dumps(info['machine'])}", flush=True)
    sync(dev)
    t = time.perf_counter()
    res = pair_metrics(us, dev)
    sync(dev)
    t_all = time.perf_counter() - t
    sync(dev)
    t = time.perf_counter()
    spec = pair_spectra(us, res, dev)
    sync(dev)
    t_spec = time.perf_counter() - t
    timed = pairs[:: max(1, len(pairs) // args.plain_pairs)][:args.plain_pairs]
    by_metric = dict.fromkeys(METRICS + GRAM, 0.0)

    def compare(got, want, names, i, j):
        for k in names:
            by_metric[k] = max(by_metric[k], abs(float(got[k][i, j]) - want[k]) / max(abs(want[k]), 1e-12))

    t = time.perf_counter()
    wants = []
    for i, j in timed:
        want = plain_pair(us[i], us[j], dev)
        compare(res, want, METRICS, i, j)
        wants.append(want)
    sync(dev)
    t_pair = (time.perf_counter() - t) / len(timed)
    for (i, j), want in zip(timed, wants):
        compare(spec, plain_gram(us[i], us[j], want["dots"], dev), GRAM, i, j)
    worst = max(by_metric.values())
    info.update({"all_pairs_s": t_all, "plain_s_per_pair": t_pair, "plain_pairs_timed": len(timed),
                 "plain_s_estimated": t_pair * len(pairs), "speedup": t_pair * len(pairs) / t_all,
                 "spectra_s": t_spec, "with_spectra_ratio": (t_all + t_spec) / t_all,
                 "max_rel_diff": worst, "max_rel_diff_by_metric": by_metric})
    print(f"{n} adapters, {len(pairs)} pairs ({info['shape']}, rank {args.rank}): all pairs {t_all:.1f} s vs plain "
          f"{t_pair:.2f} s/pair x {len(pairs)} = {t_pair * len(pairs):.0f} s (timed on {len(timed)} pairs) = "
          f"{info['speedup']:.1f}x; max relative difference {worst:.1e}", flush=True)
    print(f"the Demystifying family on top: {t_spec:.1f} s, conflicts + family = {info['with_spectra_ratio']:.3f}x the "
          f"conflicts alone", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
