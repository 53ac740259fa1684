#!/usr/bin/env bash
# The GPU checks in one run, for a GPU machine lent briefly (docs/GPU.md): build the package
# (or take a prebuilt extension: NATIVE_SO=path), run tests/test_cuda.py compiled on the GPU with
# the CPU engine beside it as the oracle, write a 2B4T-shaped dummy and run
# `tritlm bench --device cuda` on it, then the kernels' tile sweep (benchmarks/cuda_tiles.py).
# Logs and results go to $OUT (default /tmp/tritlm-cuda); each stage has its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tritlm-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stage() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# the dummy needs no compiled code: write it while the extension builds and the tests run
(PYTHONPATH=src python3 -m tritlm dummy -o /tmp/2b4t.gguf --preset 2B4T > "$OUT/dummy.log" 2>&1
 echo "dummy rc=$? at $(( $(date +%s) - t0 )) s" >> "$OUT/dummy.log") &
if [ -n "${NATIVE_SO:-}" ]; then
  cp "$NATIVE_SO" src/tritlm/ && export PYTHONPATH=$PWD/src
else
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  cp "$(python3 -c 'import tritlm._native as n; print(n.__file__)')" "$OUT/"
fi
stage "tests"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -rs --durations=5 tests/test_cuda.py ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -45 "$OUT/tests.log"
wait
stage "bench"; cat "$OUT/dummy.log"
timeout "${BENCH_TIMEOUT:-120}" python3 -m tritlm bench -m /tmp/2b4t.gguf --device cuda -p 512 -n 64 -o json \
  > "$OUT/bench.json" 2> "$OUT/bench.err"
echo "bench rc=$?"; tail -5 "$OUT/bench.err"
python3 -c "import json, sys; from tritlm.bench.cuda import markdown; print(markdown(json.load(open(sys.argv[1]))))" \
  "$OUT/bench.json"
stage "tiles"
timeout "${TILES_TIMEOUT:-80}" python3 benchmarks/cuda_tiles.py 2>&1
stage "done"
