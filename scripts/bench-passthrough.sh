#!/usr/bin/env bash
# fio on a copied-up file of a writable view (issue 15, goal 8): FUSE passthrough on
# (the default), off (--no-passthrough), and native (a plain copy of the upper file,
# on the same disk). The file is a SIZE_MB random member of a plain tar, copied up
# and made whole by rewriting every byte through the view; each fio job runs
# RUNTIME seconds: 4 KiB random read, 4 KiB random write, 1 MiB sequential read,
# buffered and O_DIRECT (psync, one job). Buffered reads see a warm page cache (the
# file is read whole first, fio does not drop it; the disk is synced before every
# job; the three runs of a job follow each other). Prints a markdown table. ROOT ONLY.
#
# usage: scripts/bench-passthrough.sh [WORKDIR]   (default /var/tmp/snapfs-bench-passthrough)
#   SIZE_MB=1024 RUNTIME=10 to change the file size and the seconds per job.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/var/tmp/snapfs-bench-passthrough}
SIZE_MB=${SIZE_MB:-1024}
RUNTIME=${RUNTIME:-10}
[ "$(id -u)" -eq 0 ] || { echo "bench-passthrough.sh: run as root" >&2; exit 2; }
command -v fio >/dev/null || { echo "bench-passthrough.sh: fio missing" >&2; exit 2; }

cargo build --release --quiet --manifest-path "$REPO/Cargo.toml"
SNAPFS=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/snapfs

mkdir -p "$W"
W=$(cd "$W" && pwd)
cd "$W"
MNT=$W/mnt
mkdir -p "$MNT"

if [ ! -f big.tar ] || [ "$(stat -c %s big.tar)" -lt $((SIZE_MB << 20)) ]; then
  head -c "${SIZE_MB}M" /dev/urandom > big.bin
  tar -cf big.tar big.bin
  rm big.bin
fi
# Two upper dirs holding the same copied-up file, one mounted with passthrough and
# one without, and a plain copy: the three runs of each job follow each other.
MNT2=$W/mnt-off
mkdir -p "$MNT2"
cleanup() {
  for m in "$MNT" "$MNT2"; do
    grep -q " $m " /proc/self/mountinfo && "$SNAPFS" umount "$m"
  done
  true
}
trap cleanup EXIT
rm -rf upper upper-off native.bin
"$SNAPFS" mount --upper upper big.tar "$MNT"
dd if="$MNT/big.bin" of="$MNT/big.bin" bs=1M conv=notrunc status=none
"$SNAPFS" umount "$MNT"
if getfattr -n user.snapfs.origin upper/tree/big.bin >/dev/null 2>&1; then
  echo "bench-passthrough.sh: big.bin stayed partial" >&2
  exit 1
fi
cp -a upper upper-off
cp upper/tree/big.bin native.bin
"$SNAPFS" mount --upper upper big.tar "$MNT"
"$SNAPFS" mount --no-passthrough --upper upper-off big.tar "$MNT2"

# job RW BS FILE DIRECT -> "iops MiB/s"
job() {
  local rw=$1 bs=$2 file=$3 direct=$4
  fio --name=j --filename="$file" --rw="$rw" --bs="$bs" --size="${SIZE_MB}M" \
    --ioengine=psync --direct="$direct" --invalidate=0 --runtime="$RUNTIME" --time_based \
    --numjobs=1 --output-format=json 2>/dev/null |
    python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] else j["read"]
print("%.0f %.0f" % (side["iops"], side["bw"] / 1024))'
}

declare -A FILE=([on]=$MNT/big.bin [off]=$MNT2/big.bin [native]=$W/native.bin)
# What holds each run's bytes on the disk (warmed before buffered reads).
declare -A DISK=([on]=$W/upper/tree/big.bin [off]=$W/upper-off/tree/big.bin [native]=$W/native.bin)
declare -A R
for direct in 0 1; do
  for spec in randread:4k randwrite:4k read:1M; do
    for label in on off native; do
      sync
      if [ "$direct" = 0 ] && [ "${spec%%:*}" != randwrite ]; then
        cat "${DISK[$label]}" > /dev/null
      fi
      R[$label,$spec,$direct]=$(job "${spec%%:*}" "${spec##*:}" "${FILE[$label]}" "$direct")
    done
  done
done
cleanup

echo "fio on a copied-up ${SIZE_MB} MiB file, ${RUNTIME} s per job, psync, 1 job (IOPS, MiB/s)"
echo
echo "| job | passthrough on | passthrough off | native | on / native | off / native |"
echo "|---|---|---|---|---|---|"
for direct in 0 1; do
  for spec in randread:4k randwrite:4k read:1M; do
    mode=buffered; [ "$direct" = 1 ] && mode=O_DIRECT
    read -r on_i on_b <<<"${R[on,$spec,$direct]}"
    read -r off_i off_b <<<"${R[off,$spec,$direct]}"
    read -r nat_i nat_b <<<"${R[native,$spec,$direct]}"
    if [ "${spec##*:}" = 4k ]; then
      a=$on_i b=$off_i c=$nat_i unit=IOPS
    else
      a=$on_b b=$off_b c=$nat_b unit=MiB/s
    fi
    ratio() { python3 -c "import sys; print('%.2f' % (float(sys.argv[1]) / max(float(sys.argv[2]), 1)))" "$1" "$2"; }
    echo "| ${spec%%:*} ${spec##*:} $mode ($unit) | $a | $b | $c | $(ratio "$a" "$c")× | $(ratio "$b" "$c")× |"
  done
done
