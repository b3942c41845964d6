# syntax=docker/dockerfile:1
# Multi-stage: build every calsync binary once, ship them in a small non-root runtime image.
#
# `docker build .` compiles in the `build` stage. With binaries already built on the host,
# `--build-arg BINARIES=prebuilt` takes them from the build context's target/release instead; the
# runtime stage is the same either way. The repository's .dockerignore leaves target/ out (it would
# send gigabytes), so that context is a folder holding just target/release/<the four binaries>:
# scripts/compose-check makes one, on machines with no Rust image.
ARG BINARIES=build

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && cp target/release/calsync-ingest target/release/calsync-worker target/release/calendly-sim target/release/calsync-demo /out/

FROM scratch AS prebuilt
COPY target/release/calsync-ingest target/release/calsync-worker target/release/calendly-sim target/release/calsync-demo /out/

FROM ${BINARIES} AS binaries

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home calsync
COPY --from=binaries /out/ /usr/local/bin/
USER calsync
ENV LOG_FORMAT=json
EXPOSE 8080 9090 7070
CMD ["calsync-ingest"]
