# Build stage: the toolchain Lanes is pinned to; no system protoc is needed (protox).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
RUN cargo build --release --locked --bin lanes

# Runtime: what the code runs (tests/deploy.rs checks every program it executes is here):
# mount tools, mkfs/grow for fast-rwo volumes, XFS quotas, git (and ssh for git+ssh sources).
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates mount util-linux xfsprogs e2fsprogs git openssh-client \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/lanes /usr/local/bin/lanes
ENTRYPOINT ["/usr/local/bin/lanes"]
