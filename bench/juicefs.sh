#!/usr/bin/env bash
# Benchmark of the shared-rwx (JuiceFS) lane, side by side with its peers, on one machine:
#  1. NodePublishVolume p50 of JuiceFS volumes on a node where the file system is mounted,
#     against local-lane volumes, in the same plugin (lanes csi bench, OPS volumes each);
#  2. the first publish on a node that has not mounted the file system yet (mount included),
#     through `lanes csi publish`, RUNS times;
#  3. sequential read of a 1 GiB file through a Lanes-published volume against a plain
#     `juicefs mount` of the same file system, RUNS times each, alternating, page cache
#     dropped before every read (both mounts' own block caches warm).
# The file system: sqlite3 metadata and local-file objects under a temporary directory.
# Needs root and juicefs (scripts/test.sh puts it in .venv/bin).
#
#   bench/juicefs.sh [OPS] [RUNS]        (defaults 200, 5)
set -euo pipefail
cd "$(dirname "$0")/.."
ops=${1:-200}
runs=${2:-5}
juicefs=${LANES_JUICEFS:-$PWD/.venv/bin/juicefs}
cargo build --release --locked --quiet
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  # The FUSE processes outlive their plugins by design: stop them, then their mounts.
  pkill -f "juicefs --no-agent.*mount.*$work" 2>/dev/null || true
  sleep 0.5
  awk -v w="$work" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rmdir /sys/fs/cgroup/lanes.fuse/*-* /sys/fs/cgroup/unified/lanes.fuse/*-* 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/config.yaml" <<EOF
profiles:
  local: {lane: local, default: true}
  juicefs:
    lane: shared-rwx
    juicefs:
      meta_url: sqlite3://$work/fs/meta.db
      storage: file
      bucket: $work/fs/objects/
      format: true
      cache_size: 4Gi
      binary: $juicefs
EOF

start() { # start NAME: a standalone plugin with its own data dir
  LANES_LOG=warn target/release/lanes standalone --config "$work/config.yaml" \
    --data-dir "$work/$1" --node-id "$1" --endpoint "$work/$1.sock" &
  pids+=($!)
  for _ in $(seq 200); do [ -S "$work/$1.sock" ] && break; sleep 0.05; done
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r), $("$juicefs" version)"
start node1
L1="target/release/lanes csi --endpoint $work/node1.sock"
$L1 create-volume warmup --capacity 1Gi --param profile=juicefs >/dev/null   # mounts the file system

echo "== 1. publish latency, file system already mounted ($ops volumes, sequential)"
for profile in local juicefs; do
  echo "-- profile $profile"
  $L1 bench --ops "$ops" --concurrency 1 --workdir "$work/bench-$profile" --profile "$profile" \
    | grep -v "^rss"
done

echo "== 2. first publish on a node without the mount ($runs nodes)"
firsts=()
for i in $(seq "$runs"); do
  $L1 create-volume "first-$i" --capacity 1Gi --param profile=juicefs >/dev/null
  start "node-first-$i"
  L="target/release/lanes csi --endpoint $work/node-first-$i.sock"
  t0=$(date +%s%N)
  $L publish "shared-rwx/juicefs/first-$i" "$work/pod-first-$i" --access rwx \
    --staging "$work/stage-first-$i" >/dev/null
  firsts+=($(( ($(date +%s%N) - t0) / 1000000 )))
done
echo "first publish ms: ${firsts[*]}  median $(printf '%s\n' "${firsts[@]}" | median)"

echo "== 3. sequential read of 1 GiB: Lanes-published volume vs plain juicefs mount ($runs runs each)"
$L1 create-volume readbench --capacity 2Gi --param profile=juicefs >/dev/null
$L1 publish shared-rwx/juicefs/readbench "$work/pod-read" --access rwx --staging "$work/stage-read" >/dev/null
dd if=/dev/urandom of="$work/pod-read/big" bs=4M count=256 status=none conv=fsync
mkdir -p "$work/plain"
"$juicefs" --no-agent mount -d "sqlite3://$work/fs/meta.db" "$work/plain" \
  --cache-dir "$work/plain-cache" --cache-size 4096 --no-usage-report --log "$work/plain.log" >/dev/null 2>&1
plain_file="$work/plain/volumes/readbench/data/big"
read_mibs() { # read_mibs FILE: MiB/s of one cold-page-cache sequential read
  sync; echo 3 > /proc/sys/vm/drop_caches
  local t0 t1; t0=$(date +%s%N)
  dd if="$1" of=/dev/null bs=4M status=none
  t1=$(date +%s%N)
  echo $(( 1024 * 1000000000 / (t1 - t0) ))
}
read_mibs "$work/pod-read/big" >/dev/null; read_mibs "$plain_file" >/dev/null   # warm both block caches
lanes=(); plain=()
for _ in $(seq "$runs"); do
  lanes+=($(read_mibs "$work/pod-read/big"))
  plain+=($(read_mibs "$plain_file"))
done
ml=$(printf '%s\n' "${lanes[@]}" | median); mp=$(printf '%s\n' "${plain[@]}" | median)
echo "lanes-published MiB/s: ${lanes[*]}  median $ml"
echo "plain juicefs   MiB/s: ${plain[*]}  median $mp"
awk -v a="$ml" -v b="$mp" 'BEGIN {printf "ratio lanes/plain: %.2f\n", a / b}'
