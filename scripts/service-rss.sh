#!/usr/bin/env bash
# Memory of N views: one `snapfs serve` with N views against N `snapfs mount` daemons
# serving the same views (issue 12). Needs root, FUSE, python3. Prints a markdown table.
#
#   bash scripts/service-rss.sh            # N=50 views of one small tar.gz
#   N=20 WRITABLE=1 bash scripts/service-rss.sh   # every view with its own upper dir
#
# Each view reads every file of the archive once, then the RSS (VmRSS) and PSS
# (smaps_rollup: shared pages split between the processes that map them) of the
# service, and the sums over the daemons, are taken. Both use --cache-size 256M and
# 8 FUSE threads per view. Everything is unmounted and the work dir removed at exit.
set -uo pipefail
cd "$(dirname "$0")/.."
N=${N:-50}
WRITABLE=${WRITABLE:-0}
SNAPFS=${SNAPFS:-}
if [ -z "$SNAPFS" ]; then
    cargo build --release --quiet || exit 1
    SNAPFS=$PWD/target/release/snapfs
fi
W=$(mktemp -d /var/tmp/snapfs-service-rss.XXXXXX)
SERVICE_PID=
cleanup() {
    [ -n "$SERVICE_PID" ] && kill "$SERVICE_PID" 2>/dev/null && wait "$SERVICE_PID" 2>/dev/null
    for m in "$W"/v*; do
        awk -v m="$m" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo &&
            "$SNAPFS" umount "$m" >/dev/null 2>&1
        awk -v m="$m" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo &&
            umount -l "$m" 2>/dev/null
    done
    rm -rf "$W"
}
trap cleanup EXIT

# A small tree: 200 files of 1-20 KiB in 10 dirs, plus one of 2 MiB.
python3 - "$W/src" <<'PY'
import os, random, sys
root = sys.argv[1]
r = random.Random(12)
words = [bytes(r.choice(b"etaoinshrdlu") for _ in range(r.randint(2, 9))) for _ in range(500)]
def text(n):
    out = bytearray()
    while len(out) < n:
        out += r.choice(words) + b" "
    return bytes(out[:n])
for i in range(200):
    d = os.path.join(root, f"d{i % 10}")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, f"f{i:03}"), "wb").write(text(r.randint(1024, 20480)))
open(os.path.join(root, "big"), "wb").write(text(2 << 20))
PY
tar -C "$W/src" -czf "$W/a.tar.gz" .
"$SNAPFS" index "$W/a.tar.gz" >/dev/null || exit 1

readall() { find "$1" -type f -exec cat {} + >/dev/null; }
kb() { awk -v f="$2:" '$1 == f { print $2 }' "$3" 2>/dev/null; }
rss() { kb x VmRSS "/proc/$1/status"; }
pss() { kb x Pss "/proc/$1/smaps_rollup"; }
upper_args() { [ "$WRITABLE" = 1 ] && echo "--upper $W/u$1-$2"; }

# One service, N views.
"$SNAPFS" serve --root "$W/root" --cache-size 256M 2>"$W/serve.log" &
SERVICE_PID=$!
for _ in $(seq 200); do "$SNAPFS" list --service "$W/root/snapfs.sock" >/dev/null 2>&1 && break; sleep 0.05; done
idle_rss=$(rss "$SERVICE_PID")
for i in $(seq "$N"); do
    mkdir -p "$W/v$i"
    # shellcheck disable=SC2046
    "$SNAPFS" mount --service "$W/root/snapfs.sock" $(upper_args s "$i") "$W/a.tar.gz" "$W/v$i" || exit 1
done
for i in $(seq "$N"); do readall "$W/v$i"; done
svc_rss=$(rss "$SERVICE_PID")
svc_pss=$(pss "$SERVICE_PID")
svc_hwm=$(kb x VmHWM "/proc/$SERVICE_PID/status")
svc_threads=$(ls "/proc/$SERVICE_PID/task" | wc -l)
kill "$SERVICE_PID"
wait "$SERVICE_PID"
SERVICE_PID=

# N daemons.
for i in $(seq "$N"); do
    # shellcheck disable=SC2046
    "$SNAPFS" mount --cache-size 256M $(upper_args d "$i") "$W/a.tar.gz" "$W/v$i" || exit 1
done
for i in $(seq "$N"); do readall "$W/v$i"; done
pids=$("$SNAPFS" list | awk -F'\t' -v w="$W/v" 'index($1, w) == 1 { print $2 }' | sort -u)
d_rss=0; d_pss=0; d_n=0
for p in $pids; do
    d_rss=$((d_rss + $(rss "$p"))); d_pss=$((d_pss + $(pss "$p"))); d_n=$((d_n + 1))
done
for i in $(seq "$N"); do "$SNAPFS" umount "$W/v$i" >/dev/null || exit 1; done

echo "| $N views of a $(du -k "$W/a.tar.gz" | cut -f1) KiB tar.gz$([ "$WRITABLE" = 1 ] && echo ', each writable') | RSS (MiB) | PSS (MiB) |"
echo "|---|---|---|"
printf '| one service (idle before the views: %.1f MiB; VmHWM %.1f MiB; %s threads) | %.1f | %.1f |\n' \
    "$(echo "$idle_rss/1024" | bc -l)" "$(echo "$svc_hwm/1024" | bc -l)" "$svc_threads" \
    "$(echo "$svc_rss/1024" | bc -l)" "$(echo "$svc_pss/1024" | bc -l)"
printf '| %s snapfs mount daemons (sum) | %.1f | %.1f |\n' "$d_n" \
    "$(echo "$d_rss/1024" | bc -l)" "$(echo "$d_pss/1024" | bc -l)"
