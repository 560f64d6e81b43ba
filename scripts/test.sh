#!/usr/bin/env bash
# Runs every test: unit tests (no FUSE needed) and the integration tests, which mount
# for real (root, or /dev/fuse plus fusermount3) and compare with GNU tar extraction.
# Tools the tests call: GNU tar, gzip, pigz, zstd, python3, getfattr (attr), fusermount3, fio.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in tar gzip pigz zstd python3 getfattr fusermount3 fio; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "scripts/test.sh: missing tools: ${missing[*]}" >&2
  echo "  on Debian: apt-get install -y fuse3 pigz zstd attr python3 fio" >&2
  exit 2
fi
[ -e /dev/fuse ] || { echo "scripts/test.sh: /dev/fuse is missing" >&2; exit 2; }
exec cargo test --release "$@"
