#!/usr/bin/env bash
# NodePublishVolume latency with permission checks (a personal volume, its owner's pod, the
# node's pod and StorageGroup caches warm) against without (an unowned volume), alternating
# rounds in the same run, against the Kubernetes API stand-in of the tests over loopback HTTP.
# Root (real bind mounts). Prints p50/p99 of each and the p50 ratio.
#   bench/access.sh [ROUNDS] [OPS_PER_ROUND]      (default 7 × 100)
set -euo pipefail
cd "$(dirname "$0")/.."
export LANES_BENCH_ROUNDS=${1:-7} LANES_BENCH_OPS=${2:-100}
cargo test --release --test access publish_latency_with_and_without_permission_checks \
  -- --ignored --nocapture 2>&1 | grep -E '^NodePublishVolume|test result'
