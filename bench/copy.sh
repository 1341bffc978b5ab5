#!/usr/bin/env bash
# Benchmark: `lanes copy` against rsync and cp on the same generated trees, in one run.
#
#   bench/copy.sh [RUNS]                      (default 3; medians are reported)
#   TREES="tiny huge" bench/copy.sh [RUNS]    (only these trees)
#   LANES_BIN=/path/to/lanes bench/copy.sh    (time that build, not this tree's)
#
# Trees: small = 10,000 files of 100 KiB; large = 8 files of 256 MiB; tiny = 100,000 files
# of 1-8 KiB, four directory levels deep; huge = one 4 GiB file (random bytes). Page cache
# is dropped before each timed run. Also the peak RSS of lanes and rsync on the tiny tree.
# Every tool copies into a new ext4 filesystem of its own each run (a loop image beside the
# trees), so no tool pays for another's files or deletes: on one shared filesystem, removing
# the previous runs' 400,000 tiny files slowed whichever tool ran next.
# Installs rsync when it is missing. Needs root (drop_caches, mount).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
trees=${TREES:-small large tiny huge}
for tool in rsync bc; do
  command -v $tool >/dev/null || { apt-get update -qq && apt-get install -y -qq $tool >/dev/null; }
done
# LANES_BIN=PATH times that binary instead of building this tree (to compare two builds).
if [ -z "${LANES_BIN:-}" ]; then cargo build --release --locked --quiet; fi
lanes=${LANES_BIN:-$PWD/target/release/lanes}
work=$(mktemp -d /var/tmp/lanes-bench-copy.XXXXXX)
unmount_all() { for m in "$work"/dst-*; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done; true; }
trap 'unmount_all; rm -rf "$work"' EXIT

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(df -h "$work" | awk 'NR==2{print $1" "$2}')"
echo "generating trees in $work ..."
mkdir -p "$work/small" "$work/large" "$work/tiny" "$work/huge"
python3 - "$work" "$trees" <<'PY'
import os, random, sys
work, trees = sys.argv[1], sys.argv[2].split()
rng = random.Random(42)
if "tiny" in trees:
    # 100,000 files in 10 x 10 x 10 x 10 directories (four levels), 1-8 KiB each.
    for i in range(100_000):
        d = f"{work}/tiny/a{i // 10000 % 10}/b{i // 1000 % 10}/c{i // 100 % 10}/d{i // 10 % 10}"
        if i % 10 == 0:
            os.makedirs(d, exist_ok=True)
        with open(f"{d}/f{i}", "wb") as out:
            out.write(rng.randbytes(rng.randint(1024, 8192)))
if "huge" in trees:
    with open(f"{work}/huge/shard", "wb") as out:
        for _ in range(4096):
            out.write(os.urandom(1 << 20))
for d in range(100 if "small" in trees else 0):
    os.makedirs(f"{work}/small/d{d:03}", exist_ok=True)
    for f in range(100):
        with open(f"{work}/small/d{d:03}/f{f:03}", "wb") as out:
            out.write(rng.randbytes(100 * 1024))
for f in range(8 if "large" in trees else 0):
    with open(f"{work}/large/f{f}", "wb") as out:
        for _ in range(256):
            out.write(os.urandom(1 << 20))
PY

drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
# t NAME CMD...: runs CMD once, cold cache, appends seconds to $work/NAME.times
t() {
  local name=$1; shift
  drop
  local start end
  start=$(date +%s.%N); "$@" >/dev/null 2>&1; end=$(date +%s.%N)
  echo "$end - $start" | bc >> "$work/$name.times"
}
median() { sort -n "$work/$1.times" | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# fresh TREE TOOL...: a new empty ext4 at $work/dst-TOOL for each TOOL; the copies go to
# $work/dst-TOOL/out, which does not exist yet.
fresh() {
  local tree=$1 size inode_ratio=16384; shift
  size=$(( $(du -sb "$work/$tree" | cut -f1) * 13 / 10 + (512 << 20) ))
  [ "$tree" = tiny ] && inode_ratio=4096  # 100,000 files need more inodes than the default
  for tool in "$@"; do
    mountpoint -q "$work/dst-$tool" 2>/dev/null && umount "$work/dst-$tool"
    rm -f "$work/img-$tool"; truncate -s "$size" "$work/img-$tool"
    mkfs.ext4 -q -F -i "$inode_ratio" -E lazy_itable_init=0,lazy_journal_init=0 "$work/img-$tool"
    mkdir -p "$work/dst-$tool"; mount -o loop "$work/img-$tool" "$work/dst-$tool"
  done
}
for tree in $trees; do
  for run in $(seq "$runs"); do
    fresh "$tree" cp rsync lanes
    t "$tree.cp"            cp -a "$work/$tree" "$work/dst-cp/out"
    t "$tree.rsync"         rsync -a "$work/$tree/" "$work/dst-rsync/out/"
    t "$tree.lanes"         "$lanes" copy "$work/$tree" "$work/dst-lanes/out" --json
    t "$tree.rsync-rerun"   rsync -a "$work/$tree/" "$work/dst-rsync/out/"
    t "$tree.lanes-rerun"   "$lanes" copy "$work/$tree" "$work/dst-lanes/out" --json
    diff -r "$work/$tree" "$work/dst-lanes/out" >/dev/null || { echo "lanes copy differs from $tree" >&2; exit 1; }
    fresh "$tree" rsync lanes
    t "$tree.rsync-sum"     rsync -a --checksum "$work/$tree/" "$work/dst-rsync/out/"
    t "$tree.lanes-sha"     "$lanes" copy "$work/$tree" "$work/dst-lanes/out" --checksum sha256 --json
    t "$tree.rsync-sum-rerun" rsync -a --checksum "$work/$tree/" "$work/dst-rsync/out/"
    t "$tree.lanes-sha-rerun" "$lanes" copy "$work/$tree" "$work/dst-lanes/out" --checksum sha256 --json
  done
  unmount_all
  rm -f "$work"/img-*
done
if [[ " $trees " == *" large "* ]]; then
  for f in $(seq 3); do t sha.openssl openssl dgst -sha256 "$work/large/f0"; done
  for f in $(seq 3); do t sha.lanes "$lanes" copy "$work/large" "$work/dst-sha-$f" --checksum sha256 --jobs 1 --json; rm -rf "$work/dst-sha-$f"; done
fi
if [[ " $trees " == *" tiny "* ]]; then
  command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
  peak() { drop; /usr/bin/time -v "$@" 2>&1 >/dev/null | awk '/Maximum resident/ {printf "%.0f", $6 / 1024}'; }
  fresh tiny rss-lanes rss-rsync
  rss_lanes=$(peak "$lanes" copy "$work/tiny" "$work/dst-rss-lanes/out" --json)
  rss_rsync=$(peak rsync -a "$work/tiny/" "$work/dst-rss-rsync/out/")
  unmount_all
  rm -f "$work"/img-*
fi

printf '\n%-8s %-34s %9s %9s %7s\n' tree case lanes peer ratio
row() { # tree label lanes-key peer-key
  local l p; l=$(median "$1.$3"); p=$(median "$1.$4")
  printf '%-8s %-34s %8.2fs %8.2fs %7.2f\n' "$1" "$2" "$l" "$p" "$(echo "$l / $p" | bc -l)"
}
for tree in $trees; do
  row $tree "first copy vs rsync -a"            lanes rsync
  row $tree "first copy vs cp -a"               lanes cp
  row $tree "unchanged re-run vs rsync -a"      lanes-rerun rsync-rerun
  row $tree "sha256 first vs rsync --checksum"  lanes-sha rsync-sum
  row $tree "sha256 re-run vs rsync --checksum" lanes-sha-rerun rsync-sum-rerun
done
echo
if [ -f "$work/sha.lanes.times" ]; then
  echo "SHA-256, one 256 MiB file, cold cache: openssl $(median sha.openssl)s;" \
       "lanes copy --checksum sha256 --jobs 1 of 8 x 256 MiB: $(median sha.lanes)s" \
       "($(echo "2048 / $(median sha.lanes)" | bc) MiB/s incl. write + read-back verify)"
fi
if [ -n "${rss_lanes:-}" ]; then
  echo "peak RSS, first copy of the tiny tree: lanes ${rss_lanes} MiB, rsync -a ${rss_rsync} MiB (rsync: its largest process)"
fi
echo "(ratio = lanes / peer; below 1.0 means lanes is faster)"
