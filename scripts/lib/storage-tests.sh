# shellcheck shell=bash
# Builds Kubernetes' storage test binaries (k8s.io/apiserver/pkg/storage/etcd3 and .../cacher
# at the version peers/storage-tests/go.mod pins) with one file swapped: their testserver,
# which upstream starts an embedded etcd, is peers/storage-tests/testserver/test_server.go,
# which asks kmetal-testkit for a backend. Go refuses overlays of files in the module cache,
# so the pinned k8s.io/apiserver is copied beside a copy of our module and replaced there.
#
#   build_storage_tests ROOT OUT [MODFLAG]   ROOT: the repository, OUT: where the binaries go,
#                                            MODFLAG: -mod=readonly (default), or -mod=mod to
#                                            write the go.sum the build needed back into
#                                            peers/storage-tests (the pin script does)
build_storage_tests() {
  local root=$1 out=$2 modflag=${3:--mod=readonly} work src pkg
  work=$(mktemp -d)
  cp "$root/peers/storage-tests/go.mod" "$root/peers/storage-tests/go.sum" "$work/"
  (cd "$root/peers/storage-tests" && go mod download k8s.io/apiserver)
  src=$(cd "$root/peers/storage-tests" && go list -m -f '{{.Dir}}' k8s.io/apiserver)
  cp -r "$src" "$work/apiserver"
  chmod -R u+w "$work/apiserver"
  cp "$root/peers/storage-tests/testserver/test_server.go" \
    "$work/apiserver/pkg/storage/etcd3/testserver/test_server.go"
  (cd "$work" && go mod edit -replace k8s.io/apiserver=./apiserver)
  for pkg in etcd3 cacher; do
    (cd "$work" && GOFLAGS="$modflag -trimpath" go test -c -o "$out/k8s-storage-$pkg.test" \
      "k8s.io/apiserver/pkg/storage/$pkg") >&2
  done
  # `go mod tidy` keeps only what our own package needs, not the test-only dependencies of
  # the upstream packages, so the full go.sum comes from a build.
  [ "$modflag" = -mod=mod ] && cp "$work/go.sum" "$root/peers/storage-tests/go.sum"
  rm -rf "$work"
}
