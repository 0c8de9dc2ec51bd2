#!/usr/bin/env bash
# The whole kmetal test suite, from a fresh machine: installs the real servers the tests start
# (etcd, PostgreSQL 15), protoc, the PKI tests' openssl and kubectl, and the tunnel test's
# iproute2, curl and python3 when missing, then
# checks formatting, lints and runs every
# test, real-server tests included. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
# The tunnel's network-namespace test: ip netns/veth, curl through the tunnel, and a
# python3 http.server as the worker's page.
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
pg_bindir=$(pg_config --bindir 2>/dev/null || true)
if [ -z "$pg_bindir" ] || [ ! -x "$pg_bindir/initdb" ]; then
  [ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# A whole build is about 3 GB and the etcd and PostgreSQL tests write their data directories
# under the temp dir; a full disk shows up as servers dying mid-test, so say so up front.
free_kb=$(df -Pk . "${TMPDIR:-/tmp}" 2>/dev/null | awk 'NR>1 {print $4}' | sort -n | head -1)
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((5 * 1024 * 1024)) ]; then
  echo "warning: only $((free_kb / 1024)) MB free for the checkout or ${TMPDIR:-/tmp}; the suite needs about 5 GB" >&2
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# Every benchmark once on a small workload (criterion's test mode), so none rots between runs.
cargo test --benches
