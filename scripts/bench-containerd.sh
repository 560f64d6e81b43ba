#!/usr/bin/env bash
# Container start through containerd (issue 12): snapfs's snapshotter against
# containerd's overlayfs snapshotter, in one run, on the same machine.
#
#   bash scripts/bench-containerd.sh              # busybox + a 1 GiB layer (~384 MiB gzip)
#   BIG_MB=256 N=20 bash scripts/bench-containerd.sh
#
# The image (an OCI archive) has a busybox-static layer and a gzip layer with one
# BIG_MB MiB file (3/8 random, 5/8 zeros: gzip makes it about 3/8 of its size) and a
# small text file. For each snapshotter, a fresh containerd (own root, state, socket)
# runs `ctr image import` (with --snapshotter snapfs for snapfs) and then
# `ctr run --rm IMAGE` printing the small file; the time from the import's start
# to the container's first output line is taken. Then: bytes snapfs read from the
# layer blobs (the service's counters), bytes unpacked on disk (containerd's
# snapshotter dirs; for snapfs also its root, without the blob links that share the
# content store's inodes), and the RSS of the service with N running containers
# (N views) against N `snapfs mount` daemons serving the same writable views.
# The pull rows: the image pushed to a local docker-registry (distribution, on
# 127.0.0.1, its own storage), then pulled through containerd's CRI plugin
# (examples/cri-pull.rs; the pull unpacker labels its Prepares with the chain ID,
# `ctr image pull` in 1.6 does not) with CRI's snapshotter overlayfs or snapfs, and
# `ctr -n k8s.io run --rm` printing the small file: pull start to first output.
# ROWS=pull runs only the pull rows.
# Needs root, containerd 1.6+ (ctr, containerd-shim-runc-v2), runc, busybox-static,
# pigz, python3, docker-registry, skopeo. Everything started here is stopped by pid
# at exit.
set -uo pipefail
cd "$(dirname "$0")/.."
BIG_MB=${BIG_MB:-1024}
ROWS=${ROWS:-all}
N=${N:-50}
SNAPFS=${SNAPFS:-}
if [ -z "$SNAPFS" ]; then
    cargo build --release --quiet --bins --example cri-pull || exit 1
    SNAPFS=$PWD/target/release/snapfs
    [ -n "${CARGO_TARGET_DIR:-}" ] && SNAPFS=$CARGO_TARGET_DIR/release/snapfs
fi
CRI_PULL=${CRI_PULL:-$(dirname "$SNAPFS")/examples/cri-pull}
W=$(mktemp -d /var/tmp/snapfs-bench-containerd.XXXXXX)
CTD_PID=
SVC_PID=
REG_PID=
NS=default
IMAGE=docker.io/library/snapfs-bench:1

stop_pid() { # pid: TERM, wait up to 20 s, KILL
    [ -n "$1" ] || return 0
    kill "$1" 2>/dev/null
    for _ in $(seq 200); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$1" 2>/dev/null
}
ctr_() { ctr -a "$W/$CASE/containerd.sock" -n "$NS" "$@"; }
clear_containers() {
    [ -n "$CTD_PID" ] || return 0
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
    for t in $(ctr_ tasks ls -q 2>/dev/null); do
        for _ in $(seq 50); do ctr_ tasks rm -f "$t" >/dev/null 2>&1 && break; sleep 0.1; done
    done
    for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers rm "$c" >/dev/null 2>&1; done
}
cleanup() {
    clear_containers
    stop_pid "$SVC_PID"
    stop_pid "$CTD_PID"
    stop_pid "$REG_PID"
    grep -o " $W[^ ]*" /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
    rm -rf "$W"
}
trap cleanup EXIT

echo "building the image (busybox + ${BIG_MB} MiB layer) in $W" >&2
mkdir -p "$W/l1/bin" "$W/l2/big"
cp "$(command -v busybox)" "$W/l1/bin/busybox"
for a in sh cat echo sleep ls sha256sum; do ln -s busybox "$W/l1/bin/$a"; done
echo "a small file of the big layer" > "$W/l2/big/small.txt"
python3 - "$W/l2/big/data" "$BIG_MB" <<'PY'
import os, sys
path, mb = sys.argv[1], int(sys.argv[2])
zero = bytes(1 << 20)
with open(path, "wb") as f:
    for i in range(mb):
        f.write(os.urandom(1 << 20) if i % 8 < 3 else zero)
PY
tar -C "$W/l1" -cf "$W/l1.tar" . && tar -C "$W/l2" -cf "$W/l2.tar" . && rm -rf "$W/l2"
pigz -c "$W/l1.tar" > "$W/l1.tar.gz" && pigz -c "$W/l2.tar" > "$W/l2.tar.gz"
python3 - "$W" "$IMAGE" <<'PY'
import hashlib, json, os, shutil, sys
w, name = sys.argv[1], sys.argv[2]
oci = os.path.join(w, "oci")
os.makedirs(os.path.join(oci, "blobs/sha256"))
open(os.path.join(oci, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return "sha256:" + h.hexdigest()
def put_file(path):
    d = digest(path)
    shutil.move(path, os.path.join(oci, "blobs/sha256", d[7:]))
    return d
def put(b):
    h = hashlib.sha256(b).hexdigest()
    open(os.path.join(oci, "blobs/sha256", h), "wb").write(b)
    return "sha256:" + h, len(b)
layers, diffs = [], []
for l in ("l1", "l2"):
    diffs.append(digest(os.path.join(w, l + ".tar")))
    os.remove(os.path.join(w, l + ".tar"))
    size = os.path.getsize(os.path.join(w, l + ".tar.gz"))
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                   "digest": put_file(os.path.join(w, l + ".tar.gz")), "size": size})
cfg = put(json.dumps({"architecture": "amd64", "os": "linux",
                      "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
                      "rootfs": {"type": "layers", "diff_ids": diffs}}).encode())
man = put(json.dumps({"schemaVersion": 2,
                      "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": cfg[0], "size": cfg[1]},
                      "layers": layers}).encode())
json.dump({"schemaVersion": 2, "manifests": [{
    "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man[0], "size": man[1],
    "annotations": {"org.opencontainers.image.ref.name": name, "io.containerd.image.name": name}}]},
    open(os.path.join(oci, "index.json"), "w"))
print(layers[1]["digest"])
PY
BIG_DIGEST=$(ls -S "$W/oci/blobs/sha256" | head -1)
BIG_BYTES=$(stat -c %s "$W/oci/blobs/sha256/$BIG_DIGEST")
tar -C "$W/oci" -cf "$W/image.tar" . && rm -rf "$W/oci"
IMG_BYTES=$(stat -c %s "$W/image.tar")

start_containerd() { # case [CRI snapshotter]
    CASE=$1
    local d="$W/$CASE" disabled='disabled_plugins = ["io.containerd.grpc.v1.cri"]' cri=
    if [ -n "${2:-}" ]; then
        disabled=
        cri="[plugins.\"io.containerd.grpc.v1.cri\"]
  stream_server_address = \"127.0.0.1\"
  stream_server_port = \"0\"
  [plugins.\"io.containerd.grpc.v1.cri\".containerd]
    snapshotter = \"$2\"
  [plugins.\"io.containerd.grpc.v1.cri\".cni]
    bin_dir = \"$d/cni-bin\"
    conf_dir = \"$d/cni-conf\"
  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"$REG\"]
    endpoint = [\"http://$REG\"]"
    fi
    mkdir -p "$d/root" "$d/state"
    cat > "$d/config.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
$disabled
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd.sock.ttrpc"
[debug]
  address = "$d/containerd.sock.debug"
[proxy_plugins]
  [proxy_plugins.snapfs]
    type = "snapshot"
    address = "$d/snapfs-grpc.sock"
$cri
EOF
    containerd --config "$d/config.toml" 2>"$d/containerd.log" &
    CTD_PID=$!
    for _ in $(seq 300); do ctr_ version >/dev/null 2>&1 && return 0; sleep 0.05; done
    echo "containerd did not start" >&2; exit 1
}
stop_containerd() { clear_containers; stop_pid "$CTD_PID"; CTD_PID=; }

now() { date +%s.%N; }
# import + run: prints "import_s first_line_s"
import_and_run() { # snapshotter-args...
    sync; echo 3 > /proc/sys/vm/drop_caches
    local t0 t1 t2
    t0=$(now)
    ctr_ images import "$@" "$W/image.tar" >/dev/null || exit 1
    t1=$(now)
    ctr_ run "$@" --rm "$IMAGE" first cat /big/small.txt | head -1 >/dev/null
    t2=$(now)
    echo "$(echo "$t1 - $t0" | bc -l) $(echo "$t2 - $t0" | bc -l)"
}

start_service() { # case
    RUST_LOG=info "$SNAPFS" serve --root "$W/$1/svc" --cache-size 256M --containerd "$W/$1/snapfs-grpc.sock" \
        --containerd-address "$W/$1/containerd.sock" 2>"$W/$1/serve.log" &
    SVC_PID=$!
    for _ in $(seq 300); do [ -S "$W/$1/svc/snapfs.sock" ] && break; sleep 0.05; done
}
status() { python3 -c '
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"{\"op\":\"status\"}\n")
buf = b""
while not buf.endswith(b"\n"):
    buf += s.recv(1 << 16)
print(json.dumps(json.loads(buf)["status"]))' "$W/$CASE/svc/snapfs.sock"; }
read_big() { status | python3 -c 'import json,sys; d=sys.argv[1]; print(sum(s["bytes_read"] for s in json.load(sys.stdin)["sources"] if d in s["path"]))' "$BIG_DIGEST"; }
mib() { echo "scale=1; $1 / 1048576" | bc -l; }

# The pull rows: a local registry with the image.
REG_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REG=127.0.0.1:$REG_PORT
mkdir -p "$W/registry"
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' \
    "$W/registry/storage" "$REG" > "$W/registry/config.yml"
docker-registry serve "$W/registry/config.yml" >"$W/registry/log" 2>&1 &
REG_PID=$!
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$REG_PORT") 2>/dev/null && break; sleep 0.05; done
REMOTE=$REG/snapfs/bench:1
skopeo copy --quiet --preserve-digests --dest-tls-verify=false "oci-archive:$W/image.tar" "docker://$REMOTE" || exit 1
# pull + run: prints "pull_s first_line_s"
pull_and_run() { # snapshotter-args...
    sync; echo 3 > /proc/sys/vm/drop_caches
    local t0 t1 t2
    t0=$(now)
    "$CRI_PULL" "$W/$CASE/containerd.sock" "$REMOTE" >/dev/null || exit 1
    t1=$(now)
    ctr_ run "$@" --rm "$REMOTE" first cat /big/small.txt | head -1 >/dev/null
    t2=$(now)
    echo "$(echo "$t1 - $t0" | bc -l) $(echo "$t2 - $t0" | bc -l)"
}
NS=k8s.io
start_containerd pull-overlay overlayfs
read -r po_pull po_first < <(pull_and_run)
po_disk=$(du -sb "$W/pull-overlay/root/io.containerd.snapshotter.v1.overlayfs" | cut -f1)
stop_containerd
rm -rf "$W/pull-overlay"
mkdir -p "$W/pull-snapfs"
start_service pull-snapfs
start_containerd pull-snapfs snapfs
for _ in $(seq 100); do ctr_ snapshots --snapshotter snapfs ls >/dev/null 2>&1 && break; sleep 0.1; done
# The most scratch dirs (what containerd's differ extracts into) during the pull.
( most=0; while [ ! -e "$W/pull-snapfs/done" ]; do
    n=$(ls "$W/pull-snapfs/svc/containerd/scratch" 2>/dev/null | wc -l); [ "$n" -gt "$most" ] && most=$n
    du -sb "$W/pull-snapfs/svc/containerd/scratch" 2>/dev/null | cut -f1 >> "$W/pull-snapfs/scratch-bytes"
    sleep 0.05; done; echo "$most" > "$W/pull-snapfs/scratch-most" ) &
read -r ps_pull ps_first < <(pull_and_run --snapshotter snapfs)
touch "$W/pull-snapfs/done"; wait $!
# Bytes read while a container that read the small file runs (a removed container's
# view, and its counters, go with containerd's GC).
ctr_ run -d --snapshotter snapfs "$REMOTE" keep sh -c 'cat /big/small.txt > /dev/null; touch /tmp/read; sleep 100000' >/dev/null || exit 1
for _ in $(seq 100); do ctr_ tasks exec --exec-id probe keep test -e /tmp/read 2>/dev/null && break; sleep 0.1; done
ps_read=$(read_big)
ps_scratch_max=$(sort -n "$W/pull-snapfs/scratch-bytes" | tail -1)
ps_lazy=$(grep -c "served from its blob" "$W/pull-snapfs/serve.log")
ps_unpacked=$(grep -c "not fetched yet" "$W/pull-snapfs/serve.log")
ps_own=$(find "$W/pull-snapfs/svc" -xdev -type f -links 1 -printf '%s\n' | awk '{s += $1} END {print s + 0}')
ps_index=$(grep "$BIG_DIGEST indexed in" "$W/pull-snapfs/serve.log" | sed 's/.*indexed in \([0-9.]*\) s.*/\1/' | head -1)
stop_containerd
stop_pid "$SVC_PID"; SVC_PID=
stop_pid "$REG_PID"; REG_PID=
NS=default
CASE=
print_pull() {
    echo "| busybox + ${BIG_MB} MiB layer from a local registry (CRI pull) | overlayfs | snapfs | snapfs / overlayfs |"
    echo "|---|---|---|---|"
    printf '| CRI PullImage (s) | %.2f | %.2f | %.2f |\n' "$po_pull" "$ps_pull" "$(echo "$ps_pull / $po_pull" | bc -l)"
    printf '| pull start to first output line (s) | %.2f | %.2f | %.2f |\n' "$po_first" "$ps_first" "$(echo "$ps_first / $po_first" | bc -l)"
    printf '| snapfs: layers answered AlreadyExists (from their blobs) / unpacked by the differ | - | %s / %s | |\n' "$ps_lazy" "$ps_unpacked"
    printf '| snapfs: indexing pass over the big layer blob (s) | - | %s | |\n' "${ps_index:--}"
    printf '| bytes read from the big layer blob by one container reading its small file (MiB; blob %s MiB) | - | %s | |\n' "$(mib "$BIG_BYTES")" "$(mib "$ps_read")"
    printf '| most bytes in the differ'"'"'s scratch dirs during the pull (MiB) | - | %s | |\n' "$(mib "${ps_scratch_max:-0}")"
    printf '| unpacked bytes on disk after the pull (MiB) | %s | %s | |\n' "$(mib "$po_disk")" "$(mib "$ps_own")"
}
if [ "$ROWS" = pull ]; then
    echo
    print_pull
    exit 0
fi

# overlayfs
start_containerd overlay
read -r o_import o_first < <(import_and_run)
o_disk=$(du -sb "$W/overlay/root/io.containerd.snapshotter.v1.overlayfs" | cut -f1)
o_blobs=$(du -sb "$W/overlay/root/io.containerd.content.v1.content" | cut -f1)
stop_containerd
rm -rf "$W/overlay"

# snapfs
start_containerd snapfs
RUST_LOG=info "$SNAPFS" serve --root "$W/snapfs/svc" --cache-size 256M --containerd "$W/snapfs/snapfs-grpc.sock" \
    --containerd-address "$W/snapfs/containerd.sock" 2>"$W/snapfs/serve.log" &
SVC_PID=$!
for _ in $(seq 300); do [ -S "$W/snapfs/svc/snapfs.sock" ] && break; sleep 0.05; done
for _ in $(seq 100); do ctr_ snapshots --snapshotter snapfs ls >/dev/null 2>&1 && break; sleep 0.1; done
read -r s_import s_first < <(import_and_run --snapshotter snapfs)
# Own files of the service (blob links share the content store's inodes).
find "$W/snapfs/svc" -xdev -type f -links 1 -size +1M -printf "own file: %p %s\n" >&2
s_own=$(find "$W/snapfs/svc" -xdev -type f -links 1 -printf '%s\n' | awk '{s += $1} END {print s + 0}')
s_disk=$(du -sb "$W/snapfs/root/io.containerd.snapshotter.v1.overlayfs" 2>/dev/null | cut -f1)
s_blobs=$(du -sb "$W/snapfs/root/io.containerd.content.v1.content" | cut -f1)

# N running containers on snapfs: the service's RSS.
for i in $(seq "$N"); do
    ctr_ run -d --snapshotter snapfs "$IMAGE" "c$i" sh -c 'cat /big/small.txt >/dev/null; sleep 100000' >/dev/null || exit 1
done
read_big=$(status | python3 -c 'import json,sys; d=sys.argv[1]; print(sum(s["bytes_read"] for s in json.load(sys.stdin)["sources"] if d in s["path"]))' "$BIG_DIGEST")
views=$(status | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["views"]))')
svc_rss=$(awk '$1 == "VmRSS:" {print $2}' "/proc/$SVC_PID/status")
svc_threads=$(ls "/proc/$SVC_PID/task" | wc -l)
# The same N writable views as N snapfs mount daemons.
LAYERS=$(ls "$W"/snapfs/svc/containerd/layers/sha256-* | grep -v snapfs-idx)
L1=
L2=
for l in $LAYERS; do case "$l" in *"$BIG_DIGEST"*) L2=$l ;; *) [ "$(stat -c %s "$l")" -gt 10240 ] && L1=$l ;; esac; done
d_rss=0
for i in $(seq "$N"); do
    mkdir -p "$W/d/v$i"
    "$SNAPFS" mount --cache-size 256M --upper "$W/d/u$i" "$L1" "$L2" "$W/d/v$i" || exit 1
    cat "$W/d/v$i/big/small.txt" >/dev/null
done
for p in $("$SNAPFS" list | awk -F'\t' -v w="$W/d/v" 'index($1, w) == 1 { print $2 }' | sort -u); do
    d_rss=$((d_rss + $(awk '$1 == "VmRSS:" {print $2}' "/proc/$p/status")))
done
for i in $(seq "$N"); do "$SNAPFS" umount "$W/d/v$i" >/dev/null; done
stop_containerd
stop_pid "$SVC_PID"; SVC_PID=

# The one indexing pass over the big layer blob (in the background of the unpack).
index_s=$(grep "$BIG_DIGEST indexed in" "$W/snapfs/serve.log" | sed 's/.*indexed in \([0-9.]*\) s.*/\1/' | head -1)
echo
echo "| busybox + ${BIG_MB} MiB layer, image $(mib "$IMG_BYTES") MiB | overlayfs | snapfs | snapfs / overlayfs |"
echo "|---|---|---|---|"
printf '| ctr image import (s) | %.2f | %.2f | %.2f |\n' "$o_import" "$s_import" "$(echo "$s_import / $o_import" | bc -l)"
printf '| import start to first output line (s) | %.2f | %.2f | %.2f |\n' "$o_first" "$s_first" "$(echo "$s_first / $o_first" | bc -l)"
printf '| first output after the import (s) | %.2f | %.2f | |\n' "$(echo "$o_first - $o_import" | bc -l)" "$(echo "$s_first - $s_import" | bc -l)"
printf '| snapfs: indexing pass over the big layer blob, beside the differ (s) | - | %s | |\n' "${index_s:--}"
printf '| bytes read from the big layer blob by %s containers reading its small file (MiB; blob %s MiB) | - | %s | |\n' "$N" "$(mib "$BIG_BYTES")" "$(mib "$read_big")"
printf '| unpacked bytes on disk (MiB) | %s | %s | |\n' "$(mib "$o_disk")" "$(mib "$(( ${s_disk:-0} + s_own ))")"
printf '| content store blobs (MiB) | %s | %s | |\n' "$(mib "$o_blobs")" "$(mib "$s_blobs")"
printf '| RSS, %s running containers: one service (%s views, %s threads) vs %s snapfs mount daemons (MiB) | - | %s vs %s | %.3f |\n' \
    "$N" "$views" "$svc_threads" "$N" "$(echo "scale=1; $svc_rss / 1024" | bc -l)" "$(echo "scale=1; $d_rss / 1024" | bc -l)" "$(echo "$svc_rss / $d_rss" | bc -l)"
echo
print_pull
