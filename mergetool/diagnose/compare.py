"""Comparing predictors fitted per merge method (``diagnose --compare-fits``): the cross-method analysis of
"Demystifying Mergeability" (the authors' ``analyze_results_l1_loto.sh``), on the users' own fits.

Each model's coefficients are its mean weights over the leave-one-task-out folds (the authors' "average
coefficients"; the weights of the fit on all rows where a model has no validation).

- **Top-5 metrics** of a method: the five features with the largest |mean weight|, zeros left out (the authors
  sort every feature, so a method with fewer than five non-zero weights would take zeros in dictionary order).
- **Top-5 overlap** of two methods: |top5(A) ∩ top5(B)| / 5; the summary is its mean over all pairs of
  methods (the paper's 64.0 %).
- **Sign agreement** of two methods: over the features whose mean weights are non-zero (|w| > 1e-10) in both,
  the fraction with the same sign; the summary is its mean over the pairs of methods that share such a
  feature (the paper's 79.3 %; the abstract does not say whether it averages per pair or pools, and the
  authors' script prints it per pair, so the mean over pairs is the reading taken here; the pooled fraction
  is reported beside it).
- **Gradient alignment on top**: per method, whether its top metric is a gradient metric (``grad_*``: the L2
  distance, cosine and inner product of the experts' mean gradients) and how many of its top five are.
"""

from __future__ import annotations

import itertools
from typing import Sequence

from . import predict

TOP = 5
ZERO = 1e-10


def coefficients(m: predict.Model) -> dict[str, float]:
    v = (m.validation or {}).get("mean_weights")
    return dict(v) if v else dict(zip(m.features, m.weights))


def top(coef: dict[str, float], n: int = TOP) -> list[str]:
    return [f for f, w in sorted(coef.items(), key=lambda x: -abs(x[1])) if abs(w) > ZERO][:n]


def compare_fits(models: Sequence[tuple[str, predict.Model]]) -> dict:
    """The ``comparison`` record of several fits, labelled (each label: the model's method, or its file)."""
    per = []
    for label, m in models:
        coef = coefficients(m)
        t = top(coef)
        v = m.validation or {}
        per.append({"label": label, "method": m.method, "target": m.target, "top5": t,
                    "top5_weights": {f: coef[f] for f in t}, "top_is_gradient": bool(t) and t[0].startswith("grad_"),
                    "gradient_in_top5": sum(f.startswith("grad_") for f in t),
                    "loto_pearson": v.get("pearson"), "loto_spearman": v.get("spearman"),
                    "fold_pearson_mean": v.get("fold_pearson_mean")})
    pairs = []
    agree_all = total_all = 0
    for (la, ma), (lb, mb) in itertools.combinations(models, 2):
        ca, cb = coefficients(ma), coefficients(mb)
        ta, tb = set(top(ca)), set(top(cb))
        both = [f for f in ca if f in cb and abs(ca[f]) > ZERO and abs(cb[f]) > ZERO]
        agree = sum((ca[f] > 0) == (cb[f] > 0) for f in both)
        agree_all, total_all = agree_all + agree, total_all + len(both)
        pairs.append({"a": la, "b": lb, "top5_overlap": len(ta & tb) / TOP, "shared_top5": sorted(ta & tb),
                      "sign_agreement": agree / len(both) if both else None, "signs_compared": len(both)})
    overlaps = [p["top5_overlap"] for p in pairs]
    signs = [p["sign_agreement"] for p in pairs if p["sign_agreement"] is not None]
    return {"kind": "comparison", "fits": per, "pairs": pairs,
            "mean_top5_overlap": sum(overlaps) / len(overlaps) if overlaps else None,
            "mean_sign_agreement": sum(signs) / len(signs) if signs else None,
            "pooled_sign_agreement": agree_all / total_all if total_all else None,
            "top_is_gradient": sum(p["top_is_gradient"] for p in per), "n_fits": len(per),
            "paper": {"mean_top5_overlap": 0.640, "mean_sign_agreement": 0.793}}
