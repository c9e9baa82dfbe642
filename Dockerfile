# syntax=docker/dockerfile:1
# warren's images: one build, a target per binary.
#   docker build --target sender     -t warren-sender .
#   docker build --target worker     -t warren-worker .
#   docker build --target controller -t warren-controller .
#   docker build --target admin      -t warren-admin .
# (`make images` builds all three, passing the pinned base images from mk/versions.env.)
#
# Adding an image: add its package to BINARIES below (one package per binary, named
# alike) and a target at the end like the ones there.
#
# Layer caching: the "skeleton" stage keeps only the manifests (Cargo.toml,
# Cargo.lock) and replaces every target's source with an empty stub, so the
# dependency build below is cached until a manifest or the lock file changes;
# editing warren's own code rebuilds only warren's crates. Both cargo builds select the
# same packages (`-p` for each of BINARIES): cargo resolves features per selection, so a
# different selection in the second build (say `--bin`, which unifies features across the
# whole workspace, test crates included) would rebuild most dependencies on every edit.

# Pinned in mk/versions.env (tests keep these defaults equal to it). Builder and runtime
# share one Debian release, so the binaries find the glibc they were linked against.
ARG RUST_IMAGE=rust:1.95-slim-trixie
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian13:nonroot

FROM ${RUST_IMAGE} AS skeleton
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
# Keep each crate's Cargo.toml (and build.rs) and the .rs files cargo may treat as
# target roots; delete everything else, then empty the roots (lib.rs) or make them
# an empty main (bins, tests, benches, examples).
RUN find crates -type f ! -name Cargo.toml ! -name build.rs \( ! -name '*.rs' -o \( \
        ! -path '*/src/lib.rs' ! -path '*/src/main.rs' ! -path '*/src/bin/*' \
        ! -path '*/benches/*' ! -path '*/examples/*' ! -path '*/tests/*' \) \) -delete \
 && echo 'fn main() {}' > /tmp/main.rs \
 && find crates -type f -path '*/src/lib.rs' -exec truncate -s 0 {} + \
 && find crates -type f -name '*.rs' ! -name build.rs ! -path '*/src/lib.rs' -exec cp /tmp/main.rs {} \; \
 && find crates -type d -empty -delete

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
# The binaries the images ship; each is the package of the same name.
ARG BINARIES="warren-sender warren-worker warren-controller warren-admin"
COPY --from=skeleton /src ./
# Dependencies only (warren's crates are stubs here): cached until a manifest changes.
RUN set --; for bin in $BINARIES; do set -- "$@" -p "$bin"; done \
 && cargo build --release --locked "$@" \
 && rm -rf crates
COPY crates ./crates
# COPY keeps the build context's modification times, which may be older than the
# stub build: touch the sources so cargo rebuilds warren's crates for real.
RUN set --; for bin in $BINARIES; do set -- "$@" -p "$bin"; done \
 && find crates -name '*.rs' -exec touch {} + \
 && cargo build --release --locked "$@" \
 && mkdir -p /out \
 && for bin in $BINARIES; do cp "target/release/$bin" /out/; done

# Runtime: distroless glibc base (CA certificates, no shell, no package manager),
# user nonroot (UID/GID 65532).
FROM ${RUNTIME_IMAGE} AS runtime
USER 65532:65532
WORKDIR /

FROM runtime AS sender
COPY --from=builder /out/warren-sender /usr/local/bin/warren-sender
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/warren-sender"]

FROM runtime AS worker
COPY --from=builder /out/warren-worker /usr/local/bin/warren-worker
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/warren-worker"]

FROM runtime AS controller
COPY --from=builder /out/warren-controller /usr/local/bin/warren-controller
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/warren-controller"]

FROM runtime AS admin
COPY --from=builder /out/warren-admin /usr/local/bin/warren-admin
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/warren-admin"]
CMD ["serve"]
