#!/bin/bash
# benchmarks/big_models.sh [DIR]: write the 70B and 100B dummies into DIR (default /tmp/big), load
# and measure each (tg at 1 and 2 threads, load time, bytes read, peak RSS, meminfo), then delete
# them; needs ~25 GB of disk at a time. QUIET=/path/to/quiet.sh runs each benchmark under it.
cd "$(dirname "$0")/.." || exit 1
B=${1:-/tmp/big}; mkdir -p "$B"; Q=${QUIET:+bash $QUIET}
log() { echo "== $(date +%T) $*; uptime: $(uptime)"; }
log "write 70B"; grep -E "MemAvailable|^Cached" /proc/meminfo
nice -n 19 /usr/bin/time -v script -qfec "stty cols 120 rows 40; tritlm dummy --preset 70B -o $B/70b.gguf" $B/write70.tty > $B/write70.out 2> $B/write70.time
grep -E "Maximum resident|Elapsed" $B/write70.time; ls -l $B/70b.gguf; grep -E "MemAvailable|^Cached|Dirty" /proc/meminfo
python benchmarks/memory_need.py 70B 4096 | tail -1
for layout in default tiles5; do
  log "bench 70B $layout"
  $Q python benchmarks/big_model_bench.py $B/70b.gguf $layout 4 > $B/bench70-$layout.out 2>&1
  log "done"; head -c 3000 $B/bench70-$layout.out
done
rm -f $B/70b.gguf
log "write 100B"
nice -n 19 /usr/bin/time -v script -qfec "stty cols 120 rows 40; tritlm dummy --preset 100B -o $B/100b.gguf" $B/write100.tty > $B/write100.out 2> $B/write100.time
grep -E "Maximum resident|Elapsed" $B/write100.time; ls -l $B/100b.gguf
log "100B in the default layout here (tiles on AVX2): the refusal"
python benchmarks/memory_need.py 100B 5 | tail -1
grep -E "MemTotal|MemAvailable|MemFree|^Cached" /proc/meminfo
log "bench 100B tiles5"
$Q python benchmarks/big_model_bench.py $B/100b.gguf tiles5 4 > $B/bench100.out 2>&1
log "done"; head -c 3000 $B/bench100.out
rm -f $B/100b.gguf
log "all done"
