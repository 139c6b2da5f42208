# authswap container image.
#
#   docker build -t authswap .
#   docker run -d --name authswap \
#     -p 127.0.0.1:8080:8080 -p 127.0.0.1:9090:9090 -p 127.0.0.1:2525:2525 \
#     -v authswap-data:/var/lib/authswap \
#     -e AUTHSWAP_IDENTITY_PROVIDER__CLIENT_ID=<application id> \
#     -e AUTHSWAP_IDENTITY_PROVIDER__TENANT=<tenant id or domain> \
#     authswap
#
# Runtime image: distroless (no shell, no package manager), user nonroot
# (uid 65532). See README.md, section "Docker".

# ---------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------
# Base images are pinned by digest (the tag says what it is, the digest what
# is built). These digests were not fetched from the registries (this
# project's machines reach none): they are the ones several public
# Dockerfiles pin for the same tags. `docker build` verifies them; refresh
# with `docker buildx imagetools inspect rust:1-bookworm` (and the same for
# the runtime image) and review before updating.
FROM rust:1-bookworm@sha256:93ce27a88655056a51dbdd8f5f2d7ddc071c7b0070fb288a37b5a285fc83971e AS builder
WORKDIR /src

# Dependencies first, against placeholder sources, so that editing the code
# does not rebuild every dependency. The manifest names src/main.rs,
# src/lib.rs and one file per [[bench]] target, so all of them must exist:
# the bench names are read from the manifest itself.
# The RUN right after this COPY holds the placeholder steps only:
# tests/cli.rs (dockerfile_placeholders_satisfy_the_manifest) runs it as
# written on a copy of the manifest and checks that cargo accepts the result.
COPY Cargo.toml Cargo.lock ./
# Bench target names are Rust identifiers, one word each (SC2013).
# hadolint ignore=SC2013
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && for b in $(awk '/^\[\[bench\]\]/ {b = 1; next} b && /^name *=/ {gsub(/[" ]/, ""); sub(/^name=/, ""); print; b = 0}' Cargo.toml); do \
      echo 'fn main() {}' > "benches/$b.rs"; \
    done
RUN cargo build --release --locked \
 && rm -rf src benches

# The real sources. `touch` makes sure cargo rebuilds the crate itself even
# when the copied files carry older timestamps than the placeholders.
COPY . .
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin authswap \
 && mkdir -p /out \
 && install -m 0755 target/release/authswap /out/authswap

# An empty data directory, copied into the runtime image owned by nonroot
# (distroless has no shell to create it there).
RUN mkdir -m 0700 /out/data

# ---------------------------------------------------------------------------
# Runtime stage
# ---------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

COPY --from=builder /out/authswap /usr/local/bin/authswap
COPY config/authswap.toml /etc/authswap/authswap.toml
COPY --from=builder --chown=65532:65532 /out/data /var/lib/authswap

# Store and key on the data volume; listen on every interface of the
# container (publish the ports on the host's loopback, see README).
# AUTHSWAP_CONFIG makes `docker exec <c> authswap identity ...` use the
# mounted configuration without repeating -c.
# DL3064: these are file paths and addresses; no secret is in the image.
# hadolint ignore=DL3064
ENV AUTHSWAP_CONFIG=/etc/authswap/authswap.toml \
    AUTHSWAP_STORE__PATH=/var/lib/authswap/authswap.db \
    AUTHSWAP_STORE__KEY_FILE=/var/lib/authswap/authswap.key \
    AUTHSWAP_HTTP__LISTEN=0.0.0.0:8080 \
    AUTHSWAP_ADMIN__LISTEN=0.0.0.0:9090 \
    AUTHSWAP_SMTP__LISTEN=0.0.0.0:2525 \
    AUTHSWAP_IMAP__LISTEN=0.0.0.0:1143 \
    AUTHSWAP_POP3__LISTEN=0.0.0.0:1110 \
    AUTHSWAP_ONBOARDING__LISTEN=0.0.0.0:8081 \
    AUTHSWAP_ADMIN__TOKEN_FILE=/var/lib/authswap/admin.token

# Only the data directory is a volume: the configuration is mounted (or
# baked into a derived image) by whoever runs it, and an anonymous volume
# over /etc/authswap would hide a configuration baked into a derived image.
VOLUME ["/var/lib/authswap"]
EXPOSE 8080 8081 9090 2525 1143 1110
# Numeric, so that Kubernetes' runAsNonRoot can check it (distroless
# `nonroot` is uid/gid 65532).
USER 65532:65532
WORKDIR /var/lib/authswap

# `authswap healthcheck` GETs http://<admin.listen>/healthz itself (0.0.0.0
# becomes 127.0.0.1), so the image needs neither a shell nor curl.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/authswap", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/authswap"]
CMD ["serve"]
