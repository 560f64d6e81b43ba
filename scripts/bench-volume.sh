#!/usr/bin/env bash
# Restore of a Docker volume from a snapshot, three ways, in one run on one machine
# (issue 14): a 1 GiB snapshot and a 100,000-file snapshot, each restored into a
# new container's /data by
#   (a) docker cp (the archive API) into a local volume,
#   (b) tar -xzf into a local volume's directory,
#   (c) a snapfs volume (docker volume create -d snapfs -o snapshot=...),
# timed from the start of the restore until the container has read its first file,
# and until it has read every file. Then a snapshot of a changed volume (one file
# changed): snapfs volume snapshot (a delta) against docker cp out of the container
# plus gzip (pigz). Prints a markdown table.
#
# Starts its own dockerd (Debian's docker.io: own data root, exec root, socket, pid
# file, --bridge=none --iptables=false) and its own snapfs service with a plugin
# socket named snapfs-bench-PID; stops both by pid. ROOT ONLY.
#
# usage: scripts/bench-volume.sh [WORKDIR]   (default /var/tmp/snapfs-bench-volume)
#   BIG_MB=1024 FILES=100000 to change the corpus sizes.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/var/tmp/snapfs-bench-volume}
BIG_MB=${BIG_MB:-1024}
FILES=${FILES:-100000}
DOCKERD=/usr/sbin/dockerd
DOCKER_BIN=/usr/bin/docker
[ "$(id -u)" -eq 0 ] || { echo "bench-volume.sh: run as root" >&2; exit 2; }
for t in "$DOCKERD" "$DOCKER_BIN" pigz busybox python3; do
  command -v "$t" >/dev/null || { echo "bench-volume.sh: $t missing" >&2; exit 2; }
done

cargo build --release --quiet --manifest-path "$REPO/Cargo.toml"
SNAPFS=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/snapfs

mkdir -p "$W"
W=$(cd "$W" && pwd)
PLUGIN=snapfs-bench-$$
SOCK=$W/docker.sock
D() { "$DOCKER_BIN" -H "unix://$SOCK" "$@"; }
now() { date +%s.%N; }
secs() { python3 -c "import sys; print('%.3f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$2"; }

DPID= SPID=
cleanup() {
  set +e
  if [ -n "$DPID" ]; then
    for v in $(D volume ls -q 2>/dev/null); do D rm -f $(D ps -aq --filter volume="$v") >/dev/null 2>&1; D volume rm "$v" >/dev/null 2>&1; done
  fi
  [ -n "$SPID" ] && kill "$SPID" 2>/dev/null && wait "$SPID" 2>/dev/null
  if [ -n "$DPID" ]; then
    CPID=$(cat "$W/exec/containerd/containerd.pid" 2>/dev/null)
    kill "$DPID" 2>/dev/null; wait "$DPID" 2>/dev/null
    [ -n "$CPID" ] && kill "$CPID" 2>/dev/null
  fi
  grep -o " $W/[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -f "/run/docker/plugins/$PLUGIN.sock"
}
trap cleanup EXIT

# ---------------------------------------------------------------- corpora
if [ ! -f "$W/big.tar.gz" ]; then
  echo "generating the ${BIG_MB} MiB corpus" >&2
  mkdir -p "$W/big/data"
  [ -f "$W/big/data/big.dat" ] || python3 "$REPO/scripts/bench-gen.py" big "$W/big/data/big.dat" "$BIG_MB"
  echo "first file" > "$W/big/first.txt"
  "$SNAPFS" create "$W/big" -o "$W/big.tar.gz" >&2
  rm -rf "$W/big"
fi
if [ ! -f "$W/many.tar.gz" ]; then
  echo "generating the $FILES-file corpus" >&2
  if [ ! -d "$W/many/tree" ]; then
    rm -rf "$W/many" && mkdir -p "$W/many"
    python3 "$REPO/scripts/bench-gen.py" small "$W/many.tar" "$FILES"
    tar -C "$W/many" -xf "$W/many.tar" && rm -f "$W/many.tar"
  fi
  echo "first file" > "$W/many/first.txt"
  "$SNAPFS" create "$W/many" -o "$W/many.tar.gz" >&2
  rm -rf "$W/many"
fi

# ---------------------------------------------------------------- daemons
rm -rf "$W/svc" "$W/data" "$W/exec" "$W/out"
mkdir -p "$W/out"
RUST_LOG=warn "$SNAPFS" serve --root "$W/svc" --docker-plugin "$PLUGIN" 2>"$W/svc.log" &
SPID=$!
"$DOCKERD" --data-root "$W/data" --exec-root "$W/exec" -H "unix://$SOCK" --pidfile "$W/dockerd.pid" \
  --bridge=none --iptables=false >"$W/dockerd.log" 2>&1 &
DPID=$!
for _ in $(seq 1 120); do D version >/dev/null 2>&1 && break; sleep 0.5; done
D version >/dev/null
for _ in $(seq 1 120); do [ -S "/run/docker/plugins/$PLUGIN.sock" ] && break; sleep 0.5; done
mkdir -p "$W/rootfs/bin"
cp "$(command -v busybox)" "$W/rootfs/bin/busybox"
ln -sf busybox "$W/rootfs/bin/sh"
tar -C "$W/rootfs" -cf "$W/rootfs.tar" . && D import "$W/rootfs.tar" snapfs-bench-bb:1 >/dev/null

# The container reads /data/first.txt, says F, reads every file, says A.
READ='cat /data/first.txt >/dev/null; echo F; find /data -type f -exec cat {} + >/dev/null; echo A'
# Runs "$@" (a container printing F and A); sets T_F and T_A (wall clock at each line).
stamp() {
  T_F= T_A=
  while read -r line; do
    case $line in F) T_F=$(now) ;; A) T_A=$(now) ;; esac
  done < <("$@")
}

declare -A R
bench() { # NAME SNAPSHOT
  local n=$1 snap=$2 t0 tr
  # (a) docker cp into a local volume.
  D volume create "$n-a" >/dev/null
  D create --name "$n-a" --network none -v "$n-a:/data" snapfs-bench-bb:1 /bin/busybox sh -c "$READ" >/dev/null
  sync  # every way starts with no dirty pages of the one before
  t0=$(now)
  D cp - "$n-a:/data" < "$snap"
  tr=$(now)
  stamp D start -a "$n-a"
  R[$n,a,restore]=$(secs "$t0" "$tr"); R[$n,a,first]=$(secs "$t0" "$T_F"); R[$n,a,all]=$(secs "$t0" "$T_A")
  # (b) tar -xzf into a local volume's directory.
  sync
  t0=$(now)
  D volume create "$n-b" >/dev/null
  tar -xzf "$snap" -C "$(D volume inspect -f '{{.Mountpoint}}' "$n-b")"
  tr=$(now)
  stamp D run --rm --network none -v "$n-b:/data" snapfs-bench-bb:1 /bin/busybox sh -c "$READ"
  R[$n,b,restore]=$(secs "$t0" "$tr"); R[$n,b,first]=$(secs "$t0" "$T_F"); R[$n,b,all]=$(secs "$t0" "$T_A")
  # (c) a snapfs volume.
  sync
  t0=$(now)
  D volume create -d "$PLUGIN" -o "snapshot=$snap" -o writable=true "$n-c" >/dev/null
  tr=$(now)
  stamp D run --rm --network none -v "$n-c:/data" snapfs-bench-bb:1 /bin/busybox sh -c "$READ"
  R[$n,c,restore]=$(secs "$t0" "$tr"); R[$n,c,first]=$(secs "$t0" "$T_F"); R[$n,c,all]=$(secs "$t0" "$T_A")
  # Container start alone (the floor of every "first read").
  sync
  t0=$(now)
  stamp D run --rm --network none snapfs-bench-bb:1 /bin/busybox sh -c 'echo F; echo A'
  R[$n,start]=$(secs "$t0" "$T_F")

  # Snapshot of a changed volume: one file changed.
  D run --rm --network none -v "$n-c:/data" snapfs-bench-bb:1 /bin/busybox sh -c 'echo changed >> /data/first.txt'
  D run --rm --network none -v "$n-a:/data" snapfs-bench-bb:1 /bin/busybox sh -c 'echo changed >> /data/first.txt'
  sync
  t0=$(now)
  "$SNAPFS" volume --root "$W/svc" snapshot "$n-c" -o "$W/out/$n-delta.tar.gz" >/dev/null
  R[$n,snap,delta]=$(secs "$t0" "$(now)")
  R[$n,snap,delta_bytes]=$(stat -c %s "$W/out/$n-delta.tar.gz")
  t0=$(now)
  "$SNAPFS" volume --root "$W/svc" snapshot "$n-c" --full -o "$W/out/$n-full.tar.gz" >/dev/null
  R[$n,snap,full]=$(secs "$t0" "$(now)")
  t0=$(now)
  D cp "$n-a:/data" - | pigz > "$W/out/$n-cp.tar.gz"
  R[$n,snap,cp]=$(secs "$t0" "$(now)")
  R[$n,snap,cp_bytes]=$(stat -c %s "$W/out/$n-cp.tar.gz")
  D rm -f "$n-a" >/dev/null
  for v in a b c; do D volume rm "$n-$v" >/dev/null; done
  rm -f "$W/out/$n-"*
}

# Warm the page cache with both snapshots, so every way starts equal.
cat "$W/big.tar.gz" "$W/many.tar.gz" > /dev/null
bench big "$W/big.tar.gz"
bench many "$W/many.tar.gz"

ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.0f' % (a/b) if b > 0 else '-')" "$1" "$2"; }
echo
echo "Machine: $(nproc) cores, $(uname -r), $(D version -f '{{.Server.Version}}'); snapshots: big.tar.gz $(stat -c %s "$W/big.tar.gz") bytes (${BIG_MB} MiB in 2 files), many.tar.gz $(stat -c %s "$W/many.tar.gz") bytes ($FILES files)"
echo
echo "| snapshot | way | restore done (s) | first file read (s) | all read (s) | first read: (a)/(c), (b)/(c) | restore: (a)/(c), (b)/(c) |"
echo "|---|---|---:|---:|---:|---:|---:|"
for n in big many; do
  for w in a b c; do
    case $w in a) label="(a) docker cp" ;; b) label="(b) tar -xzf" ;; c) label="(c) snapfs volume" ;; esac
    extra1= extra2=
    if [ $w = c ]; then
      extra1="$(ratio "${R[$n,a,first]}" "${R[$n,c,first]}")×, $(ratio "${R[$n,b,first]}" "${R[$n,c,first]}")×"
      extra2="$(ratio "${R[$n,a,restore]}" "${R[$n,c,restore]}")×, $(ratio "${R[$n,b,restore]}" "${R[$n,c,restore]}")×"
    fi
    echo "| $n | $label | ${R[$n,$w,restore]} | ${R[$n,$w,first]} | ${R[$n,$w,all]} | $extra1 | $extra2 |"
  done
done
echo
echo "Container start alone (docker run of busybox, no volume): big run ${R[big,start]} s, many run ${R[many,start]} s."
echo
echo "| snapshot of a changed volume (1 file) | snapfs delta (s) | delta bytes | snapfs --full (s) | docker cp out + pigz (s) | cp+pigz bytes | ratio cp / delta |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for n in big many; do
  echo "| $n | ${R[$n,snap,delta]} | ${R[$n,snap,delta_bytes]} | ${R[$n,snap,full]} | ${R[$n,snap,cp]} | ${R[$n,snap,cp_bytes]} | $(ratio "${R[$n,snap,cp]}" "${R[$n,snap,delta]}")× |"
done
