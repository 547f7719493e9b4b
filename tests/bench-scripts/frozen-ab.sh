#!/bin/bash
# A/B of `cbus get` with 1 % of N emulated machines frozen (still called running), for
# docs/benchmarks.md: NEW=dir OLD=dir tests/bench-scripts/frozen-ab.sh N CYCLES, each dir a
# target/release of one build. `cbus-bench --scale N emulate` (NEW's) freezes 1 % for 8 s on
# SIGUSR1; per cycle NEW, OLD, NEW, OLD with the freeze, then NEW and OLD with all answering.
N=$1; CYCLES=${2:-5}
NEW=${NEW:?directory of the new build}; OLD=${OLD:?directory of the old build}
"$NEW"/cbus-bench --scale $N emulate > /tmp/emu-$N.log 2>&1 &
BENCH=$!
until grep -q "emulated agents on" /tmp/emu-$N.log; do sleep 1; done
URL=$(grep -o "nats://[0-9.:]*" /tmp/emu-$N.log | head -1)
echo "N=$N $URL $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
run() { # dir
  local t0=$(date +%s%N)
  "$1"/cbus --server $URL --json --timeout 30s get org.cbus.Test1 /org/cbus/Test1 org.cbus.Test1.String > /tmp/ab-out.json 2>/dev/null
  local c=$?; local t1=$(date +%s%N)
  local el=$(python3 -c "import json,sys; d=json.load(open('/tmp/ab-out.json')); print(d['summary']['elapsed_ms'])" 2>/dev/null)
  local cut=$(grep -o "silent to a liveness probe too" /tmp/ab-out.json | wc -l)
  local grace=$(grep -o "grace ended" /tmp/ab-out.json | wc -l)
  echo "$1 exit=$c wall_ms=$(( (t1-t0)/1000000 )) fanout_ms=$el probe_cut=$cut grace_cut=$grace"
}
for c in $(seq 1 $CYCLES); do
  kill -USR1 $BENCH; sleep 0.3
  for d in "$NEW" "$OLD" "$NEW" "$OLD"; do run "$d"; done
  echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
  sleep 9
  # all answering, same cycle
  for d in "$NEW" "$OLD"; do run "$d"; done
done
kill -INT $BENCH; wait $BENCH
