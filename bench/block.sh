#!/usr/bin/env bash
# Benchmark of the fast-rwo lane: fio sequential read/write (1 MiB blocks) and random 4 KiB
# read IOPS on a Lanes volume (xfs on a loop device over a disk image) against a file on the
# filesystem that holds the images, in the same run, direct I/O on both sides (no page cache);
# and the time from CreateVolume to a usable mount for a 10 GiB xfs volume. Medians of RUNS.
# Needs root (loop devices, mounts) and fio (installed with apt-get when missing).
#
#   bench/block.sh [RUNS] [SIZE_MIB]      (defaults 3 and 1024)
#   LANES_BENCH_DIR=/mnt/xfs bench/block.sh   (work under another filesystem, e.g. xfs with
#                                             reflink, where snapshots are O(1))
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
size=${2:-1024}
command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio >/dev/null; }
cargo build --release --locked --quiet
work=$(mktemp -d "${LANES_BENCH_DIR:-/var/tmp}/lanes-bench-block.XXXXXX")
data="$work/data"
L="target/release/lanes --data-dir $data csi"
cleanup() {
  for m in $(awk -v w="$work" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for d in $(losetup -a | grep -F "$work/" | cut -d: -f1); do losetup -d "$d" || true; done
  rm -rf "$work"
}
trap cleanup EXIT
cat > "$work/config.yaml" <<'YAML'
profiles:
  fast: {lane: fast-rwo, default: true, block: {fs_type: xfs, provisioning: thick}}
YAML
LANES_LOG=error target/release/lanes standalone --config "$work/config.yaml" --data-dir "$data" \
  --node-id bench &
pid=$!
for _ in $(seq 100); do [ -S "$data/csi.sock" ] && break; sleep 0.05; done
mkdir -p "$work/pods" "$work/host"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r);" \
  "images on $(df --output=fstype "$work" | tail -1) ($(df --output=source "$work" | tail -1))"

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
now_ms() { date +%s%3N; }

# Provision + first publish of a 10 GiB xfs volume (create, fallocate, attach, mkfs, mount);
# then a snapshot of it holding 512 MiB of data, taken while mounted.
provision=()
snapshot=()
for i in $(seq "$runs"); do
  start=$(now_ms)
  $L create-volume "big$i" --capacity 10Gi >/dev/null
  $L publish "fast-rwo/big$i" "$work/pods/big$i" >/dev/null
  provision+=($(( $(now_ms) - start )))
  dd if=/dev/urandom of="$work/pods/big$i/data" bs=1M count=512 oflag=direct status=none
  start=$(now_ms)
  $L snapshot "fast-rwo/big$i" "snap$i" >/dev/null
  snapshot+=($(( $(now_ms) - start )))
  $L delete-snapshot "fast-rwo@snap$i" >/dev/null
  $L unpublish "fast-rwo/big$i" "$work/pods/big$i" >/dev/null
  $L delete-volume "fast-rwo/big$i" >/dev/null
done
reflink=no
cp --reflink=always "$work/config.yaml" "$work/reflink-probe" 2>/dev/null && reflink=yes

# fio on the volume and on the host filesystem, alternating, same job files.
$L create-volume fio --capacity "$((size * 2))Mi" >/dev/null
$L publish fast-rwo/fio "$work/pods/fio" >/dev/null
job() { # DIR NAME RW BS -> bandwidth MiB/s or IOPS
  local out
  out=$(fio --name="$2" --directory="$1" --filename=fio.dat --size="${size}M" --rw="$3" \
    --bs="$4" --direct=1 --ioengine=libaio --iodepth=16 --runtime=10 --time_based \
    --output-format=json 2>/dev/null)
  python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; k="read" if j["read"]["io_bytes"] else "write"; print(round(j[k]["bw"]/1024,1) if sys.argv[1]=="bw" else round(j[k]["iops"]))' \
    "$5" <<<"$out"
}
declare -A results
for i in $(seq "$runs"); do
  for side in lanes host; do
    dir="$work/pods/fio"; [ "$side" = host ] && dir="$work/host"
    results[$side-write]+="$(job "$dir" w write 1M bw) "
    results[$side-read]+="$(job "$dir" r read 1M bw) "
    results[$side-rand]+="$(job "$dir" rr randread 4k iops) "
  done
done
$L unpublish fast-rwo/fio "$work/pods/fio" >/dev/null
$L delete-volume fast-rwo/fio >/dev/null

m() { tr ' ' '\n' <<<"${results[$1]}" | grep . | median; }
printf '%-44s %10s %10s %8s\n' "median of $runs" lanes host ratio
for case in write read rand; do
  unit="MiB/s"; [ "$case" = rand ] && unit="IOPS"
  a=$(m "lanes-$case"); b=$(m "host-$case")
  printf '%-44s %10s %10s %8.2f\n' "fio $case ($unit)" "$a" "$b" "$(echo "$a / $b" | bc -l)"
done
printf '%-44s %10s ms\n' "10 GiB xfs volume: create + first publish" \
  "$(printf '%s\n' "${provision[@]}" | median)"
printf '%-44s %10s ms   (reflink on the data dir: %s)\n' "snapshot of it, 512 MiB written" \
  "$(printf '%s\n' "${snapshot[@]}" | median)" "$reflink"
