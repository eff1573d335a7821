# bus: build with the official Rust image, run on Debian slim as a non-root user.
#
#   docker build -t bus .
#   docker run -p 2021:2021 -v bus-data:/data bus
#
# Settings are BUS_* environment variables (see README.md); the defaults below match it.

FROM rust:1.89-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that a change to the sources does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY build.rs ./
COPY src ./src
# The commit `bus_build_info` reports (.git is not sent to the build):
#   docker build --build-arg BUS_COMMIT=$(git rev-parse --short=12 HEAD) -t bus .
ARG BUS_COMMIT=unknown
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin bus \
    && strip target/release/bus

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin bus \
    && mkdir -p /data \
    && chown bus:bus /data
COPY --from=build /src/target/release/bus /usr/local/bin/bus
# The public certificate authorities (the build image's bundle; no openssl needed), so
# that the health check and the client tools verify a publicly issued certificate.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
USER 10001:10001
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
