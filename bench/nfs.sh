#!/usr/bin/env bash
# Benchmark of the legacy-rwx (NFS) lane's provisioning, side by side with the approach of
# kubernetes-csi/csi-driver-nfs, against one nfs-ganesha in the same run:
#  1. Lanes: CreateVolume / DeleteVolume p50 and p99, sequential and 16 concurrent
#     (`lanes csi bench`, OPS volumes per round): one long-lived userspace NFS connection,
#     no mount per call. (Its Stage/Publish rows run on the bindfs stand-in the tests use,
#     since this kernel has no NFS client: informative only.)
#  2. The peer: csi-driver-nfs mounts the export, makes the directory and unmounts for every
#     CreateVolume. Its stand-in here is the same cycle in userspace: one `nfs-cp` (libnfs)
#     per volume — connect and mount, create an entry, unmount — sequential and 16 at once.
#     It includes a process start (~1 ms) that a kernel mount inside the driver would not.
# The server runs in a network namespace with its own veth pair (10.250.0.0/30). Needs root,
# nfs-ganesha nfs-ganesha-vfs rpcbind bindfs libnfs-utils.
#
#   bench/nfs.sh [OPS]        (default 500)
set -euo pipefail
cd "$(dirname "$0")/.."
ops=${1:-500}
cargo build --release --locked --quiet
work=$(mktemp -d)
ns=lanes-bench-nfs
addr=10.250.0.2
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  awk -v w="$work" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  ip link del lbnfs0 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/export" "$work/recovery"
printf '%s\n' \
  'NFS_CORE_PARAM { Protocols = 3, 4; }' \
  "NFSV4 { RecoveryBackend = fs; RecoveryRoot = $work/recovery; Graceless = true; }" \
  "EXPORT { Export_Id = 1; Path = $work/export; Pseudo = $work/export; Access_Type = RW;" \
  '  Squash = No_Root_Squash; SecType = sys; Protocols = 3, 4; Transports = TCP; FSAL { Name = VFS; } }' \
  'LOG { Default_Log_Level = WARN; }' > "$work/ganesha.conf"
ip netns del "$ns" 2>/dev/null || true
ip link del lbnfs0 2>/dev/null || true
ip netns add "$ns"
ip link add lbnfs0 type veth peer name lbnfs1
ip link set lbnfs1 netns "$ns"
ip addr add 10.250.0.1/30 dev lbnfs0
ip link set lbnfs0 up
ip netns exec "$ns" ip addr add "$addr/30" dev lbnfs1
ip netns exec "$ns" ip link set lbnfs1 up
ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" unshare -m sh -c "mount -t tmpfs tmpfs /run && mkdir -p /run/rpcbind && rpcbind -w -f & \
  sleep 0.2; exec ganesha.nfsd -F -f $work/ganesha.conf -L $work/ganesha.log -p $work/ganesha.pid -N NIV_WARN" \
  >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 200); do (exec 3<>"/dev/tcp/$addr/2049") 2>/dev/null && break; sleep 0.05; done

# The node's mount helper: bindfs of the exported directory (no kernel NFS client here).
printf '%s\n' '#!/bin/sh' 'while [ $# -gt 2 ]; do shift; done' 'exec bindfs "${1#*:}" "$2"' \
  > "$work/standin.sh"
chmod +x "$work/standin.sh"
printf '%s\n' 'profiles:' '  nfs:' '    lane: legacy-rwx' '    default: true' \
  "    nfs: {server: $addr, export: $work/export, mount_command: [$work/standin.sh]}" \
  > "$work/config.yaml"
LANES_LOG=warn target/release/lanes standalone --config "$work/config.yaml" \
  --data-dir "$work/data" --node-id bench --endpoint "$work/csi.sock" &
pids+=($!)
for _ in $(seq 200); do [ -S "$work/csi.sock" ] && break; sleep 0.05; done

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r), nfs-ganesha $(dpkg-query -W -f '${Version}' nfs-ganesha)"
echo "== 1. Lanes: CreateVolume / DeleteVolume over one userspace connection ($ops volumes per round)"
target/release/lanes csi --endpoint "$work/csi.sock" bench --ops "$ops" --concurrency 1 \
  --concurrency 16 --workdir "$work/bench" --profile nfs | grep -v "^rss"

echo "== 2. Peer: mount + create + unmount per volume (nfs-cp, libnfs) ($ops volumes per round)"
: > "$work/empty"
peer() { # peer NAME: microseconds of one mount + create + unmount cycle
  local t0
  t0=$(date +%s%N)
  nfs-cp "$work/empty" "nfs://$addr$work/export/peer-$1?version=4" >/dev/null
  echo $(( ($(date +%s%N) - t0) / 1000 ))
}
export -f peer
export work addr
percentiles() {
  sort -n | awk '{a[NR]=$1} END {printf "p50 %.3f ms  p99 %.3f ms\n", a[int((NR-1)*0.50)+1]/1000, a[int((NR-1)*0.99)+1]/1000}'
}
echo "-- sequential:    $(seq "$ops" | xargs -I{} bash -c 'peer s{}' | percentiles)"
echo "-- 16 concurrent: $(seq "$ops" | xargs -P16 -I{} bash -c 'peer c{}' | percentiles)"
