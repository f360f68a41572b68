"""GPU tier: every method on CUDA agrees with the CPU, and the CLI runs with --device cuda."""

from __future__ import annotations

import pytest
import torch
from conftest import random_lora, run_cli

from mergetool.methods import Params, all_methods, get, merge_stream
from mergetool.updates import LowRank

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DETERMINISTIC = [m for m in sorted(all_methods()) if m not in ("dare-linear", "dare-ties", "della")]


def merged(updates, method, device, **kw):
    out = {}
    for mod, r in merge_stream([u.to(device) for u in updates], get(method), Params(**kw), torch.device(device)):
        out[mod] = (r.delta() if isinstance(r, LowRank) else r).cpu()
    return out


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_cuda_matches_cpu(method):
    us = [random_lora(s, rank=2 + s) for s in range(3 if method != "slerp" else 2)]
    kw = {"weights": [0.5, 0.2, 0.9]} if method == "weighted-base" else {}
    a, b = merged(us, method, "cpu", **kw), merged(us, method, "cuda", **kw)
    for k in a:
        assert float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) < 1e-4, (method, k)


def test_random_methods_are_reproducible_on_cuda():
    us = [random_lora(s) for s in range(3)]
    for m in ("dare-linear", "dare-ties", "della"):
        a = merged(us, m, "cuda", seed=5, density=0.5)
        b = merged(us, m, "cuda", seed=5, density=0.5)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_on_cuda(adapters, tmp_path):
    out = tmp_path / "o.safetensors"
    r = run_cli("merge", "-m", "knots", "--device", "cuda", *map(str, adapters), "-o", str(out))
    assert r.returncode == 0, r.stderr
