# bus: a static (musl) binary on distroless/static, run as its non-root user (uid 65532).
#
#   docker build -t bus .
#   docker run -p 2021:2021 -v bus-data:/data bus
#
# The final image holds the binary, the public certificate authorities, time zones and
# /data: no shell, no package manager (about 20 MB). Client tools run with
# `docker exec <container> bus …`. Settings are BUS_* environment variables (see
# README.md); the defaults below match it. `.ci/run` runs what the image runs, without a
# Docker engine (deploy/check-image-root.sh).
#
# Why musl and distroless/static: the binary needs nothing from the system but its CA
# bundle, so a static binary runs on the smallest base that has one. musl's own malloc
# is slow for a server, so musl builds take jemalloc (Cargo.toml; BENCHMARKS.md, "A static
# (musl) binary and its allocator"): as fast as the glibc build, and as lean.
#
# Base images are pinned by version and by digest (each digest as found in at least two
# public Dockerfiles; no Docker engine was at hand to pull them). To move to a newer
# image: `docker buildx imagetools inspect <image>:<tag>` prints the digest of its
# multi-platform index, which goes after the `@`.

FROM rust:1.95.0-slim-bookworm@sha256:d7482085ff5b415f84dba5647ae71606650bdef00db7aeb69f4b3d170c3e4082 AS build
# ring (TLS) and jemalloc (the musl build's allocator) compile C, with the musl C
# compiler (Debian's musl-tools); jemalloc's build runs make. The target is the
# platform's own, so that `docker buildx build --platform linux/arm64` builds too.
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
# Dependencies first, so that a change to the sources does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --target "$(uname -m)-unknown-linux-musl" \
    && rm -rf src
COPY build.rs ./
COPY src ./src
# The commit `bus_build_info` reports (.git is not sent to the build):
#   docker build --build-arg BUS_COMMIT=$(git rev-parse --short=12 HEAD) -t bus .
ARG BUS_COMMIT=unknown
# /data is made here, to be copied owned by the runtime user: the final image has no
# shell to make it with.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --target "$(uname -m)-unknown-linux-musl" --bin bus \
    && strip -o /bus "target/$(uname -m)-unknown-linux-musl/release/bus" \
    && mkdir /data

# distroless/static rather than scratch: the same few megabytes, plus the CA bundle,
# time zones and /etc/passwd entries for its `nonroot` user (65532), kept up to date by
# its maintainers instead of copied from the build stage.
FROM gcr.io/distroless/static-debian12:nonroot@sha256:afa5c872c891853ca7fcf1f12c3edb23f7eeef36189728842dd51042ff57f7ab
COPY --from=build /bus /usr/local/bin/bus
COPY --from=build --chown=65532:65532 /data /data
USER 65532:65532
WORKDIR /data
# BUS_HOST is where the client tools (`docker exec <container> bus get …`) go.
ENV BUS_ADDR=0.0.0.0:2021 \
    BUS_PATH=/data \
    BUS_NAMESPACES=app,orders \
    BUS_FSYNC=always \
    BUS_LOG_LEVEL=INFO \
    BUS_HOST=http://127.0.0.1:2021
EXPOSE 2021
VOLUME ["/data"]
STOPSIGNAL SIGTERM
# Readiness (GET /readyz) of the server in this container, found from its own settings:
# BUS_ADDR (on the loopback address), and with BUS_TLS_CERT over HTTPS, verifying the
# certificate for a name it holds; a private CA's certificate goes in BUS_CA_CERT.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["bus", "health"]
ENTRYPOINT ["bus"]
CMD ["server"]
# OCI annotations, last: a new commit or date changes no layer above. BUS_VERSION follows
# Cargo.toml's version (.ci/run checks it); a release build passes
#   --build-arg BUS_COMMIT=$(git rev-parse HEAD) --build-arg BUS_CREATED=$(date -u +%FT%TZ)
#   --build-arg BUS_SOURCE=<the repository's URL>
# (left empty when not given: the crate names no repository yet, and BUS_CREATED is an
# RFC 3339 time or nothing).
ARG BUS_VERSION=0.1.0
ARG BUS_COMMIT=unknown
ARG BUS_CREATED=
ARG BUS_SOURCE=
LABEL org.opencontainers.image.title="bus" \
      org.opencontainers.image.description="A persistent message bus over HTTP and Server-Sent Events, compatible with ella.to/bus" \
      org.opencontainers.image.source="${BUS_SOURCE}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${BUS_VERSION}" \
      org.opencontainers.image.revision="${BUS_COMMIT}" \
      org.opencontainers.image.created="${BUS_CREATED}"
