#!/usr/bin/env bash
# The study on a 2-core machine as two single-thread workers (MiniLM's small matmuls scale poorly across
# two threads, so two independent runs keep both cores busier than one two-thread run). They split the work by
# method (lr phase) and by task (main phase), so no run is done twice; both append to the same JSONL
# (one short write per run). The main phase needs every learning rate, so each worker retries it until
# the other worker's lr runs are in. Usage: benchmarks/study/run_two_workers.sh [MAX_MINUTES]
set -u
cd "$(dirname "$0")/../.."
MINUTES=${1:-600}
export ID3_STUDY_DEADLINE=$(python -c "import time; print(time.time() + 60 * $MINUTES)")
FAST=full,id3,static,pafi,fish,random,bitfit,official-id3,lora,id3-lora
study() { python benchmarks/study/run_study.py --threads 1 "$@"; }
main_when_ready() {  # exit status 1: the lr phase is not finished yet (the other worker is still on it)
  local methods=$1
  shift
  until study --phase main --methods "$methods" "$@"; do
    python -c "import os, sys, time; sys.exit(time.time() > float(os.environ['ID3_STUDY_DEADLINE']))" || return
    sleep 30
  done
}
# repeat-S (slow) comes last: worker A runs its lr grid, then both workers its main runs.
(
  study --phase lr --methods full,id3,static,pafi,fish,random,bitfit
  study --phase sensitivity
  main_when_ready "$FAST" --tasks rte,cola
  study --phase lr --methods repeat
  main_when_ready repeat --tasks rte,cola
) > benchmarks/study/worker-a.log 2>&1 &
(
  study --phase lr --methods official-id3,lora,id3-lora
  main_when_ready "$FAST" --tasks mrpc,sst2
  main_when_ready repeat --tasks mrpc,sst2
) > benchmarks/study/worker-b.log 2>&1 &
wait
