"""score's trials on Ray against the single-process run, side by side in one run: the overhead of one worker,
and the speed-up of two.

The setting of bench_score.py (a pool of random rank-64 experts on mlp.up_proj of the middle layer, KnOTS,
M partners, N trials, one question per expert). Each way runs the same plan and the same chunks of groups:

- one process: score.Scorer with the model resident;
- --ray with 1 worker, and with 2 workers (each with the model resident, the threads split between them).

Timed twice: the trials alone (the model already loaded everywhere), and end to end (Ray's start and the
workers' model loads included). One process and one worker alternate --repeat times and the fastest run of
each is compared (this shared machine moves by 10-20% between runs). S must be the same in every run.

    python benchmarks/bench_ray.py [--model DIR] [--pool 200] [--partners 50] [--trials 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_updates import experts  # noqa: E402
from common import country_questions, machine, pick, testbed_dir  # noqa: E402

from mergetool import distributed as dist  # noqa: E402
from mergetool.methods import Params, get  # noqa: E402
from mergetool.model import fingerprint, load_model, resolve_base  # noqa: E402
from mergetool.score import Scorer, plan  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory (default: the testbed model, cached)")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache")
    ap.add_argument("--pool", type=int, default=200)
    ap.add_argument("--partners", type=int, default=50)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--merge-chunk", type=int, default=4)
    ap.add_argument("--device", default="auto", help="cuda: one worker per GPU")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of one process and one worker (the fastest of each counts)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local instance
    dev = pick(args.device)
    model_dir = testbed_dir(args.model, args.workdir)
    b = resolve_base(str(model_dir))
    model, tok = load_model(b, dev)
    exs = country_questions(args.pool)
    pool = experts(model, args.pool)
    for u, e in zip(pool, exs):
        u.name = u.meta["name"] = e.id
    groups = plan(args.pool, args.partners, args.trials, seed=0)
    ids = list(range(len(groups)))
    data_of = [[i] for i in range(args.pool)]
    m, p = get("knots"), Params()
    info = {"machine": machine(dev, ("ray", "transformers")), "model": model_dir.name, "pool": args.pool,
            "partners": args.partners, "trials": args.trials, "merges": len(groups), "merge_chunk": args.merge_chunk}
    print(f"machine: {json.dumps(info['machine'])}", flush=True)

    def run(scorer) -> tuple[float, dict]:
        res: dict = {}
        t = time.perf_counter()
        scorer.run_groups(groups, ids, lambda g, r: res.update({(a, groups[g].trial): v for a, v in r.items()}))
        return time.perf_counter() - t, res

    scorer = Scorer(model, tok, pool, exs, data_of, m, p, dev, merge_chunk=args.merge_chunk)
    fp = fingerprint(b)
    spec = dist.examples_spec(exs, "bench", data_of=data_of, method="knots", params=p, norm="tokens",
                              batch_tokens=None, merge_chunk=args.merge_chunk, level=scorer.level,
                              off_target=scorer.off_target, seed=scorer.seed)  # the one-process scorer's
    # one process and one Ray worker alternate, --repeat times each (the Ray instance idle while the process
    # runs): this shared machine moves by 10-20% from one run to the next, and the fastest of each is the
    # least disturbed
    def start(n: int):
        """A local Ray instance with n workers holding the model and the pool; the seconds that took."""
        t = time.perf_counter()
        cluster = dist.connect("local", n, str(model_dir), None, fp, dev.type, None)
        return cluster, cluster.put_updates(pool), time.perf_counter() - t

    cluster, ref, up = start(1)
    ones, rays, want = [], [], None
    for r in range(args.repeat):
        s, got = run(scorer)
        ones.append(s)
        want = want or got
        print(f"one process, run {r + 1}: {s:.1f} s ({len(groups)} merges, {args.pool * args.trials} evaluations)",
              flush=True)
        s, got = run(dist.RayScorer(cluster, spec, ref, args.merge_chunk))
        rays.append(s)
        same = sum(got[k] == v for k, v in want.items())
        print(f"ray, 1 worker, run {r + 1}: trials {s:.1f} s; same outcome on {same}/{len(want)}", flush=True)
    cluster.ray.shutdown()
    one_s = min(ones)
    info["one_process_s"], info["one_process_runs_s"] = one_s, ones
    info["ray_1"] = {"start_s": up, "trials_s": min(rays), "runs_s": rays, "end_to_end_s": up + min(rays),
                     "same_outcomes": same, "outcomes": len(want)}
    del model, scorer
    cluster, ref, up = start(2)
    s, got = run(dist.RayScorer(cluster, spec, ref, args.merge_chunk))
    same = sum(got[k] == v for k, v in want.items())
    info["ray_2"] = {"start_s": up, "trials_s": s, "end_to_end_s": up + s, "same_outcomes": same, "outcomes": len(want)}
    print(f"ray, 2 workers: start {up:.1f} s, trials {s:.1f} s; same outcome on {same}/{len(want)}", flush=True)
    cluster.ray.shutdown()
    info["overhead_one_worker"] = info["ray_1"]["trials_s"] / one_s - 1
    info["speedup_two_workers"] = info["ray_1"]["trials_s"] / info["ray_2"]["trials_s"]
    print(f"overhead of one Ray worker on the trials (fastest of {args.repeat} each): "
          f"{100 * info['overhead_one_worker']:+.1f}%; two workers: "
          f"{info['speedup_two_workers']:.2f}x one worker", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
