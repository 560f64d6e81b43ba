#!/usr/bin/env bash
# Builds snapfs, makes a sample snapshot (tar.gz), mounts it, lists and reads it,
# and unmounts. Needs root (or /dev/fuse + fusermount3), GNU tar and gzip.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
snapfs="$PWD/target/release/snapfs"
work=$(mktemp -d /tmp/snapfs-demo.XXXXXX)
mnt="$work/mnt"
cleanup() { "$snapfs" umount "$mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

echo "== making a sample snapshot in $work"
mkdir -p "$work/src/etc/app" "$work/src/var/lib/data" "$mnt"
echo "listen = 0.0.0.0:8080" > "$work/src/etc/app/config.toml"
seq 1 200000 > "$work/src/var/lib/data/numbers.txt"
ln -s ../../etc/app/config.toml "$work/src/var/lib/config-link"
ln "$work/src/var/lib/data/numbers.txt" "$work/src/var/lib/data/numbers.hardlink"
tar -C "$work/src" -czf "$work/snap.tar.gz" .
ls -l "$work/snap.tar.gz"

echo "== snapfs index"
"$snapfs" index "$work/snap.tar.gz"
echo "== snapfs mount (returns once the mount is live)"
time "$snapfs" mount "$work/snap.tar.gz" "$mnt"
echo "== the view"
find "$mnt" -printf '%M %4n %8s  %P %l\n' | sort -k4
echo "== reading through the mount"
cat "$mnt/var/lib/config-link"
tail -n 2 "$mnt/var/lib/data/numbers.txt"
if touch "$mnt/new-file" 2>/dev/null; then echo "unexpected: the view is writable"; exit 1; fi
echo "(writes fail: read-only view)"
echo "== snapfs umount"
"$snapfs" umount "$mnt"

echo "== a writable view: changes go to an upper dir, nothing is copied up front"
"$snapfs" mount --upper "$work/upper" "$work/snap.tar.gz" "$mnt"
echo "listen = 127.0.0.1:9090" > "$mnt/etc/app/config.toml"
rm "$mnt/var/lib/data/numbers.hardlink"
"$snapfs" umount "$mnt"
du -sh "$work/upper"
echo "== snapfs commit: the changes as a delta layer"
"$snapfs" commit "$work/snap.tar.gz" --upper "$work/upper" -o "$work/delta.tar.gz"
tar -tvzf "$work/delta.tar.gz"
echo "== base + delta stacked as layers"
"$snapfs" mount "$work/snap.tar.gz" "$work/delta.tar.gz" "$mnt"
cat "$mnt/etc/app/config.toml"
ls "$mnt/var/lib/data"
"$snapfs" umount "$mnt"
echo "demo done"
