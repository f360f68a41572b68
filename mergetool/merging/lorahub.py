"""LoraHub (Huang et al., COLM 2024): the adapters' weights found by gradient-free search on a few labelled
examples, with LoraHub's objective.

LoraHub's loop (lorahub 0.1.0, ``lorahub_learning``): nevergrad's NGOpt over w ∈ [−1.5, 1.5]ⁿ from w = 0, for
``max_inference_step`` evaluations, minimising loss(w) + 0.05·mean|w_i|, where loss is the model's mean
cross-entropy over the examples' answer tokens (one batch) divided by the number of examples (its
``default_get_loss``). Here the same bounds, start and objective, with two differences:

- the optimiser is CMA-ES (nevergrad's, population ``population``), and each generation's population is judged
  as rows of one batched pass (``Judge.answer_losses``). LoraHub's NGOpt, asked one point at a time, picks
  COBYLA at these budgets, which proposes one point after another and so cannot share a pass; asked for
  several at once, NGOpt picks a meta-model optimiser that fails under numpy 2.4 (nevergrad 1.0.12).
- the merge is Σ w_i ΔW_i, the task vectors' weighted sum (an exact LoRA); LoraHub sums the factors apart,
  (Σ w_i B_i)(Σ w_i A_i), which adds cross terms w_i w_j B_i A_j and is not a function of the task vectors.

``benchmarks/bench_datamerge.py`` runs LoraHub's own loop beside this one on the same examples and budget.
"""

from __future__ import annotations

from ..methods import Params, merge
from ..updates import Update
from .candidates import Judge
from .data import DevData

BOUND = 1.5  # LoraHub's bounds on each weight


def lorahub_objective(loss: float, weights, n_examples: int, l1: float) -> float:
    """LoraHub's value of a candidate: its loss divided by the number of examples, plus l1·mean|w|."""
    return loss / n_examples + l1 * sum(abs(float(w)) for w in weights) / len(weights)


def lorahub_weights(model, tok, updates: list[Update], dev: DevData, budget: int = 40, population: int = 8,
                    l1: float = 0.05, seed: int = 0, norm: str = "tokens", batch_tokens: int | None = None,
                    progress=None) -> dict:
    """{"weights": [w_1 … w_n], "info": {the best value, candidates judged, the population}}."""
    import nevergrad as ng
    import numpy as np

    judge = Judge(model, tok, dev, norm, batch_tokens)
    n_examples = len(judge.every)
    device = judge.device
    param = ng.p.Array(init=np.zeros(len(updates)), lower=-BOUND, upper=BOUND)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.ParametrizedCMA(popsize=population)(parametrization=param, budget=budget,
                                                            num_workers=population)
    best = (float("inf"), [0.0] * len(updates))
    while opt.num_ask < budget:
        asked = [opt.ask() for _ in range(min(population, budget - opt.num_ask))]
        cands = [merge(updates, "linear", Params(weights=[float(x) for x in a.value]), device) for a in asked]
        losses = judge.answer_losses(cands)
        for a, loss in zip(asked, losses):
            value = lorahub_objective(loss, a.value, n_examples, l1)
            opt.tell(a, value)
            best = min(best, (value, [float(x) for x in a.value]))
        if progress:
            progress(len(asked))
    rec = [float(x) for x in opt.provide_recommendation().value]
    return {"weights": rec, "info": {"best_value": best[0], "evaluated": opt.num_ask, "population": population,
                                     "l1": l1, "optimizer": "CMA-ES"}}
