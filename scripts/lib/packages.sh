# shellcheck shell=bash
# Debian packages, checked by package (dpkg's status), not by the presence of one command:
# protoc without libprotobuf-dev passes a `command -v protoc` check and still fails the build
# (google/protobuf/descriptor.proto: File not found).

# The packages every cargo build of the workspace needs: protoc and its well-known types
# (etcd-client's and kmetal-tunnel's build scripts) and a C toolchain (ring, sqlite, mimalloc).
KMETAL_BUILD_PACKAGES=(protobuf-compiler libprotobuf-dev gcc libc6-dev)

# Prints the packages of "$@" that dpkg does not report as installed.
missing_packages() {
  local p
  for p in "$@"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then
      printf '%s\n' "$p"
    fi
  done
}

# Installs every package of "$@" that is not installed, saying which and why ($WHY).
ensure_packages() {
  local missing=()
  mapfile -t missing < <(missing_packages "$@")
  [ "${#missing[@]}" -eq 0 ] && return 0
  echo "kmetal: installing ${missing[*]} with apt-get (${WHY:-needed to build and test kmetal})" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # apt's and dpkg's progress goes to stdout, which is dropped; their errors stay on stderr.
  $sudo apt-get update -qq >/dev/null
  # Recommends stay out; the packages that matter are named explicitly above.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  mapfile -t missing < <(missing_packages "$@")
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "kmetal: still not installed after apt-get: ${missing[*]}" >&2
    return 1
  fi
}
