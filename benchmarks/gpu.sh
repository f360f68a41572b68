#!/usr/bin/env bash
# BENCHMARKS.md's GPU backlog ("GPU figures still to measure") as one run that fits in 8.5 minutes on one H100,
# then the GPU tests (pytest -m gpu).
#
#   benchmarks/gpu.sh [--device cuda|cpu] [--small] [--model DIR] [--budget SECONDS] [--out DIR]
#
# Every benchmark writes its JSON into --out (default benchmarks/results) as soon as it finishes, and this
# script records each step's exit code and seconds in gpu-run-TAG-DATE.json after every step: a run cut short
# keeps what it did. A step gets at most its share of the time (a benchmark that overruns it is stopped and
# the next one starts), and whatever is left of --budget (default 510 s) after the last benchmark, at least
# 60 s, goes to the GPU tests. Exit status: 0 when every step exited 0 (a stopped step counts as failed). The sizes are chosen from the H100 figures of 2026-11-23 (eval: 388 items in
# 1.7 s; 64 experts x 10 steps in 3.6 s against a 32 s peft loop; KnOTS of 8 rank-16 LoRAs in 1.3 s); the
# paper-scale score times its first 6 of 65 groups and carries the rate to all of them.
#
# --device cpu --small is the dry run the test suite makes (tests/test_benchmark.py): every step at a tiny size
# on a small model (--model DIR, the suite's tiny Llama with SmolLM2's tokenizer), so the script cannot rot.
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda
SMALL=0
MODEL=""
BUDGET=""
OUT=benchmarks/results
PY=${PYTHON:-python}
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --small) SMALL=1; shift ;;
        --model) MODEL=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "gpu.sh: error: unknown option $1; see --help" >&2; exit 2 ;;
    esac
done
# the dry run is timed by nothing: its steps run to their end however busy the machine is
[ -z "$BUDGET" ] && { [ $SMALL = 1 ] && BUDGET=100000 || BUDGET=510; }
[ $SMALL = 1 ] && CAP=100000 || CAP=""
mkdir -p "$OUT"
DATE=$(date +%Y-%m-%d)
if [ "$DEVICE" = cpu ]; then
    TAG=cpu-dryrun
else  # h100, h200, ...: the card's name as BENCHMARKS.md writes it
    TAG=$("$PY" -c 'import re, torch; n = torch.cuda.get_device_name(0).lower(); m = re.search(r"[a-z]\d{2,4}", n); print(m.group(0) if m else "gpu")') || TAG=gpu
fi
START=$SECONDS
RESERVE=60
RUN="$OUT/gpu-run-$TAG-$DATE.json"
STEPS=""

record() {  # the steps so far, rewritten after each one
    printf '{"device": "%s", "small": %s, "budget_s": %s, "steps": [%s]}\n' "$DEVICE" \
        "$([ $SMALL = 1 ] && echo true || echo false)" "$BUDGET" "${STEPS#,}" > "$RUN"
}

step() {  # step NAME CAP_SECONDS JSON COMMAND...: run it within CAP and what is left of the budget
    local name=$1 cap=$2 json=$3 left t rc began
    shift 3
    left=$((BUDGET - (SECONDS - START) - RESERVE))
    if [ "$left" -lt 10 ]; then
        echo "== $name: skipped (the budget is spent)"
        STEPS="$STEPS,{\"step\": \"$name\", \"skipped\": true}"
        record
        return
    fi
    cap=${CAP:-$cap}
    t=$(( cap < left ? cap : left ))
    echo "== $name (at most ${t} s): $*"
    began=$SECONDS
    timeout --signal=TERM --kill-after=15 "$t" "$@"
    rc=$?
    [ $rc = 124 ] && echo "== $name: stopped after ${t} s"
    STEPS="$STEPS,{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - began)), \"json\": \"$json\"}"
    record
}

if [ -z "$MODEL" ]; then  # the testbed model (SmolLM2-135M-Instruct), cached from its GGUF once
    MODEL=$("$PY" -c 'import sys; from pathlib import Path; sys.path.insert(0, "benchmarks"); from common import testbed_dir; print(testbed_dir(None, Path(".cache")))')
fi
J() { echo "$OUT/$1-$TAG-$DATE.json"; }
B=benchmarks
if [ $SMALL = 1 ]; then
    step eval-train 0 "$(J eval-train)" "$PY" $B/bench_eval_train.py --tokenizer "$MODEL" --small --device "$DEVICE" \
        --items 4 --experts 2 --steps 1 --json "$(J eval-train)"
    step updates 0 "$(J updates)" "$PY" $B/bench_updates.py --model "$MODEL" --device "$DEVICE" --updates 2 --items 4 \
        --shots 1 --json "$(J updates)"
    step score 0 "$(J score)" "$PY" $B/bench_score.py --model "$MODEL" --device "$DEVICE" --pool 6 --partners 2 \
        --trials 1 --plain-pairs 1 --json "$(J score)"
    step score-paper 0 "$(J score-paper)" "$PY" $B/bench_score.py --model "$MODEL" --device "$DEVICE" --paper-scale \
        --small --paper-groups 1 --json "$(J score-paper)"
    step diagnose 0 "$(J diagnose)" "$PY" $B/bench_diagnose.py --small --device "$DEVICE" --adapters 3 --rank 4 \
        --plain-pairs 1 --json "$(J diagnose)"
    step subspace 0 "$(J subspace)" "$PY" $B/bench_subspace.py --small --device "$DEVICE" --adapters 2 --rank 2 \
        --json "$(J subspace)"
    step ray 0 "$(J ray)" "$PY" $B/bench_ray.py --model "$MODEL" --device "$DEVICE" --pool 6 --partners 2 --trials 1 \
        --repeat 1 --json "$(J ray)"
    step candidates 0 "$(J candidates)" "$PY" $B/bench_datamerge.py candidates --model "$MODEL" --device "$DEVICE" \
        --candidates 2 --population 2 --repeat 1 --per-task 1 --json "$(J candidates)"
else
    # issue 3: multiple-choice eval vs lm-eval (target 3x), per-example experts vs a peft loop (target 10x)
    step eval-train 75 "$(J eval-train)" "$PY" $B/bench_eval_train.py --tokenizer "$MODEL" --device "$DEVICE" \
        --experts 32 --json "$(J eval-train)"
    # issue 7: 64 updates batched vs 64 apply/evaluate/restore (real weights)
    step updates 50 "$(J updates)" "$PY" $B/bench_updates.py --model "$MODEL" --device "$DEVICE" --updates 64 \
        --items 100 --json "$(J updates)"
    # issue 8: score's trials vs the plain loop; the paper's scale, 6 of its 65 groups timed
    step score 50 "$(J score)" "$PY" $B/bench_score.py --model "$MODEL" --device "$DEVICE" --plain-pairs 20 \
        --json "$(J score)"
    step score-paper 80 "$(J score-paper)" "$PY" $B/bench_score.py --model "$MODEL" --device "$DEVICE" --paper-scale \
        --paper-groups 6 --json "$(J score-paper)"
    # issue 9: all pairwise weight-space metrics, Mistral-7B shapes (target: under 60 s)
    step diagnose 75 "$(J diagnose)" "$PY" $B/bench_diagnose.py --shape mistral-7b --device "$DEVICE" \
        --json "$(J diagnose)"
    # issue 11: the subspace merges, LoRA-native vs dense
    step subspace 40 "$(J subspace)" "$PY" $B/bench_subspace.py --device "$DEVICE" --json "$(J subspace)"
    # issue 12: one Ray worker per GPU (one GPU here: the overhead of --ray)
    step ray 60 "$(J ray)" "$PY" $B/bench_ray.py --model "$MODEL" --device "$DEVICE" --pool 100 --partners 20 \
        --trials 2 --repeat 1 --json "$(J ray)"
    # issue 20 (a): auto's 64 candidates, 16 per batched pass vs one at a time (target 2x; the CPU's ceiling is 1.73x)
    step candidates 30 "$(J candidates)" "$PY" $B/bench_datamerge.py candidates --model "$MODEL" --device "$DEVICE" \
        --json "$(J candidates)"
fi
RESERVE=0
step "pytest -m gpu" 600 "" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
echo "== done in $((SECONDS - START)) s: $RUN"
! grep -qE '"rc": [1-9]|"skipped": true' "$RUN"
