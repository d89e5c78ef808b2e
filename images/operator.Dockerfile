# The kubeha-operator image. Build from the repository root:
#
#   docker build -f images/operator.Dockerfile -t kubeha/kubeha-operator:0.1.0 .
#   buildah bud --ignorefile images/operator.Dockerfile.dockerignore \
#     -f images/operator.Dockerfile -t kubeha/kubeha-operator:0.1.0 .
#
# Two stages. `build` compiles the binary in a Debian 12 Rust image and runs
# images/rootfs.sh, which puts the binary and the shared libraries it loads
# (glibc, libgcc_s) in /rootfs. The image is that directory on an empty base:
# about 17 MB (a 7 MB compressed layer), no shell, no package manager.
#
# `cargo xtask images` builds this same file without Docker and without
# compiling in a container: it builds the binary on the host (a Debian 12
# machine), runs images/rootfs.sh there, and hands the result to buildah as
# the `build` stage (`--build-context build=DIR`), so only the last stage
# runs. Keep everything the image needs in the last stage or in rootfs.sh.
ARG RUST_VERSION=1.89

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins -p kubeha-operator
RUN sh images/rootfs.sh /rootfs operator

FROM scratch
COPY --from=build /rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin
# Not root; the chart sets the same user in the pod's securityContext.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kubeha-operator"]
