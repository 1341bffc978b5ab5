#!/usr/bin/env bash
# FastStage overhead and operator memory: the real `lanes operator` against the tests' Kubernetes
# API stand-in (loopback HTTP), the test playing the Job controller by running each Job's own
# `lanes copy`. Alternating in the same run: a bare `lanes copy` of a tree of FILES files
# (1 GiB in all) against the time from a FastStage's creation to Succeeded over the same
# tree; then the operator's RSS idle and with 50 FastStages copying. Medians of RUNS.
#   bench/faststage.sh [FILES] [RUNS]      (default 10000 3; LANES_BENCH_DIR: where the trees go)
set -euo pipefail
cd "$(dirname "$0")/.."
export LANES_BENCH_FILES=${1:-10000} LANES_BENCH_RUNS=${2:-3}
cargo test --release --test faststage faststage_overhead_and_operator_memory \
  -- --ignored --nocapture 2>&1 | grep -E '^FastStage|^operator RSS|test result'
