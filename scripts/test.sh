#!/usr/bin/env bash
# Runs every test: unit tests (no FUSE needed) and the integration tests, which mount
# for real (root, or /dev/fuse plus fusermount3) and compare with GNU tar extraction,
# the kernel's overlayfs and plain directories.
#
# Run as root, it first installs what the tests need (Debian packages, the POSIX test
# suites from crates.io); otherwise it prints the one command that would. Extra
# arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian package:command pairs the tests call.
#   fuse3 pigz zstd xz-utils bzip2 pbzip2 lbzip2 attr tar python3: the archives and
#   the tree comparisons
#   runc busybox-static: container tests; mount util-linux passwd: permission and
#   mount-helper tests; fio: load tests; docker.io: the Docker volume tests (dockerd);
#   nginx-light: the http(s):// source tests; iproute2: scripts/bench-remote.sh.
#   containerd: the snapshotter tests; protobuf-compiler (+ libprotobuf-dev below):
#   build.rs generates containerd's gRPC API. docker-registry skopeo: the
#   snapshotter's pull test (a local registry); umoci skopeo: the image tests.
PACKAGES="fuse3:fusermount3 pigz:pigz zstd:zstd xz-utils:xz bzip2:bzip2 pbzip2:pbzip2
  lbzip2:lbzip2 attr:getfattr python3:python3 tar:tar
  gzip:gzip runc:runc mount:mount util-linux:setpriv passwd:useradd fio:fio
  containerd:containerd protobuf-compiler:protoc docker.io:dockerd
  nginx-light:nginx iproute2:tc docker-registry:docker-registry skopeo:skopeo umoci:umoci"
# crates.io tools, pinned: the POSIX suites run inside writable views.
CRATES="pjdfstest@0.2.2:pjdfstest fsx@0.3.2:fsx"

export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"
missing_pkgs=()
for p in $PACKAGES; do
  command -v "${p#*:}" >/dev/null 2>&1 || missing_pkgs+=("${p%%:*}")
done
# The container rootfs needs a statically linked busybox (Debian's plain one is not).
if ! command -v busybox >/dev/null 2>&1 || ldd "$(command -v busybox)" >/dev/null 2>&1; then
  missing_pkgs+=(busybox-static)
fi
# protoc's well-known types (google/protobuf/*.proto) for build.rs.
[ -f /usr/include/google/protobuf/empty.proto ] || missing_pkgs+=(libprotobuf-dev)
# ISA-L's inflate (build.rs links it where its header is; the tests cover both paths).
[ -f /usr/include/isa-l/igzip_lib.h ] || missing_pkgs+=(libisal-dev)
missing_crates=()
for c in $CRATES; do
  want="${c%%:*}"; tool="${c#*:}"
  have=$("$tool" --version 2>/dev/null | awk '{print $2}' || true)
  [ "$have" = "${want#*@}" ] || missing_crates+=("$want")
done

if [ ${#missing_pkgs[@]} -gt 0 ] || [ ${#missing_crates[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    if [ ${#missing_pkgs[@]} -gt 0 ]; then
      echo "scripts/test.sh: installing ${missing_pkgs[*]}" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >/dev/null
    fi
    if [ ${#missing_crates[@]} -gt 0 ]; then
      echo "scripts/test.sh: installing ${missing_crates[*]} from crates.io" >&2
      cargo install --quiet --locked "${missing_crates[@]}"
    fi
  else
    line=()
    [ ${#missing_pkgs[@]} -gt 0 ] && line+=("apt-get install -y ${missing_pkgs[*]}")
    [ ${#missing_crates[@]} -gt 0 ] && line+=("cargo install --locked ${missing_crates[*]}")
    echo "scripts/test.sh: missing: ${missing_pkgs[*]} ${missing_crates[*]}" >&2
    echo "  install them (as root): $(IFS='&'; echo "${line[*]}" | sed 's/&/ \&\& /g')" >&2
    echo "  or run this script as root, which installs them first" >&2
    exit 2
  fi
fi
# The S3 source tests run moto's server (PyPI moto[server], with boto3).
if ! python3 -c 'import moto.server, boto3' >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "scripts/test.sh: installing moto[server] from PyPI" >&2
    python3 -m pip install --quiet 'moto[server]'
  else
    echo "scripts/test.sh: missing moto[server] (python3 -m pip install 'moto[server]')" >&2
    exit 2
  fi
fi
[ -e /dev/fuse ] || { echo "scripts/test.sh: /dev/fuse is missing" >&2; exit 2; }
exec cargo test --release "$@"
