export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_oracles.py tests/test_algebra.py 2>&1 | tail -4
python3 benchmarks/bench_merge.py --device cuda --plain-layers 2 --workdir /tmp --json $OUT/bench.json 2>&1 | grep -v "Writing model"
