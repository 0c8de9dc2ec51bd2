#!/usr/bin/env bash
# Builds the real peers kmetal is tested against from the Go module proxy, at the versions
# pinned in peers/*/go.mod (with their go.sum), into a versioned cache; a second run builds
# nothing. Then points peers/bin/ (git-ignored) at the binaries, which is where
# kmetal-testkit looks for them (or $KMETAL_PEERS_BIN).
#
#   scripts/peers.sh            build what is missing, link peers/bin, print a summary
#   scripts/peers.sh --bin-dir  the same, then print only the folder of the binaries
#
# The cache is $KMETAL_PEERS_DIR (default ~/.cache/kmetal/peers); each peer builds into
# <peer>-<version>-<key>/, where the key hashes its go.mod, go.sum, Go sources, the build
# recipe below and the Go version, so changing any of them builds anew beside the old one.
# Go's own caches (GOCACHE, GOMODCACHE) are used as configured.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KMETAL_PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kmetal/peers}
quiet=false
[ "${1:-}" = "--bin-dir" ] && quiet=true
say() { if $quiet; then echo "$@" >&2; else echo "$@"; fi; }

# The module proxy serves modules that ask for a newer Go than the one installed; building
# them must fail loudly here rather than fetch a toolchain.
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -trimpath"
if ! command -v go >/dev/null 2>&1; then
  echo "peers.sh: no Go toolchain on PATH: the peers are built from the Go module proxy with go >= 1.26.5" >&2
  exit 1
fi
go_version=$(go env GOVERSION)

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# The recipe of each peer: one line per binary, "<peer> <binary> <package> <cgo> <tags> <ldflags>".
# The version a go.mod requires of a module (on a `require` line of its own or in a block).
required() { awk -v m="$2" '{for (i = 1; i < NF; i++) if ($i == m) {print $(i + 1); exit}}' "$root/peers/$1/go.mod"; }
k8s_version=$(required kubernetes k8s.io/kubernetes)
k8s_minor=$(echo "$k8s_version" | cut -d. -f2)
kine_version=$(required kine github.com/k3s-io/kine)
anp_version=$(required konnectivity sigs.k8s.io/apiserver-network-proxy)
etcd_version=$(required etcd go.etcd.io/etcd/server/v3)
# A binary built from a module has no git tree to stamp its version from: set what
# `--version`, /version and the apiserver's compatibility checks report.
k8s_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version"
k8s_ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$k8s_minor"
k8s_ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
k8s_ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$k8s_version"
k8s_ldflags+=" -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$k8s_minor"
kine_ldflags="-s -w -X github.com/k3s-io/kine/pkg/version.Version=$kine_version"
# kine's own build tags for its cgo SQLite driver (kine's scripts/build, without NATS).
kine_tags="sqlite_unlock_notify,sqlite_vtable,sqlite_stat4,sqlite_preupdate_hook,sqlite_math_functions,sqlite_dbstat,sqlite_column_metadata"
recipe=$(cat <<EOF
kubernetes kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver 0 - $k8s_ldflags
kubernetes kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager 0 - $k8s_ldflags
kubernetes kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler 0 - $k8s_ldflags
kubernetes kubectl k8s.io/kubernetes/cmd/kubectl 0 - $k8s_ldflags
kine kine github.com/k3s-io/kine 1 $kine_tags $kine_ldflags
konnectivity konnectivity-server sigs.k8s.io/apiserver-network-proxy/cmd/server 0 - -s -w
konnectivity konnectivity-agent sigs.k8s.io/apiserver-network-proxy/cmd/agent 0 - -s -w
etcd etcd ./cmd/etcd 0 - -s -w
etcd etcdctl go.etcd.io/etcd/etcdctl/v3 0 - -s -w
storage-tests (built by build_storage_tests: k8s-storage-etcd3.test, k8s-storage-cacher.test)
EOF
)
apiserver_version=$(required storage-tests k8s.io/apiserver)
declare -A versions=([kubernetes]=$k8s_version [kine]=$kine_version [konnectivity]=$anp_version
  [etcd]=$etcd_version [storage-tests]=$apiserver_version)
source "$root/scripts/lib/storage-tests.sh"

# Where each peer's binaries go: the key covers everything that changes what is built.
peer_dir() {
  local peer=$1 key
  key=$( (cd "$root/peers/$peer" && cat go.mod go.sum $(find . -name '*.go' | sort) 2>/dev/null
          grep "^$peer " <<<"$recipe"; echo "$go_version"
          if [ "$peer" = storage-tests ]; then cat "$root/scripts/lib/storage-tests.sh"; fi) \
          | sha256sum | cut -c1-12)
  echo "$cache/$peer-${versions[$peer]}-$key"
}

link_dir="$root/peers/bin"
mkdir -p "$link_dir"
total_start=$(date +%s)
built=()
for peer in kubernetes kine konnectivity etcd storage-tests; do
  dir=$(peer_dir "$peer")
  if [ ! -f "$dir/.complete" ]; then
    say "peers: building $peer ${versions[$peer]} into $dir (the first time takes minutes)"
    start=$(date +%s)
    staging="$dir.partial"
    rm -rf "$staging" && mkdir -p "$staging"
    if [ "$peer" = storage-tests ]; then
      build_storage_tests "$root" "$staging"
    else
      while read -r _ binary package cgo tags ldflags; do
        tagflag=()
        [ "$tags" = "-" ] || tagflag=(-tags "$tags")
        (cd "$root/peers/$peer" && CGO_ENABLED=$cgo go build "${tagflag[@]}" -ldflags "$ldflags" \
          -o "$staging/$binary" "$package") >&2
      done < <(grep "^$peer " <<<"$recipe")
    fi
    echo "$peer ${versions[$peer]} built in $(( $(date +%s) - start )) s with $go_version" >"$staging/.complete"
    rm -rf "$dir" && mv "$staging" "$dir"
    built+=("$peer")
  fi
  for bin in "$dir"/*; do
    ln -sfn "$bin" "$link_dir/$(basename "$bin")"
  done
done

if $quiet; then
  echo "$link_dir"
else
  if [ "${#built[@]}" -gt 0 ]; then
    say "peers: built ${built[*]} in $(( $(date +%s) - total_start )) s"
  else
    say "peers: all built already (nothing to do)"
  fi
  say "peers: $k8s_version (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl), kine $kine_version, konnectivity $anp_version, etcd $etcd_version, storage tests of k8s.io/apiserver $apiserver_version"
  say "peers: binaries in $link_dir -> $cache ($(du -sh "$cache" | cut -f1))"
fi
