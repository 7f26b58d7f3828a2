# The project's embedded broker (Tansu with SQLite storage, `retargetiq-broker`) as an image:
# the stand-in for Apache Kafka that docker/compose.embedded-broker.yml puts into the Compose
# stack where the apache/kafka image cannot be had (docker/smoke.sh). Not for production: one
# broker, no replication (docs/broker.md).
ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN} AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --package broker --bin retargetiq-broker \
 && cp target/release/retargetiq-broker /usr/local/bin/

FROM debian:${DEBIAN}-slim
# The data directory belongs to the broker's user, so that a new named volume mounted there
# does too.
RUN useradd --system --uid 10001 --no-create-home retargetiq \
 && mkdir -p /var/lib/kafka/data && chown retargetiq /var/lib/kafka/data
COPY --from=builder /usr/local/bin/retargetiq-broker /usr/local/bin/
USER retargetiq
ENV RETARGETIQ_DATA_DIR=/var/lib/kafka/data
EXPOSE 19092
ENTRYPOINT ["retargetiq-broker"]
