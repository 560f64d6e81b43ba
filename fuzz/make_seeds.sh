#!/usr/bin/env bash
# Regenerates the committed seed corpora under fuzz/corpus/ (GNU tar, pigz, zstd,
# python3 tarfile, and the snapfs binary of this checkout for embedded and
# persisted indexes). Usage: fuzz/make_seeds.sh [path/to/snapfs]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
snapfs=${1:-$here/../target/release/snapfs}
out=$here/corpus
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"/{tar_index,checkpoint_reader,index_loader}
rm -f "$out"/*/*

# A small tree with every kind of entry.
src=$work/src
mkdir -p "$src/dir/sub" "$src/empty" "$src/$(printf 'l%.0s' {1..120})/$(printf 'n%.0s' {1..60})"
printf 'hello\n' > "$src/dir/a.txt"
seq 1 200 > "$src/dir/sub/numbers"
: > "$src/empty/zero"
printf 'deep\n' > "$src/$(printf 'l%.0s' {1..120})/$(printf 'n%.0s' {1..60})/f"
ln -s dir/a.txt "$src/link"
ln -s /nonexistent/target "$src/dangling"
ln "$src/dir/a.txt" "$src/hard"
mkfifo "$src/fifo"
printf 'x' > "$src/ünïcødé"
truncate -s 300000 "$src/sparse"
printf 'data1' | dd of="$src/sparse" bs=1 seek=70000 conv=notrunc status=none
printf 'data2' | dd of="$src/sparse" bs=1 seek=200000 conv=notrunc status=none
setfattr -n user.color -v blue "$src/dir/a.txt" 2>/dev/null || true
setfattr -n user.empty "$src/dir" 2>/dev/null || true

t() { tar -C "$src" -b 1 --sort=name --owner=0 --group=0 --mtime=@1700000000 "$@" -cf - .; }
t --format=gnu --sparse > "$work/gnu.tar"
t --format=oldgnu --sparse > "$work/oldgnu.tar"
t --format=pax --xattrs --sparse > "$work/pax10.tar"
t --format=pax --sparse --sparse-version=0.1 > "$work/pax01.tar"
t --format=pax --sparse --sparse-version=0.0 > "$work/pax00.tar"
tar -C "$src" -b 1 --format=ustar -cf "$work/ustar.tar" dir link hard fifo 2>/dev/null
tar -C "$src" -b 1 --format=v7 -cf "$work/v7.tar" dir link 2>/dev/null
python3 - "$work/py.tar" <<'PY'
import io, sys, tarfile
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT,
                  pax_headers={"comment": "global header"}) as t:
    def add(name, kind=tarfile.REGTYPE, data=b"", **kw):
        i = tarfile.TarInfo(name); i.type = kind; i.size = len(data)
        i.mtime = 1700000000.5; i.mode = 0o4755
        for k, v in kw.items(): setattr(i, k, v)
        t.addfile(i, io.BytesIO(data) if data else None)
    add("./dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)
    add("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0)
    add("x/../escape", data=b"nope")
    add("/abs/file", data=b"abs")
    add("dir/", tarfile.DIRTYPE)
    add("dir/f", data=b"first")
    add("dir/f", data=b"second, last wins")
    add("dir/hl", tarfile.LNKTYPE, linkname="dir/f")
    add("x", pax_headers={"LIBARCHIVE.xattr.user.%41b": "aGk=",
                          "SCHILY.xattr.user.k": "v", "path": "pax/long/" + "p" * 150},
        data=b"xattrs")
    add("nl", pax_headers={"comment": "a\nb"}, data=b"z")
PY
printf 'snapfs fuzz seed\n' > "$work/readme"
for f in gnu oldgnu pax10 pax01 pax00 ustar v7 py; do cp "$work/$f.tar" "$out/tar_index/$f.tar"; done
gzip -9 -n -c "$work/gnu.tar" > "$out/tar_index/gnu.tar.gz"
zstd -q -19 -c "$work/pax10.tar" > "$out/tar_index/pax10.tar.zst"
xz -q -T2 --block-size=4KiB -c "$work/gnu.tar" > "$out/tar_index/gnu.tar.xz"
bzip2 -1 -c "$work/pax10.tar" > "$out/tar_index/pax10.tar.bz2"
"$snapfs" create --format tar --chunk 64K -o "$out/tar_index/embedded.tar" "$src/dir" >/dev/null
"$snapfs" create --format gz --chunk 64K -o "$out/tar_index/embedded.tar.gz" "$src/dir" >/dev/null
"$snapfs" create --format zst --chunk 64K -o "$out/tar_index/embedded.tar.zst" "$src/dir" >/dev/null

# checkpoint_reader: byte 0 = mode (0 gzip from payload, 1 zstd from payload,
# 2 raw gzip, 3 raw zstd, 4 xz from payload, 5 bzip2 from payload, 6 raw xz,
# 7 raw bzip2), byte 1 = span selector, then payload or stream.
cr=$out/checkpoint_reader
seed() { { printf "\\x$1\\x$2"; cat; } > "$cr/$3"; }
head -c 3000 "$work/py.tar" | seed 00 00 gz-from-tar-span1
seq 1 600 | seed 00 45 gz-from-text
seq 1 600 | seed 01 00 zst-from-text-span1
head -c 2000 "$work/gnu.tar" | seed 01 42 zst-from-tar
gzip -9 -n -c "$work/readme" | seed 02 00 raw-gzip
{ gzip -1 -n -c "$work/readme"; gzip -n -c "$work/readme"; printf '\0\0\0\0'; } | seed 02 01 raw-gzip-members
seq 1 3000 | pigz -n -i -b 32 -c | seed 02 00 raw-pigz-independent
seq 1 800 | gzip -n -c | head -c 700 | seed 02 00 raw-gzip-truncated
seq 1 800 | zstd -q -c | seed 03 00 raw-zstd
{ seq 1 500 | zstd -q -c; seq 501 900 | zstd -q --no-check -c; } | seed 03 00 raw-zstd-frames
# Independent frames every $1 bytes (what pzstd and snapfs create write).
frames() { local d; d=$(mktemp -d -p "$work"); split -b "$1" - "$d/c"; for c in "$d"/c*; do zstd -q -c "$c"; done; }
seq 1 3000 | frames 4096 | seed 03 01 raw-zstd-many-frames
seq 1 700 | seed 04 00 xz-from-text-span1
head -c 2000 "$work/gnu.tar" | seed 05 00 bz2-from-tar-span1
seq 1 3000 | xz -q -T2 --block-size=2KiB -c | seed 06 00 raw-xz-blocks
{ seq 1 300 | xz -q -C crc32 -c; printf '\0\0\0\0'; seq 1 200 | xz -q -C sha256 -c; } | seed 06 01 raw-xz-streams
{ seq 1 400 | bzip2 -1 -c; seq 1 300 | bzip2 -9 -c; } | seed 07 00 raw-bzip2-streams

# index_loader: index files written by snapfs for small archives.
il=$out/index_loader
for f in gnu.tar pax10.tar py.tar embedded.tar; do
  cp "$out/tar_index/$f" "$work/i-$f"
  "$snapfs" index --force "$work/i-$f" >/dev/null
  cp "$work/i-$f.snapfs-idx" "$il/$f.idx"  # (*.snapfs-idx is gitignored)
done
mkdir -p "$work/big"; seq 1 60000 > "$work/big/numbers"
tar -C "$work/big" -b 1 -cf "$work/big.tar" .
gzip -6 -n -c "$work/big.tar" > "$work/big.tar.gz"
zstd -q -c "$work/big.tar" > "$work/big1.tar.zst"
frames 65536 < "$work/big.tar" > "$work/big.tar.zst"
xz -q -T2 --block-size=64KiB -c "$work/big.tar" > "$work/big.tar.xz"
bzip2 -1 -c "$work/big.tar" > "$work/big.tar.bz2"
for f in big.tar.gz big.tar.zst big1.tar.zst big.tar.xz big.tar.bz2; do
  "$snapfs" index --force --span 64K "$work/$f" >/dev/null
  cp "$work/$f.snapfs-idx" "$il/$f.idx"
done
du -sh "$out"; ls -l "$out"/*
