#!/usr/bin/env bash
# Image benchmark (issue 11): an OCI archive with a busybox layer and a 1 GiB
# semi-compressible gzip layer; time to a mounted (or extracted) root filesystem and
# bytes read, snapfs side by side with `umoci unpack` and `skopeo copy` to a dir plus
# `tar -x` of each layer. Needs root, skopeo, umoci, busybox-static, pigz, python3.
#
#   bash scripts/bench-image.sh            # 1 GiB layer (~3 min on 2 cores)
#   BIG_MB=128 bash scripts/bench-image.sh # smoke
#
# Knobs: BIG_MB=1024, WORK=dir (default: mktemp under /var/tmp, removed), KEEP=1,
# SNAPFS=path (default: cargo build --release). snapfs indexes go to a private
# XDG_CACHE_HOME under WORK, so "cold" really is the first mount of those layers.
set -euo pipefail
cd "$(dirname "$0")/.."
BIG_MB=${BIG_MB:-1024}
KEEP=${KEEP:-0}
if [ -z "${SNAPFS:-}" ]; then
    cargo build --release -q
    SNAPFS=$PWD/target/release/snapfs
fi
W=${WORK:-$(mktemp -d /var/tmp/snapfs-bench-image.XXXXXX)}
mkdir -p "$W"
export XDG_CACHE_HOME=$W/cache
MNT=$W/mnt
mkdir -p "$MNT"
cleanup() {
    if awk -v m="$MNT" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; then
        "$SNAPFS" umount "$MNT" || umount -l "$MNT" || true
    fi
    [ "$KEEP" = 1 ] || rm -rf "$W"
}
trap cleanup EXIT
now() { echo "$EPOCHREALTIME"; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
mib() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 1048576:.1f}')" "$1"; }
# io FILE KEY: a /proc/PID/io field from a saved copy.
io() { awk -v k="$2:" '$1 == k { print $2 }' "$1"; }

echo "building the image in $W ..." >&2
cd "$W"
mkdir -p l1/bin l1/etc l2/data
cp "$(command -v busybox)" l1/bin/busybox
for a in $(l1/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "l1/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > l1/etc/passwd
(set +o pipefail; head -c $((BIG_MB * 786432)) /dev/urandom | base64 -w 100 | head -c $((BIG_MB << 20)) > l2/data/big)
for i in $(seq 1 200); do echo "small $i" > "l2/data/s$i"; done
tar --numeric-owner -C l1 -cf l1.tar . && pigz -1 -c l1.tar > l1.tar.gz
tar --numeric-owner -C l2 -cf - . | pigz -1 -p 2 > l2.tar.gz
rm -rf l2
python3 - "$W" <<'EOF'
import hashlib, json, os, subprocess, sys
w = sys.argv[1]
lay = os.path.join(w, "oci")
os.makedirs(os.path.join(lay, "blobs/sha256"), exist_ok=True)
def put(b):
    d = hashlib.sha256(b).hexdigest()
    open(os.path.join(lay, "blobs/sha256", d), "wb").write(b)
    return "sha256:" + d, len(b)
def file_digest(p, gz):
    h = hashlib.sha256()
    cmd = ["gzip", "-dc", p] if gz else ["cat", p]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as pr:
        for chunk in iter(lambda: pr.stdout.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
layers, diffs = [], []
for name in ["l1.tar.gz", "l2.tar.gz"]:
    p = os.path.join(w, name)
    d = file_digest(p, False)
    os.rename(p, os.path.join(lay, "blobs/sha256", d[7:]))
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d,
                   "size": os.path.getsize(os.path.join(lay, "blobs/sha256", d[7:]))})
    diffs.append(file_digest(os.path.join(lay, "blobs/sha256", d[7:]), True))
cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diffs}}).encode()
cd, cn = put(cfg)
man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                  "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
                  "layers": layers}).encode()
md, mn = put(man)
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
           "digest": md, "size": mn, "annotations": {"org.opencontainers.image.ref.name": "bench"}}]},
          open(os.path.join(lay, "index.json"), "w"))
open(os.path.join(lay, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
EOF
rm -f l1.tar
skopeo --insecure-policy copy -q oci:oci:bench oci-archive:image.tar:bench
BLOB=$(du -b oci/blobs/sha256/* | sort -n | tail -1 | cut -f1)

# snapfs: mount (cold = first mount, includes the one indexing pass), read one small
# file; warm remount with page cache, and with caches dropped.
snap_mount() {  # writes cli.io, daemon io before/after reading a small file
    sh -c '"$0" mount "$1" "$2" && cat /proc/$$/io > "$3"' "$SNAPFS" "$W/image.tar" "$MNT" "$W/cli.io"
}
daemon_pid() { pgrep -f -- "mount .*$MNT\$" | head -1; }
drop
t0=$(now); snap_mount; t1=$(now)
pid=$(daemon_pid); cat /proc/"$pid"/io > d0.io
cat "$MNT/data/s7" > /dev/null; t2=$(now); cat /proc/"$pid"/io > d1.io
COLD=$(secs "$t0" "$t1"); COLD_FILE=$(secs "$t1" "$t2")
COLD_READ=$(( $(io cli.io rchar) + $(io d1.io rchar) ))
"$SNAPFS" umount "$MNT"
t0=$(now); snap_mount; t1=$(now)
pid=$(daemon_pid); cat "$MNT/data/s7" > /dev/null; t2=$(now); cat /proc/"$pid"/io > d1.io
WARM=$(secs "$t0" "$t1"); WARM_FILE=$(secs "$t1" "$t2")
WARM_READ=$(( $(io cli.io rchar) + $(io d1.io rchar) ))
"$SNAPFS" umount "$MNT"
drop
t0=$(now); snap_mount; t1=$(now)
pid=$(daemon_pid); cat "$MNT/data/s7" > /dev/null; cat /proc/"$pid"/io > d1.io
WARM_DROP=$(secs "$t0" "$t1")
WARM_DROP_DISK=$(( $(io cli.io read_bytes) + $(io d1.io read_bytes) ))
"$SNAPFS" umount "$MNT"
INDEX_BYTES=$(du -cb "$XDG_CACHE_HOME"/snapfs/*.snapfs-idx image.tar.snapfs-idx 2>/dev/null | tail -1 | cut -f1)

# umoci unpack (from the layout: umoci reads no OCI archive).
drop
t0=$(now); sh -c 'umoci unpack --image oci:bench bundle >/dev/null && cat /proc/$$/io > "$0"' "$W/umoci.io"; t1=$(now)
UMOCI=$(secs "$t0" "$t1"); UMOCI_READ=$(io umoci.io rchar); UMOCI_WRITE=$(io umoci.io wchar)
rm -rf bundle
t0=$(now); umoci unpack --image oci:bench bundle >/dev/null; t1=$(now)
UMOCI_AGAIN=$(secs "$t0" "$t1")
UMOCI_DISK=$(du -sb bundle | cut -f1)
rm -rf bundle

# skopeo copy to a dir, then tar -x of each layer.
drop
t0=$(now)
sh -c 'skopeo --insecure-policy copy -q oci-archive:image.tar:bench dir:copied && mkdir rootfs &&
  for l in $(python3 -c "import json; print(\" \".join(x[\"digest\"][7:] for x in json.load(open(\"copied/manifest.json\"))[\"layers\"]))"); do
    tar -xzpf copied/$l -C rootfs; done && cat /proc/$$/io > "$0"' "$W/skopeo.io"
t1=$(now)
SKOPEO=$(secs "$t0" "$t1"); SKOPEO_READ=$(io skopeo.io rchar)
rm -rf copied rootfs

cat <<EOF

## Image benchmark: ${BIG_MB} MiB file in a $(mib "$BLOB") MiB gzip layer (OCI archive, $(nproc) cores)

| | snapfs mount | umoci unpack | skopeo copy dir: + tar -x |
|---|---|---|---|
| time to a root filesystem, cold | ${COLD} s (first mount: one indexing pass per layer) | ${UMOCI} s | ${SKOPEO} s |
| again (warm remount / unpack again) | ${WARM} s (caches dropped: ${WARM_DROP} s) | ${UMOCI_AGAIN} s | - |
| bytes read (rchar), cold | $(mib "$COLD_READ") MiB | $(mib "$UMOCI_READ") MiB | $(mib "$SKOPEO_READ") MiB |
| bytes read, warm | $(mib "$WARM_READ") MiB (disk with caches dropped: $(mib "$WARM_DROP_DISK") MiB) | - | - |
| first small file after mount | cold ${COLD_FILE} s, warm ${WARM_FILE} s | - | - |
| disk used | indexes $(mib "$INDEX_BYTES") MiB | rootfs $(mib "$UMOCI_DISK") MiB (wrote $(mib "$UMOCI_WRITE") MiB) | - |

rchar counts read(2) bytes of the command (and of the snapfs daemon): snapfs maps its
index files, so they appear under "disk" only when caches were dropped (that figure
also counts the snapfs binary paged in from disk).
EOF
