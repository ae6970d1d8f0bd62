# syntax=docker/dockerfile:1
#
# Spillway's container image: the profile-guided `dist` binary (fat LTO,
# trained by scripts/pgo-build.sh: the build the core benchmarks in
# docs/benchmarks.md measure) and the default config on distroless/cc (glibc
# and libgcc, no shell, no package manager), as uid 65532. The profile-guided
# build compiles twice and runs a short training load on 127.0.0.1 inside the
# build stage; `--build-arg PGO=0` builds plain `dist` once.
#
#   docker build -t spillway:0.1.0 .
#   docker run --rm -p 8080:8080 -v "$PWD/my.yaml:/etc/spillway/spillway.yaml:ro" spillway:0.1.0
#
# Not built by this repository's CI (its machines have no Docker engine), so it
# stays deliberately plain: one build stage, one copy. The Helm chart
# (helm/spillway) runs this image; docs/kubernetes.md has the details.

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS build
ARG PGO=1
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    if [ "$PGO" = 1 ]; then \
      bash scripts/pgo-build.sh && bin=target/pgo/spillway; \
    else \
      cargo build --profile dist --locked --bin spillway && bin=target/dist/spillway; \
    fi \
 && install -D -m 0755 "$bin" /out/usr/local/bin/spillway \
 && install -D -m 0644 config/spillway.yaml /out/etc/spillway/spillway.yaml

# TLS is rustls with ring: no OpenSSL needed, glibc and libgcc (unwinding) are.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /
# Numeric, so that Kubernetes' runAsNonRoot can verify it without a runAsUser.
USER 65532:65532
ENV SPILLWAY_CONFIG=/etc/spillway/spillway.yaml
# 8080: the listener in the default config; 9901: admin (/metrics /ready /status).
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/spillway"]
CMD ["--log-format", "json", "run"]
