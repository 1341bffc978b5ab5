#!/usr/bin/env bash
# Benchmark: p50/p99 latency of CreateVolume, DeleteVolume, NodePublishVolume and
# NodeUnpublishVolume over N operations on the local lane, sequential and with 16 concurrent
# clients, plus the plugin's resident memory idle and under that load. Needs root (mounts).
#
#   bench/csi-latency.sh [OPS]        (default 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
ops=${1:-1000}
cargo build --release --locked --quiet
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
LANES_LOG=warn target/release/lanes standalone --data-dir "$work/data" --node-id bench \
  --endpoint "$work/csi.sock" &
pid=$!
for _ in $(seq 100); do [ -S "$work/csi.sock" ] && break; sleep 0.05; done
sleep 1
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r)"
echo "plugin idle RSS: $(awk '/VmRSS/{print $2" "$3}' /proc/$pid/status)"
target/release/lanes csi --endpoint "$work/csi.sock" bench --ops "$ops" \
  --concurrency 1 --concurrency 16 --workdir "$work/mnt" --server-pid "$pid"
