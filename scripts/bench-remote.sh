#!/usr/bin/env bash
# Remote-source benchmark (issue 13): moto's S3 server and nginx inside a network
# namespace whose loopback has `tc netem` delay (10 ms each way: a 20 ms round trip),
# a snapfs-written snapshot of SIZE_MB MiB and a foreign tar.gz of many small files,
# then:
#   - mount time of the snapshot (only its index is fetched), time to first byte;
#   - sequential read throughput vs curl of the whole object;
#   - random 4 KiB reads per second;
#   - first mount of the foreign tar.gz vs a local cold `snapfs index` of it;
#   - the same with ratarmount (fsspec/s3fs, FSSPEC_S3_ENDPOINT_URL) if it is installed.
# moto copies the whole object for every range request (its keys are Python byte
# strings), so on a 1 GiB object each request costs a second or so whatever the client:
# the read numbers (TTFB, sequential, random) are taken over http:// from nginx, which
# serves ranges as a real object store does; the S3 numbers are mount times, the
# upload, and the foreign tar.gz.
# Needs root, iproute2 (ip, tc), python3 with moto[server], curl; ratarmount and s3fs
# optional (pip install ratarmount s3fs).
#
#   bash scripts/bench-remote.sh              # 1 GiB snapshot, 100k-file tar.gz
#   SIZE_MB=128 FILES=10000 bash scripts/bench-remote.sh   # smoke
#
# Knobs: SIZE_MB=1024, FILES=100000, DELAY_MS=10 (one way), RAND_SECS=15, WORK=dir,
# KEEP=1, SNAPFS=path (default: cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${SIZE_MB:-1024}
FILES=${FILES:-100000}
DELAY_MS=${DELAY_MS:-10}
RAND_SECS=${RAND_SECS:-15}
KEEP=${KEEP:-0}

if [ "${1:-}" != inner ]; then
    if [ -z "${SNAPFS:-}" ]; then
        cargo build --release -q
        SNAPFS=$PWD/target/release/snapfs
    fi
    export SNAPFS SIZE_MB FILES DELAY_MS RAND_SECS KEEP
    NS=snapfs-bench-$$
    ip netns add "$NS"
    trap 'ip netns del "$NS" 2>/dev/null || true' EXIT
    ip netns exec "$NS" ip link set lo up
    if ip netns exec "$NS" tc qdisc add dev lo root netem delay "${DELAY_MS}ms" 2>/dev/null; then
        export NETEM=1
    else
        # Kernels without sch_netem (CONFIG_NET_SCH_NETEM unset): a userspace proxy in
        # front of each server delays every chunk DELAY_MS in each direction instead.
        echo "tc netem is not available in this kernel; delaying in a userspace proxy" >&2
        export NETEM=0
    fi
    # nsenter enters only the network namespace: mounts stay in ours.
    nsenter --net="/run/netns/$NS" -- bash "$0" inner
    exit $?
fi

W=${WORK:-$(mktemp -d /var/tmp/snapfs-bench-remote.XXXXXX)}
mkdir -p "$W/mnt"
export XDG_CACHE_HOME=$W/cache
SPORT=$((20000 + RANDOM % 20000))   # moto
NSPORT=$((SPORT + 1))                 # nginx
if [ "$NETEM" = 1 ]; then PORT=$SPORT NPORT=$NSPORT; else PORT=$((SPORT + 2)) NPORT=$((SPORT + 3)); fi
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ALLOW_HTTP=true
export FSSPEC_S3_ENDPOINT_URL=$AWS_ENDPOINT_URL
MOTO_PID=
PROXY_PIDS=
RATAR_PID=
NGINX_PID=
is_mounted() { awk -v m="$1" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }
cleanup() {
    for m in "$W"/mnt/*; do
        if is_mounted "$m"; then "$SNAPFS" umount "$m" 2>/dev/null || fusermount3 -u "$m" 2>/dev/null || umount -l "$m" || true; fi
    done
    [ -n "$RATAR_PID" ] && kill "$RATAR_PID" 2>/dev/null || true
    [ -n "$MOTO_PID" ] && kill "$MOTO_PID" 2>/dev/null || true
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null || true
    for p in $PROXY_PIDS; do kill "$p" 2>/dev/null || true; done
    [ "$KEEP" = 1 ] || rm -rf "$W"
}
trap cleanup EXIT
now() { echo "$EPOCHREALTIME"; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
say() { printf '%-58s %s\n' "$1" "$2" | tee -a "$W/report.txt"; }


delay_proxy() { # LISTEN_PORT TARGET_PORT
    python3 - "$1" "$2" "$DELAY_MS" <<'EOF' &
import asyncio, sys
listen, target, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000
async def pipe(r, w):
    loop = asyncio.get_running_loop(); q = asyncio.Queue()
    async def send():
        while True:
            t, data = await q.get()
            wait = t - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                w.close(); return
            w.write(data); await w.drain()
    task = asyncio.create_task(send())
    try:
        while True:
            data = await r.read(1 << 18)
            q.put_nowait((loop.time() + delay, data))
            if not data:
                break
    except Exception:
        q.put_nowait((0, b""))
    await task
async def conn(cr, cw):
    try:
        ur, uw = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        cw.close(); return
    await asyncio.gather(pipe(cr, uw), pipe(ur, cw), return_exceptions=True)
async def main():
    srv = await asyncio.start_server(conn, "127.0.0.1", listen)
    await srv.serve_forever()
asyncio.run(main())
EOF
    PROXY_PIDS+=" $!"
}
PROXY_PIDS=
if [ "$NETEM" != 1 ]; then delay_proxy "$PORT" "$SPORT"; delay_proxy "$NPORT" "$NSPORT"; fi
python3 -m moto.server -H 127.0.0.1 -p "$SPORT" >"$W/moto.log" 2>&1 &
MOTO_PID=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.1; done
python3 - <<EOF
import boto3
boto3.client('s3', endpoint_url='$AWS_ENDPOINT_URL').create_bucket(Bucket='bench')
EOF
t0=$(now); curl -s -o /dev/null "http://127.0.0.1:$PORT/bench"; t1=$(now)
echo "one HTTP request round trip to moto (netem=$NETEM, ${DELAY_MS} ms each way): $(secs "$t0" "$t1") s" | tee "$W/report.txt"

echo "generating $SIZE_MB MiB of files and $FILES small files in $W ..." >&2
python3 - "$W" "$SIZE_MB" "$FILES" <<'EOF'
import os, sys
w, size_mb, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
big = os.path.join(w, "big"); os.makedirs(big)
for i in range(size_mb // 4):
    with open(os.path.join(big, f"f{i:05d}"), "wb") as f:
        f.write(os.urandom(4 << 20))
small = os.path.join(w, "small")
for i in range(files):
    d = os.path.join(small, f"d{i // 1000:03d}"); os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
        f.write(os.urandom(64) * (1 + i % 16))
EOF
t0=$(now)
# moto assembles a 1 GiB multipart upload slowly: a generous request timeout.
SNAPFS_REMOTE_TIMEOUT=600 "$SNAPFS" create "$W/big" -o s3://bench/snap.tar >/dev/null
say "create -o s3:// ($SIZE_MB MiB tar, multipart upload)" "$(secs "$t0" "$(now)") s"
tar -C "$W/small" -cf - . | pigz -p 2 >"$W/small.tar.gz"
python3 - <<EOF
import boto3
boto3.client('s3', endpoint_url='$AWS_ENDPOINT_URL').upload_file('$W/small.tar.gz', 'bench', 'small.tar.gz')
EOF
rm -rf "$W/small"

# nginx serves the same snapshot over http:// (ranges without copying the object).
mkdir -p "$W/www" "$W/nginx"
"$SNAPFS" create "$W/big" -o "$W/www/snap.tar" >/dev/null
cat >"$W/nginx/nginx.conf" <<EOF
daemon off; master_process off; pid $W/nginx/nginx.pid; error_log $W/nginx/error.log;
events { worker_connections 256; }
http { access_log off; client_body_temp_path $W/nginx/b; proxy_temp_path $W/nginx/p;
  fastcgi_temp_path $W/nginx/f; uwsgi_temp_path $W/nginx/u; scgi_temp_path $W/nginx/s;
  server { listen 127.0.0.1:$NSPORT; root $W/www; } }
EOF
nginx -p "$W/nginx" -c "$W/nginx/nginx.conf" &
NGINX_PID=$!
for _ in $(seq 100); do curl -s -o /dev/null -r 0-0 "http://127.0.0.1:$NPORT/snap.tar" && break; sleep 0.1; done
rm -rf "$W/big"

M=$W/mnt/snap
mkdir -p "$M"
drop
t0=$(now); "$SNAPFS" mount s3://bench/snap.tar "$M"; t1=$(now)
say "snapfs mount s3:// snapshot (cold, index only; moto)" "$(secs "$t0" "$t1") s"
"$SNAPFS" umount "$M"

URL=http://127.0.0.1:$NPORT/snap.tar
t0=$(now); curl -s -o /dev/null "$URL"; t1=$(now)
curl_s=$(secs "$t0" "$t1")
curl_mbs=$(python3 -c "print(f'{$SIZE_MB * 1.048576 / $curl_s:.0f}')")
say "curl whole object" "$curl_s s ($curl_mbs MB/s)"

drop
t0=$(now); "$SNAPFS" mount "$URL" "$M"; t1=$(now)
say "snapfs mount http:// snapshot (cold, index only; nginx)" "$(secs "$t0" "$t1") s"
t0=$(now); head -c1 "$M/f00007" >/dev/null; t1=$(now)
say "snapfs time to first byte (one file)" "$(secs "$t0" "$t1") s"
t0=$(now); cat "$M"/f* >/dev/null; t1=$(now)
seq_s=$(secs "$t0" "$t1")
seq_mbs=$(python3 -c "print(f'{$SIZE_MB * 1.048576 / $seq_s:.0f}')")
say "snapfs sequential read of all files" "$seq_s s ($seq_mbs MB/s, $(python3 -c "print(f'{$seq_mbs / $curl_mbs:.2f}')")x curl)"
"$SNAPFS" umount "$M"

randread() {
    python3 - "$1" "$RAND_SECS" <<'EOF'
import os, random, sys, time
root, secs = sys.argv[1], float(sys.argv[2])
files = [os.path.join(root, f) for f in sorted(os.listdir(root))]
fds = [os.open(f, os.O_RDONLY) for f in files]
size = os.fstat(fds[0]).st_size
rnd = random.Random(7); n = 0; end = time.time() + secs
while time.time() < end:
    os.pread(rnd.choice(fds), 4096, rnd.randrange(size // 4096) * 4096); n += 1
print(f"{n / secs:.0f}")
EOF
}
drop
"$SNAPFS" mount "$URL" "$M"
iops=$(randread "$M")
say "snapfs random 4 KiB reads (one reader)" "$iops IOPS"
"$SNAPFS" umount "$M"

# A foreign tar.gz: the first mount indexes it in one streaming pass.
F=$W/mnt/small
mkdir -p "$F"
rm -rf "$XDG_CACHE_HOME"
t0=$(now); "$SNAPFS" mount s3://bench/small.tar.gz "$F"; t1=$(now)
say "snapfs first mount of s3:// foreign tar.gz ($FILES files)" "$(secs "$t0" "$t1") s"
"$SNAPFS" umount "$F"
rm -rf "$XDG_CACHE_HOME"
t0=$(now); "$SNAPFS" index "$W/small.tar.gz" >/dev/null; t1=$(now)
say "snapfs local cold index of the same tar.gz" "$(secs "$t0" "$t1") s"

if command -v ratarmount >/dev/null 2>&1 && python3 -c 'import s3fs' 2>/dev/null; then
    R=$W/mnt/ratar
    mkdir -p "$R"
    drop
    t0=$(now)
    ratarmount -f --index-folders "$W/ratar-idx" "$URL" "$R" >"$W/ratar.log" 2>&1 &
    RATAR_PID=$!
    while ! is_mounted "$R"; do sleep 0.05; kill -0 "$RATAR_PID" 2>/dev/null || break; done
    t1=$(now)
    say "ratarmount mount http:// snapshot (first)" "$(secs "$t0" "$t1") s"
    t0=$(now); head -c1 "$R/f00007" >/dev/null; t1=$(now)
    say "ratarmount time to first byte" "$(secs "$t0" "$t1") s"
    riops=$(randread "$R")
    say "ratarmount random 4 KiB reads" "$riops IOPS (snapfs $(python3 -c "print(f'{$iops / max($riops, 1):.1f}')")x)"
    t0=$(now); cat "$R"/f* >/dev/null; t1=$(now)
    say "ratarmount sequential read of all files" "$(secs "$t0" "$t1") s"
    fusermount3 -u "$R" || umount -l "$R"; wait "$RATAR_PID" || true; RATAR_PID=
    rm -rf "$W/ratar-idx"
    t0=$(now)
    ratarmount -f --index-folders "$W/ratar-idx" s3://bench/small.tar.gz "$R" >"$W/ratar2.log" 2>&1 &
    RATAR_PID=$!
    while ! is_mounted "$R"; do sleep 0.1; kill -0 "$RATAR_PID" 2>/dev/null || break; done
    t1=$(now)
    say "ratarmount first mount of the foreign tar.gz" "$(secs "$t0" "$t1") s"
    fusermount3 -u "$R" || umount -l "$R"; wait "$RATAR_PID" || true; RATAR_PID=
else
    say "ratarmount" "not installed (pip install ratarmount s3fs); skipped"
fi
echo "report: $W/report.txt" >&2
cat "$W/report.txt"
