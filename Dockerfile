# syntax=docker/dockerfile:1
# voip-push-worker: release build, then a slim Debian runtime as a non-root user.
#   docker build -t voip-push-worker .
#   docker run --rm voip-push-worker --help

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src

# Dependencies first, against empty sources: this layer is rebuilt only when
# Cargo.toml or Cargo.lock change, not at every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin/voip-push-bench tests/it \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/voip-push-bench/main.rs \
    && touch src/lib.rs tests/it/main.rs \
    && cargo build --release --locked --bin voip-push-worker \
    && rm -rf src

# The real sources. `touch` makes them newer than the placeholders' build outputs,
# whatever times the build context carries. Migrations are compiled in. Only
# the worker is built: the benchmark (src/bin) runs from a checkout.
COPY src ./src
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin voip-push-worker \
    && install -D -m 0755 target/release/voip-push-worker /out/voip-push-worker

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: for amqps:// and TLS to Postgres through the system roots
# (APNs' roots are compiled in).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vpw \
    && useradd --system --uid 10001 --gid vpw --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin vpw
COPY --from=build /out/voip-push-worker /usr/local/bin/voip-push-worker
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# /metrics, /healthz, /readyz
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/voip-push-worker"]
CMD ["run"]
