# Agora's container image: the `agora` binary (entrypoint) and nats-server, on Debian bookworm-slim,
# running as the unprivileged user agora (uid/gid 10001), data in the volume /var/lib/agora.
#
#   docker build -t agora .
#   docker run --rm -p 4222:4222 -p 9464:9464 -v agora-data:/var/lib/agora agora
#       a node with its own nats-server and the seed markets: NATS on localhost:4222 for clients,
#       /metrics, /health, /ready on localhost:9464
#   docker run --rm agora node --nats-url nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222
#       a node of a cluster (AGORA_STREAMS__REPLICAS=3, AGORA_NODE_ID=... as environment)
#   docker run --rm -e AGORA_HISTORY__DATABASE=postgres://... -e AGORA_HISTORY__HTTP_PORT=9465 \
#       agora history --nats-url nats://...
#       the history store; the healthcheck follows AGORA_HISTORY__HTTP_PORT when it is set
#   docker run --rm agora order place --market BTC-USDC ... (every `agora` command works)
#
# Build arguments:
#   BINARIES=build (default): agora is compiled from this checkout in RUST_IMAGE, nats-server
#     copied from NATS_IMAGE (the official image, whose binary is /nats-server).
#   BINARIES=prebuilt: both come from prebuilt/agora and prebuilt/nats-server in the build
#     context instead, for a machine that can pull no image (scripts/image.sh does this: it builds
#     agora on the host, which must have the runtime's glibc or an older one). The runtime stage
#     is the same either way.
#   RUST_IMAGE, NATS_IMAGE, RUNTIME_IMAGE: the images of the stages (a registry mirror, or a
#     base image made locally, as scripts/image.sh does with debootstrap).
#   AGORA_COMMIT: the commit `agora --version` reports (the build context has no .git).
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG NATS_IMAGE=docker.io/library/nats:2.15.1
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim
ARG BINARIES=build

FROM ${RUST_IMAGE} AS compile
ARG AGORA_COMMIT=""
WORKDIR /src
COPY . .
RUN AGORA_COMMIT="${AGORA_COMMIT}" cargo build --release --locked --bin agora \
    && mkdir -p /out && objcopy --strip-debug target/release/agora /out/agora

FROM ${NATS_IMAGE} AS nats

FROM scratch AS binaries-build
COPY --from=compile /out/agora /agora
COPY --from=nats /nats-server /nats-server

FROM scratch AS binaries-prebuilt
COPY prebuilt/agora /agora
COPY prebuilt/nats-server /nats-server

FROM binaries-${BINARIES} AS binaries

FROM ${RUNTIME_IMAGE}
RUN groupadd --system --gid 10001 agora \
    && useradd --system --uid 10001 --gid agora --home-dir /var/lib/agora --no-create-home \
       --shell /usr/sbin/nologin agora \
    && mkdir -p /var/lib/agora && chown agora:agora /var/lib/agora
COPY --from=binaries /agora /usr/local/bin/agora
COPY --from=binaries /nats-server /usr/local/bin/nats-server
# The data dir (node id, the embedded nats-server's JetStream store, the history's SQLite file);
# the HTTP port on (/metrics, /health, /ready); the embedded nats-server on every interface of
# the container, so that publishing port 4222 reaches it (it has no users: publish it only where
# clients may trade). A node given --nats-url starts no server.
ENV AGORA_DATA_DIR=/var/lib/agora \
    AGORA_HTTP_PORT=9464 \
    AGORA_EMBEDDED_NATS__ADDR=0.0.0.0
VOLUME /var/lib/agora
WORKDIR /var/lib/agora
EXPOSE 4222 9464
USER agora:agora
# Liveness (/health) on the process's HTTP port, with bash alone (the slim image has no curl).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${AGORA_HISTORY__HTTP_PORT:-${AGORA_HTTP_PORT:-9464}} && printf 'GET /health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["agora"]
CMD ["node"]
