#!/usr/bin/env bash
# Benchmark: push and pull the same generated datasets (1,000 files of 1 MiB; 8 files of
# 128 MiB) against one loopback S3 server (moto) with `lanes dataset`, `s5cmd` and
# `aws s3 sync`, in one run. Reports median seconds and the ratios lanes/s5cmd and
# lanes/awscli; also the re-push of an unchanged tree. Installs moto, s5cmd and awscli into
# .venv when missing.
#
#   bench/dataset.sh [RUNS]                  (default 3; moto)
#   S3_SERVER=s3s bench/dataset.sh [RUNS]    (the same against s3s-fs)
#   LANES_BIN=/path/to/lanes bench/dataset.sh   (measure another build of lanes)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
work_name=lanes-bench-ds
. bench/s3-peers.sh

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; S3: $server on loopback"
echo "generating trees in $work ..."
python3 - "$work" <<'PY'
import os, random, sys
work = sys.argv[1]
rng = random.Random(7)
os.makedirs(f"{work}/small", exist_ok=True)
os.makedirs(f"{work}/large", exist_ok=True)
for i in range(1000):
    with open(f"{work}/small/f{i:04}", "wb") as out:
        out.write(rng.randbytes(1 << 20))
for i in range(8):
    with open(f"{work}/large/f{i}", "wb") as out:
        for _ in range(128):
            out.write(os.urandom(1 << 20))
PY


for run in $(seq "$runs"); do
  for tree in small large; do
    prefix=r$run-$tree
    cat > "$work/lanes.yaml" <<YAML
datasets:
  buckets:
    b: {dataset_path: "s3://bench/$prefix-lanes", region: us-east-1, endpoint: "$endpoint"}
YAML
    L() { "$lanes" --data-dir "$work/data" --config "$work/lanes.yaml" dataset "$@"; }
    L create ds >/dev/null 2>&1
    t "$tree.lanes-push"   L push "$work/$tree" ds
    t "$tree.lanes-repush" L push "$work/$tree" ds
    t "$tree.s5cmd-push"   s5 cp "$work/$tree/*" "s3://bench/$prefix-s5/"
    t "$tree.aws-push"     aws s3 sync --quiet "$work/$tree" "s3://bench/$prefix-aws/"
    t "$tree.lanes-pull"   L pull ds "$work/out-lanes-$prefix"
    t "$tree.s5cmd-pull"   s5 cp "s3://bench/$prefix-s5/*" "$work/out-s5-$prefix/"
    t "$tree.aws-pull"     aws s3 sync --quiet "s3://bench/$prefix-aws/" "$work/out-aws-$prefix"
    diff -rq "$work/$tree" "$work/out-lanes-$prefix" >/dev/null || { echo "lanes pull differs from the source" >&2; exit 1; }
    rm -rf "$work"/out-*
  done
done

printf '\n%-6s %-8s %9s %9s %9s %12s %12s\n' tree op lanes s5cmd awscli lanes/s5cmd lanes/awscli
for tree in small large; do
  for op in push pull; do
    l=$(median "$tree.lanes-$op"); s=$(median "$tree.s5cmd-$op"); a=$(median "$tree.aws-$op")
    printf '%-6s %-8s %8.2fs %8.2fs %8.2fs %12.2f %12.2f\n' "$tree" "$op" "$l" "$s" "$a" \
      "$(echo "$l / $s" | bc -l)" "$(echo "$l / $a" | bc -l)"
  done
  printf '%-6s %-8s %8.2fs  (%.1f%% of the first push)\n' "$tree" re-push "$(median "$tree.lanes-repush")" \
    "$(echo "100 * $(median "$tree.lanes-repush") / $(median "$tree.lanes-push")" | bc -l)"
done
echo "(lanes hashes every byte on push and verifies every byte on pull; s5cmd and aws do not)"
printf '\nS3 server CPU seconds per run (medians): when they are close to the wall times above, the\nserver is the bottleneck and no client can be much faster than the others.\n'
printf '%-6s %-8s %9s %9s %9s\n' tree op lanes s5cmd awscli
for tree in small large; do
  for op in push pull; do
    printf '%-6s %-8s %8.2fs %8.2fs %8.2fs\n' "$tree" "$op" "$(median "$tree.lanes-$op" server)" \
      "$(median "$tree.s5cmd-$op" server)" "$(median "$tree.aws-$op" server)"
  done
done
