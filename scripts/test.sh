#!/usr/bin/env bash
# The whole kmetal test suite, from a fresh machine. Installs the Debian packages the build and
# the tests need (checked by package with dpkg, not by one command), builds the real peers from
# the Go module proxy (scripts/peers.sh: kube-apiserver & co, kine, Konnectivity, etcd 3.6;
# cached, so a second run builds nothing), then checks formatting, lints, and runs every test,
# real-server tests included, and every benchmark once. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/packages.sh

test_packages=(
  "${KMETAL_BUILD_PACKAGES[@]}"
  etcd-server etcd-client   # etcd 3.4 clusters and etcdctl for the datastore tests
  postgresql-15             # the PostgreSQL driver's server (pg_config --bindir)
  openssl                   # the PKI tests read our certificates with it
  iproute2 curl python3     # the tunnel's network-namespace test: ip netns, curl, a page server
  util-linux                # setpriv --pdeathsig: test servers die with the test process
  e2fsprogs                 # chattr +i: an SQLite file even root cannot write
)
WHY="the tests start real etcd and PostgreSQL servers and drive them with real tools" \
  ensure_packages "${test_packages[@]}"

# A whole build is about 3 GB, the peers about 1 GB, and the etcd and PostgreSQL tests write
# their data directories under the temp dir; a full disk shows up as servers dying mid-test.
free_kb=$(df -Pk . "${TMPDIR:-/tmp}" 2>/dev/null | awk 'NR>1 {print $4}' | sort -n | head -1)
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((6 * 1024 * 1024)) ]; then
  echo "warning: only $((free_kb / 1024)) MB free for the checkout or ${TMPDIR:-/tmp}; the suite needs about 6 GB" >&2
fi

KMETAL_PEERS_BIN=$(scripts/peers.sh --bin-dir)
export KMETAL_PEERS_BIN

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# Every benchmark once on a small workload (criterion's test mode), so none rots between runs.
cargo test --benches
