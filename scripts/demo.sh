#!/usr/bin/env bash
# The main job on the embedded default: the operator's demo (bundled tenants with real control
# planes, SQLite store). Installs what building kmetal needs when it is missing (protoc and its
# well-known types, a C toolchain: Debian packages, checked with dpkg), builds the pinned
# Kubernetes release the tenants run (scripts/peers.sh: from the Go module proxy, once; later
# runs build nothing), then runs `cargo run --example operator` with any arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/packages.sh
WHY="etcd-client's and kmetal-tunnel's build scripts compile .proto files with protoc" \
  ensure_packages "${KMETAL_BUILD_PACKAGES[@]}"
KMETAL_PEERS_BIN=$(scripts/peers.sh --bin-dir)
export KMETAL_PEERS_BIN
exec cargo run --example operator -- "$@"
