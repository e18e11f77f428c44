#!/bin/bash
# The idle-machine measurements of docs/performance.md, one after another:
# `cdeq demo` from a fresh clone idle (twice), beside 1 and beside 3 busy processes; the thread
# table; the training step against TorchDEQ. Usage: bash measure.sh REPO OUT
# (REPO: a checkout to clone; OUT: where the outputs go). Run it on an otherwise idle machine.
set -u
repo=$(realpath "$1"); out=$(realpath -m "$2"); mkdir -p "$out"
fresh=$(mktemp -d); git clone -q "$repo" "$fresh/cdeq"; cd "$fresh/cdeq"
export PYTHONPATH=$PWD/src
unset OMP_NUM_THREADS
demo() { /usr/bin/time -v python -m cdeq.cli demo --out "runs/$1" > "$out/$1.txt" 2>&1; }
busy() { PIDS=""; for _ in $(seq "$1"); do python3 -c "while True: pass" & PIDS="$PIDS $!"; done; }
demo idle1
demo idle2
busy 1; demo busy1; kill $PIDS
busy 3; demo busy3; kill $PIDS
python benchmarks/threads.py --out "$out/threads.json" > "$out/threads.txt" 2>&1
OMP_NUM_THREADS=1 python benchmarks/training.py --out "$out/training.json" > "$out/training.txt" 2>&1
