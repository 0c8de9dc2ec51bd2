#!/usr/bin/env bash
# The main job on the embedded default: the operator's demo (bundled tenants, SQLite store).
# Installs what building kmetal needs when it is missing (protoc and its well-known types,
# a C toolchain: Debian packages, checked with dpkg), then runs
# `cargo run --example operator` with any arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/packages.sh
WHY="etcd-client's and kmetal-tunnel's build scripts compile .proto files with protoc" \
  ensure_packages "${KMETAL_BUILD_PACKAGES[@]}"
exec cargo run --example operator -- "$@"
