# A stand-in for Docker Hub's `rust:<version>-bookworm`, for machines that cannot pull it
# (docker/smoke.sh builds it). It starts from the locally made `debian:bookworm-slim`, adds
# what rust:*-bookworm has and the build needs (C toolchain, make, perl, pkg-config, zlib
# headers, CA certificates), and the Rust toolchain copied from the machine running the script
# (the build context's toolchain/ folder). Extra CA certificates (certs/) are trusted too, for
# machines whose HTTPS goes through an inspecting proxy.
ARG DEBIAN=bookworm
FROM debian:${DEBIAN}-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential make perl pkg-config zlib1g-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY toolchain/ /usr/local/rust/
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p "$CARGO_HOME/bin" && rustc --version && cargo --version
