# syntax=docker/dockerfile:1
# The fhirmesh image: one binary that runs every service (`serve`, embedded) or one service of the
# mesh (`serve --target gateway|resource|relay|indexer|notifier|exporter|binary`).
#
#   docker build -t fhirmesh:dev .
#   docker run --rm -p 8080:8080 fhirmesh:dev serve --listen 0.0.0.0:8080
#
# Nothing is configured in the image itself (no FHIRMESH_* variables): variables win over the
# config file, so the image stays out of the way of a mounted FHIRMESH_CONFIG. In Kubernetes the
# Helm chart (helm/fhirmesh) or the manifests in deploy/k8s configure it.

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---- build -------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
# No apt packages: rust:*-slim already has gcc and libc6-dev, which the C parts need (bundled
# SQLite, mimalloc, ring, aws-lc-sys's cc builder). protoc is vendored (crates/proto/build.rs uses
# protoc-bin-vendored, a static binary), TLS is rustls (no OpenSSL).
WORKDIR /src
COPY . .
# The cache mounts keep the crates.io downloads and the build between builds (BuildKit); the
# binary is copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release -p fhirmesh --locked \
    && install -D -m 0755 target/release/fhirmesh /out/fhirmesh

# ---- run ---------------------------------------------------------------------------------------
# distroless/cc: glibc, libgcc_s, CA certificates, no shell; `nonroot` is uid/gid 65532.
FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="fhirmesh" \
      org.opencontainers.image.description="A FHIR R4 server: embedded in one process, or as a mesh of services" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/fhirmesh /fhirmesh
# `serve` keeps ./data (storage.data_dir) under the working directory when nothing else is
# configured: the runtime user's home, which it owns, so a plain `docker run` can write there.
# (In Kubernetes data_dir is /data, a mounted volume, and the root filesystem is read-only.)
WORKDIR /home/nonroot
USER 65532:65532
# 8080: FHIR HTTP API (gateway, embedded), also /healthz /readyz /metrics there
# 9470: ops port of every other target (/healthz /readyz /metrics)
# 50051 resource, 50053 exporter, 50054 binary: gRPC
EXPOSE 8080 9470 50051 50053 50054
# PID 1 is fhirmesh itself: it handles SIGTERM (stop accepting, drain, exit within
# ops.shutdown_grace_seconds), so no init process is needed.
ENTRYPOINT ["/fhirmesh"]
CMD ["serve"]
