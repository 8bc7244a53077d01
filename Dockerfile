# twill: one image carrying twilld, twill-policy and the CNI plugin, for kube-flannel.yml.
#
# Reproducible: base images pinned by exact version tag (pin digests too when you build with
# registry access: docker buildx imagetools inspect <image>), dependencies from Cargo.lock
# (--locked), no network access after the dependency fetch.

FROM docker.io/library/rust:1.95.0-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler=3.21.12-3+deb12u1 libprotobuf-dev=3.21.12-3+deb12u1 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p twill -p twill-policy --bins \
 && strip target/release/twilld target/release/twill-policy
# The CNI plugin is statically linked: install-cni.sh copies it onto the host, whose glibc may
# be older than this image's, and every pod start execs it (no dynamic loader: ~0.4 ms less
# per exec, measured with farm-bench). --target keeps build scripts and proc macros dynamic.
RUN triple="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -p twill-cni --bins --target "$triple" \
 && cp "target/$triple/release/twill-cni" target/twill-cni-static \
 && strip target/twill-cni-static

# The reference CNI plugins the delegate needs; kind's node image, for one, ships no bridge.
FROM docker.io/library/debian:bookworm-20251117-slim AS cni-plugins
RUN apt-get update \
 && apt-get install -y --no-install-recommends containernetworking-plugins \
 && rm -rf /var/lib/apt/lists/*

FROM docker.io/library/debian:bookworm-20251117-slim AS runtime
# nft for twilld's masquerade rules and twill-policy's table; kmod for modprobe br_netfilter.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables kmod \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/twilld /opt/bin/twilld
COPY --from=build /src/target/release/twill-policy /opt/bin/twill-policy
COPY --from=build /src/target/twill-cni-static /flannel
COPY --from=cni-plugins /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/portmap /usr/lib/cni/loopback /opt/cni/plugins/
COPY deploy/install-cni.sh /opt/bin/install-cni.sh
ENTRYPOINT ["/opt/bin/twilld"]
