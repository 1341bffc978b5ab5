#!/usr/bin/env bash
# Benchmark: peak memory (RSS) of `lanes dataset push` and `pull` beside s5cmd doing the same
# work against one loopback S3 server, of an unchanged re-push (hash cache and latest version
# read, nothing sent), and of the node plugin during a cold publish of the
# dataset (an inline volume: the plugin fills its cache), on a generated tree of FILES small
# files and again on one of 4×FILES (memory must stay flat as the file count grows).
# Peak RSS from /usr/bin/time -v (clients) and VmHWM (the plugin), and the wall-clock seconds
# of each (a publish: from the call to a usable mount). Needs root (publish).
#
#   bench/memory.sh [FILES]                 (default 30000; moto)
#   S3_SERVER=s3s bench/memory.sh [FILES]   (a Rust S3 server: faster with many files)
#   LANES_BIN=/path/to/lanes bench/memory.sh   (measure another build of lanes)
set -euo pipefail
cd "$(dirname "$0")/.."
files=${1:-30000}
work_name=lanes-bench-mem
extra_cleanup='kill_plugin'
plugin=""
kill_plugin() {
  if [ -n "$plugin" ]; then kill "$plugin" 2>/dev/null; wait "$plugin" 2>/dev/null; fi
  umount -l "$work"/pod-* 2>/dev/null
  true
}
. bench/s3-peers.sh
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }

rss() { # CMD...: peak RSS of CMD in MiB, then its wall-clock seconds
  local start=$EPOCHREALTIME
  /usr/bin/time -v "$@" 2>"$work/time.err" >/dev/null || { cat "$work/time.err" >&2; exit 1; }
  awk -v s="$(echo "$EPOCHREALTIME - $start" | bc -l)" \
    '/Maximum resident/ {printf "%.0f %.2f\n", $6 / 1024, s}' "$work/time.err"
}
row() { # COUNT WORK LANES_MIB LANES_S [S5_MIB S5_S]
  if [ $# -eq 6 ]; then
    printf '%-8s %-14s %7sM %7sM %8.2f %8ss %8ss %8.2f\n' "$1" "$2" "$3" "$5" \
      "$(echo "$3 / $5" | bc -l)" "$4" "$6" "$(echo "$4 / $6" | bc -l)"
  else
    printf '%-8s %-14s %7sM %8s %8s %8ss %9s %8s\n' "$1" "$2" "$3" - - "$4" - -
  fi
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; S3: $server on loopback"
printf '%-8s %-14s %8s %8s %8s %9s %9s %8s\n' files work lanes s5cmd ratio lanes s5cmd ratio
for count in "$files" $((files * 4)); do
  tree="$work/tree-$count"
  python3 - "$tree" "$count" <<'PY'
import os, random, sys
root, count = sys.argv[1], int(sys.argv[2])
rng = random.Random(11)
for i in range(count):
    d = f"{root}/d{i // 300:04}"
    if i % 300 == 0:
        os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i % 300:03}", "wb") as out:
        out.write(rng.randbytes(rng.randint(1024, 8192)))
PY
  cat > "$work/lanes.yaml" <<YAML
datasets:
  buckets:
    b: {dataset_path: "s3://bench/mem-$count", region: us-east-1, endpoint: "$endpoint", mode: read-write}
cache:
  max_bytes: 20Gi
  publish_timeout_seconds: 3600
YAML
  L=("$lanes" --data-dir "$work/data-$count" --config "$work/lanes.yaml" dataset)
  "${L[@]}" create ds >/dev/null 2>&1
  read -r lp lpt < <(rss "${L[@]}" push "$tree" ds)
  # Unchanged re-push: reads the hash cache and the latest version, uploads nothing.
  read -r lr lrt < <(rss "${L[@]}" push "$tree" ds)
  read -r sp spt < <(rss .venv/bin/s5cmd --endpoint-url "$endpoint" cp "$tree/*" "s3://bench/s5-$count/")
  read -r ll llt < <(rss "${L[@]}" pull ds "$work/out-lanes-$count")
  read -r sl slt < <(rss .venv/bin/s5cmd --endpoint-url "$endpoint" cp "s3://bench/s5-$count/*" "$work/out-s5-$count/")
  diff -rq "$tree" "$work/out-lanes-$count" >/dev/null || { echo "lanes pull differs" >&2; exit 1; }
  row "$count" push "$lp" "$lpt" "$sp" "$spt"
  row "$count" pull "$ll" "$llt" "$sl" "$slt"
  row "$count" re-push "$lr" "$lrt"
  rm -rf "$work"/out-*

  # The node plugin during a cold publish: the inline volume's dataset is fetched into its
  # cache inside the plugin's process.
  "$lanes" standalone --config "$work/lanes.yaml" --data-dir "$work/node-$count" \
    --node-id bench --endpoint "$work/node-$count.sock" 2>/dev/null &
  plugin=$!
  for _ in $(seq 200); do [ -S "$work/node-$count.sock" ] && break; sleep 0.05; done
  start=$EPOCHREALTIME
  "$lanes" csi --endpoint "$work/node-$count.sock" publish "vol-$count" "$work/pod-$count" \
    --dataset b/ds --readonly >/dev/null
  took=$(printf '%.2f' "$(echo "$EPOCHREALTIME - $start" | bc -l)")
  hwm=$(awk '/VmHWM/ {printf "%.0f\n", $2 / 1024}' "/proc/$plugin/status")
  row "$count" "cold publish" "$hwm" "$took"
  [ "$(find "$work/pod-$count" -type f | wc -l)" = "$count" ] || { echo "publish incomplete" >&2; exit 1; }
  "$lanes" csi --endpoint "$work/node-$count.sock" unpublish "vol-$count" "$work/pod-$count" >/dev/null
  kill "$plugin"; wait "$plugin" 2>/dev/null || true; plugin=""
  rm -rf "$tree" "$work/node-$count" "$work/data-$count"
done
