#!/bin/bash
# Idle-machine measurements: the demo idle (twice), beside 1 and 3 busy processes; thread table; training step.
rm -rf /tmp/fresh; git clone -q /work/main /tmp/fresh; cd /tmp/fresh
export PYTHONPATH=/tmp/fresh/src
unset OMP_NUM_THREADS
demo() { /usr/bin/time -v python -m cdeq.cli demo --out /tmp/fresh/runs/$1 > /work/m/$1.log 2>&1; }
busy() { PIDS=""; for j in $(seq $1); do python3 -c "while True: pass" & PIDS="$PIDS $!"; done; }
demo idle1
demo idle2
busy 1; demo busy1; kill $PIDS
busy 3; demo busy3; kill $PIDS
python benchmarks/threads.py > /work/m/threads.log 2>&1
OMP_NUM_THREADS=1 python benchmarks/training.py > /work/m/training.log 2>&1
echo done > /work/m/DONE
