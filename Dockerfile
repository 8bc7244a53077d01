# twill: one image carrying twilld, twill-policy and the CNI plugin, for kube-flannel.yml.
#
# Reproducible: base images pinned by exact version tag (pin digests too when you build with
# registry access: docker buildx imagetools inspect <image>), dependencies from Cargo.lock
# (--locked). The build fetches Debian packages and crates and nothing else. Without a registry,
# scripts/image-build.sh makes local stand-ins for the two base images and builds this file as
# it is.

FROM docker.io/library/rust:1.95.0-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler=3.21.12-3+deb12u1 libprotobuf-dev=3.21.12-3+deb12u1 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cargo's registry and target directory are build cache mounts: a rebuild after a source change
# compiles what changed, as cargo does outside a container, instead of every dependency again
# (a first build, as in CI, starts with them empty). The binaries are copied out of the mount.
# COPY keeps the files' modification times, and cargo judges the workspace's own crates fresh
# by comparing those times with its last build's outputs: a checkout older than the cached
# build (switching branches, merging) would silently give last build's binaries. So the
# workspace's files are stamped with the build's time first; dependencies, cached by version,
# are not affected.
# The CNI plugin is statically linked: install-cni.sh copies it onto the host, whose glibc may
# be older than this image's, and every pod start execs it (no dynamic loader: ~0.4 ms less
# per exec, measured with farm-bench). --target keeps build scripts and proc macros dynamic.
RUN --mount=type=cache,id=twill-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=twill-target,target=/src/target \
    find /src -path /src/target -prune -o -type f -exec touch {} + \
 && cargo build --release --locked -p twill -p twill-policy --bins \
 && triple="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -p twill-cni --bins --target "$triple" \
 && mkdir /out \
 && cp target/release/twilld target/release/twill-policy /out/ \
 && cp "target/$triple/release/twill-cni" /out/twill-cni-static \
 && strip /out/twilld /out/twill-policy /out/twill-cni-static

# The reference CNI plugins the delegate needs; kind's node image, for one, ships no bridge.
FROM docker.io/library/debian:bookworm-20251117-slim AS cni-plugins
RUN apt-get update \
 && apt-get install -y --no-install-recommends containernetworking-plugins \
 && rm -rf /var/lib/apt/lists/*

FROM docker.io/library/debian:bookworm-20251117-slim AS runtime
# nft for twilld's masquerade rules and twill-policy's table; kmod for modprobe br_netfilter;
# iptables (iptables-restore, ip6tables-restore) for twilld with EnableNFTables false, as
# Flannel's default. Debian's iptables is the nf_tables backend (xtables-nft-multi), the one
# for kernels where nftables is the native API.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables kmod iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/twilld /opt/bin/twilld
COPY --from=build /out/twill-policy /opt/bin/twill-policy
COPY --from=build /out/twill-cni-static /flannel
COPY --from=cni-plugins /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/portmap /usr/lib/cni/loopback /opt/cni/plugins/
COPY deploy/install-cni.sh /opt/bin/install-cni.sh
# Flannel's own DaemonSet runs /opt/bin/flanneld (twilld takes its flags, and nothing in twilld
# depends on the name it is started by) and, from v0.28.6 on, /opt/bin/install-conf <src> <dst>
# (install-cni.sh with two arguments does the same): a Flannel install with only its image
# changed to this one runs twill.
RUN ln -s twilld /opt/bin/flanneld && ln -s install-cni.sh /opt/bin/install-conf
ENTRYPOINT ["/opt/bin/twilld"]
