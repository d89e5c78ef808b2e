# The kubeha-agent image. Build from the repository root:
#
#   docker build -f images/agent.Dockerfile -t kubeha/kubeha-agent:0.1.0 .
#   buildah bud --ignorefile images/agent.Dockerfile.dockerignore \
#     -f images/agent.Dockerfile -t kubeha/kubeha-agent:0.1.0 .
#
# Same two stages as images/operator.Dockerfile (read its header for how
# `cargo xtask images` replaces the `build` stage). images/rootfs.sh adds
# what the agent runs besides hooks: nft for the packet fence, and busybox
# as /bin/sh for hooks that run inside the container.
ARG RUST_VERSION=1.89

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables busybox-static \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins -p kubeha-agent
RUN sh images/rootfs.sh /rootfs agent

FROM scratch
COPY --from=build /rootfs/ /
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Root: the agent adds addresses, sends ARP and loads nftables tables, and
# hooks run as root like the init scripts they wrap.
ENTRYPOINT ["/usr/local/bin/kubeha-agent"]
