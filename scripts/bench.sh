#!/usr/bin/env bash
# Bounded-time comparison of snapfs with ratarmount and the local disk, printing a
# markdown report. Needs root (drop_caches, mounts), FUSE, fio, pigz, pzstd, python3;
# installs ratarmount with pip if missing (its columns are skipped if that fails).
#
#   bash scripts/bench.sh                 # full run: 1 GiB file, 100k small files (~8 min)
#   BIG_MB=64 SMALL_FILES=2000 RUNTIME=3 bash scripts/bench.sh   # smoke (~1.5 min)
#
# Knobs (environment):
#   BIG_MB=1024        size of the big semi-compressible file (gzip ratio ~2.7x)
#   SMALL_FILES=100000 small files (0-16 KiB, skewed small) over SMALL_FILES/100 dirs
#   RUNTIME=10         seconds per fio run (seq stops earlier at end of file)
#   NUMJOBS=1          fio random-read jobs
#   REPS=5             repetitions of the warm-mount timing (median reported)
#   WORK=/tmp/...      work dir (default: a new mktemp dir under /var/tmp, removed at exit)
#   KEEP=1             keep the work dir
#   OUT=file.md        also write the report there
#   SNAPFS=path        snapfs binary (default: cargo build --release, target/release/snapfs)
#
# The corpus is deterministic (seeded PRNG): words from a fixed 2048-word vocabulary.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

BIG_MB=${BIG_MB:-1024}
SMALL_FILES=${SMALL_FILES:-100000}
RUNTIME=${RUNTIME:-10}
NUMJOBS=${NUMJOBS:-1}
REPS=${REPS:-5}
KEEP=${KEEP:-0}
OUT=${OUT:-}

if [[ -z ${SNAPFS:-} ]]; then
    SNAPFS=$REPO/target/release/snapfs
    if ! cargo build --release --quiet; then
        [[ -x $SNAPFS ]] || { echo "cargo build --release failed" >&2; exit 1; }
        echo "bench.sh: cargo build --release failed; using the existing $SNAPFS" >&2
        SNAPFS_STALE=1
    fi
fi
for tool in fio pigz pzstd zstd gzip python3 tar fusermount3; do
    command -v "$tool" >/dev/null || { echo "bench.sh needs $tool" >&2; exit 1; }
done

if [[ -n ${WORK:-} ]]; then
    W=$WORK
    mkdir -p "$W"
else
    W=$(mktemp -d /var/tmp/snapfs-bench.XXXXXX)
fi
: >"$W/results.tsv"
: >"$W/notes.txt"
# shellcheck source=scripts/bench-lib.sh
source "$REPO/scripts/bench-lib.sh"
# A private copy: a concurrent cargo build must not swap the binary mid-run.
cp "$SNAPFS" "$W/snapfs" || { echo "cannot copy $SNAPFS" >&2; exit 1; }
# and the executable it hands serve, volume and remote objects to, where there is one
if [[ -x $(dirname "$SNAPFS")/snapfs-net ]]; then cp "$(dirname "$SNAPFS")/snapfs-net" "$W/snapfs-net"; fi
SNAPFS=$W/snapfs

cleanup() {
    unmount_all
    if [[ $KEEP == 1 || -n ${WORK:-} ]]; then
        log "work dir kept: $W"
    else
        rm -rf "$W"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
# Every mount gets a mountpoint of its own: a snapfs daemon that is still exiting after
# its unmount can unmount a newer mount on the same path (seen with snapfs at 4a4fdd9).

RAT=1
if ! command -v ratarmount >/dev/null; then
    log "installing ratarmount with pip"
    pip install --quiet ratarmount >/dev/null 2>&1 || true
    hash -r
    command -v ratarmount >/dev/null || { RAT=0; note "ratarmount is not installed and pip install failed: ratarmount columns skipped"; }
fi

# ---------------------------------------------------------------- corpus
log "generating corpus in $W (BIG_MB=$BIG_MB SMALL_FILES=$SMALL_FILES)"
cp "$REPO/scripts/bench-gen.py" "$W/gen.py"
t0=$(now)
mkdir -p "$W/src/data" "$W/native" "$W/small-native" "$W/mnt"
python3 "$W/gen.py" big "$W/src/data/big.dat" "$BIG_MB" || { echo "corpus generation failed" >&2; exit 1; }
tar -C "$W/src" --owner=0 --group=0 --numeric-owner --mtime=@1700000000 -cf "$W/big.tar" data
rm -rf "$W/src"
python3 "$W/gen.py" small "$W/small.tar" "$SMALL_FILES" || { echo "corpus generation failed" >&2; exit 1; }
for b in big small; do
    pigz -c "$W/$b.tar" >"$W/$b.tar.gz"
    pzstd -q -3 -c "$W/$b.tar" >"$W/$b.tar.zst"
done
# "native": the archives extracted to local disk.
tar -C "$W/native" -xf "$W/big.tar"
tar -C "$W/small-native" -xf "$W/small.tar"
BIGFILE=data/big.dat
for f in big.tar big.tar.gz big.tar.zst small.tar small.tar.gz small.tar.zst; do
    rec "size.$f" "$(stat -c %s "$W/$f")"
done
log "corpus ready in $(elapsed "$t0" "$(now)") s: $(cd "$W" && ls -sh big.tar* small.tar* | tr '\n' ' ')"

# ---------------------------------------------------------------- phase A: first pass over the big archive
# timed KEY CMD...: cold-cache wall time of CMD (stdout discarded) into KEY.
timed() {
    local key=$1 t0 t1
    shift
    drop_caches
    t0=$(now)
    if timeout 900 "$@" >"$W/timed.out" 2>"$W/timed.err"; then
        t1=$(now)
        rec "$key" "$(elapsed "$t0" "$t1")"
    else
        rec "$key" err
        note "$key: '$*' failed: $(tail -n 1 "$W/timed.err")"
    fi
}
log "phase A: indexing the big archive (cold cache)"
timed idx.gzip-dc.gz sh -c 'exec gzip -dc "$0" >/dev/null' "$W/big.tar.gz"
timed idx.pigz-dc.gz sh -c 'exec pigz -dc "$0" >/dev/null' "$W/big.tar.gz"
timed idx.zstd-dc.zst sh -c 'exec zstd -qdc "$0" >/dev/null' "$W/big.tar.zst"
for ext in tar.gz tar tar.zst; do
    timed "idx.snapfs.$ext" "$SNAPFS" index --force "$W/big.$ext"
    [[ -s $W/timed.out ]] && note "snapfs index big.$ext: $(cat "$W/timed.out")"
done
if ((RAT)); then
    for ext in tar.gz tar; do
        rm -f "$W/big.$ext.index.sqlite"
        m=$W/mnt/rat-first-big.$ext
        drop_caches
        t0=$(now)
        if rat_mount "$W/big.$ext" "$m" --recreate-index; then
            rec "idx.rat.$ext" "$(elapsed "$t0" "$(now)")"
        else
            rec "idx.rat.$ext" err
        fi
        unmount "$m"
    done
fi

# ---------------------------------------------------------------- phase B: mounting many small files
log "phase B: mount times, $SMALL_FILES small files"
nsmall=$(find "$W/small-native" -type f | wc -l)
# A sample of files to compare byte for byte through each mount.
find "$W/small-native/tree" -type f | sort | awk 'NR % 97 == 1' | sed "s|^$W/small-native/||" >"$W/sample.txt"
# check_tree KEY MNT: same number of files, and the sample reads back identical.
check_tree() {
    local key=$1 m=$2 n bad=0 f
    n=$(timeout 600 find "$m" -type f 2>/dev/null | wc -l)
    while read -r f; do
        timeout 30 cmp -s "$W/small-native/$f" "$m/$f" || { bad=$((bad + 1)); [[ $bad -le 3 ]] && note "$key: $f differs from tar -x"; }
    done <"$W/sample.txt"
    if [[ $n == "$nsmall" && $bad == 0 ]]; then rec "check.$key" ok; else
        rec "check.$key" "FAIL"
        note "$key: $n files (tar -x: $nsmall), $bad of $(wc -l <"$W/sample.txt") sampled files differ"
    fi
}
# warm_times KEY MOUNTFN ARCHIVE: median over REPS of mount + ls of the root.
warm_times() {
    local key=$1 fn=$2 a=$3 m i t0 ok=1 times=()
    for ((i = 0; i < REPS; i++)); do
        m=$W/mnt/$key.$i
        mkdir -p "$m"
        t0=$(now)
        if $fn "$a" "$m" && timeout 60 ls "$m" >/dev/null; then
            times+=("$(elapsed "$t0" "$(now)")")
        else
            ok=0
        fi
        unmount "$m"
        ((ok)) || break
    done
    if ((ok)); then rec "$key" "$(median "${times[@]}")"; else rec "$key" err; fi
}
for ext in tar tar.gz tar.zst; do
    a=$W/small.$ext
    drop_caches
    timed "mount.snapfs.first.$ext" "$SNAPFS" index --force "$a"
    [[ -s $W/timed.out ]] && note "snapfs index small.$ext: $(cat "$W/timed.out")"
    warm_times "mount.snapfs.warm.$ext" snapfs_mount "$a"
    if snapfs_mount "$a" "$W/mnt/check.$ext"; then check_tree "snapfs.small.$ext" "$W/mnt/check.$ext"; fi
    unmount "$W/mnt/check.$ext"
    if ((RAT)) && [[ $ext != tar.zst ]]; then
        rm -f "$a.index.sqlite"
        m=$W/mnt/rat-first-small.$ext
        drop_caches
        t0=$(now)
        if rat_mount "$a" "$m" --recreate-index; then
            rec "mount.rat.first.$ext" "$(elapsed "$t0" "$(now)")"
        else
            rec "mount.rat.first.$ext" err
        fi
        unmount "$m"
        warm_times "mount.rat.warm.$ext" rat_mount "$a"
    fi
done

# ---------------------------------------------------------------- phase C: fio on the big file
log "phase C: fio, ${RUNTIME}s per run"
TARGETS=(native snapfs.tar snapfs.tar.gz snapfs.tar.zst)
((RAT)) && TARGETS+=(rat.tar rat.tar.gz)
# target_up TARGET DIR: mounts what TARGET needs (fresh daemon) on DIR and prints the
# file to read.
target_up() {
    local t=$1 m=$2
    case $t in
        native) echo "$W/native/$BIGFILE" ;;
        snapfs.*) snapfs_mount "$W/big.${t#snapfs.}" "$m" && echo "$m/$BIGFILE" ;;
        rat.*) rat_mount "$W/big.${t#rat.}" "$m" && echo "$m/$BIGFILE" ;;
    esac
}
# run_fio TARGET TEST JOB DIRECT
run_fio() {
    local t=$1 test=$2 job=$3 direct=$4 file m=$W/mnt/fio.$1.$2
    if ! file=$(target_up "$t" "$m"); then rec "fio.$t.$test.bw" err; rec "fio.$t.$test.iops" err; return; fi
    drop_caches
    if FILE=$file RUNTIME=$RUNTIME NUMJOBS=$NUMJOBS DIRECT=$direct \
        timeout -k 10 $((RUNTIME * 3 + 120)) fio --output-format=json --output="$W/fio.json" "$job" >"$W/fio.err" 2>&1 &&
        python3 -c 'import json,sys
j = json.load(open(sys.argv[1]))["jobs"][0]
if j.get("error"): sys.exit(1)
r = j["read"]
print("%.1f %.0f" % (r["bw"] / 1024, r["iops"]))' "$W/fio.json" >"$W/fio.num" 2>>"$W/fio.err"; then
        read -r bw iops <"$W/fio.num"
        rec "fio.$t.$test.bw" "$bw"
        rec "fio.$t.$test.iops" "$iops"
    else
        rec "fio.$t.$test.bw" err
        rec "fio.$t.$test.iops" err
        note "fio $test on $t failed: $(grep -v '^\s*$' "$W/fio.err" | tail -n 1)"
    fi
    [[ $t == native ]] || unmount "$m"
}
for t in "${TARGETS[@]}"; do
    log "fio on $t"
    run_fio "$t" seq "$REPO/scripts/fio/seq.fio" 0
    run_fio "$t" rand "$REPO/scripts/fio/rand.fio" 0
    run_fio "$t" randdirect "$REPO/scripts/fio/rand.fio" 1
done
log "checking the big file through every mount"
for t in "${TARGETS[@]}"; do
    [[ $t == native ]] && continue
    if file=$(target_up "$t" "$W/mnt/cmp.$t"); then
        if timeout 600 cmp "$W/native/$BIGFILE" "$file" >"$W/cmp.out" 2>&1; then rec "check.$t.big" ok; else
            rec "check.$t.big" FAIL
            note "$t: big file differs from tar -x: $(tail -n 1 "$W/cmp.out")"
        fi
        unmount "$W/mnt/cmp.$t"
    else
        rec "check.$t.big" err
    fi
done

# ---------------------------------------------------------------- report
cat >"$W/report.py" <<'EOF'
import sys
W, env = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
R = {}
for line in open(f"{W}/results.tsv"):
    k, v = line.rstrip("\n").split("\t")
    R[k] = v
notes = [l.rstrip("\n") for l in open(f"{W}/notes.txt") if l.strip()]

def num(k):
    try:
        return float(R[k])
    except (KeyError, ValueError):
        return None

def cell(k, fmt="{:.2f}"):
    v = num(k)
    if v is not None:
        return fmt.format(v)
    return R.get(k, "—")

def ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b else "—"

MB = 1e6
out = []
p = out.append
p(f"### snapfs benchmark ({env['BIG_MB']} MiB file, {env['SMALL_FILES']} small files, fio {env['RUNTIME']} s per run)")
p("")
p(f"{env['HOST']}. snapfs {env['REV']}; {env['RAT']}. Page caches dropped before every timed step; "
  "each fio run on a freshly mounted daemon.")
p("")
tar, gz, zst = num("size.big.tar"), num("size.big.tar.gz"), num("size.big.tar.zst")
p(f"**First pass over the big archive** (tar {tar / 2**20:.0f} MiB; tar.gz {gz / 2**20:.0f} MiB = {tar / gz:.2f}×; "
  f"tar.zst {zst / 2**20:.0f} MiB, pzstd frames)")
p("")
p("| what | archive | time (s) | compressed MB/s | tar stream MB/s | speed vs gzip -dc |")
p("|---|---|---:|---:|---:|---:|")
gz_base = num("idx.gzip-dc.gz")
for key, what, arch, size in [
    ("idx.gzip-dc.gz", "`gzip -dc > /dev/null`", "tar.gz", gz),
    ("idx.pigz-dc.gz", "`pigz -dc > /dev/null`", "tar.gz", gz),
    ("idx.snapfs.tar.gz", "`snapfs index`", "tar.gz", gz),
    ("idx.rat.tar.gz", "ratarmount first mount", "tar.gz", gz),
    ("idx.zstd-dc.zst", "`zstd -dc > /dev/null`", "tar.zst", zst),
    ("idx.snapfs.tar.zst", "`snapfs index`", "tar.zst", zst),
    ("idx.snapfs.tar", "`snapfs index`", "tar", tar),
    ("idx.rat.tar", "ratarmount first mount", "tar", tar),
]:
    if key not in R:
        continue
    t = num(key)
    speed = (lambda b: f"{b / MB / t:.0f}" if t else "—")
    vs = f"{gz_base / t:.2f}×" if t and gz_base and arch == "tar.gz" and key != "idx.gzip-dc.gz" else ""
    p(f"| {what} | {arch} | {cell(key)} | {speed(size)} | {speed(tar)} | {vs} |")
p("")
p(f"**Mounting {env['SMALL_FILES']} small files** (seconds; warm = index present, median of {env['REPS']} mount + `ls`)")
p("")
p("| archive | snapfs index build | snapfs warm mount | ratarmount first mount | ratarmount warm mount | warm mount speedup, snapfs vs ratarmount |")
p("|---|---:|---:|---:|---:|---:|")
for ext in ["tar", "tar.gz", "tar.zst"]:
    s, r = num(f"mount.snapfs.warm.{ext}"), num(f"mount.rat.warm.{ext}")
    p(f"| {ext} ({num('size.small.' + ext) / 2**20:.0f} MiB) | {cell('mount.snapfs.first.' + ext)} | {cell('mount.snapfs.warm.' + ext, '{:.3f}')} | "
      f"{cell('mount.rat.first.' + ext)} | {cell('mount.rat.warm.' + ext, '{:.3f}')} | {ratio(r, s) if s and r else '—'} |")
p("")
p(f"**fio on the big file** (psync; seq = 1 MiB reads once through; rand = 4 KiB random reads, numjobs={env['NUMJOBS']}, "
  "buffered and O_DIRECT). Ratios: higher is better for snapfs.")
p("")
p("| target | seq MiB/s | rand 4k IOPS | rand 4k direct IOPS | seq vs native | rand vs native | direct vs native | seq vs ratarmount | rand vs ratarmount | direct vs ratarmount |")
p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
targets = ["native", "snapfs.tar", "snapfs.tar.gz", "snapfs.tar.zst", "rat.tar", "rat.tar.gz"]
names = {"native": "native (tar -x on local disk)", "snapfs.tar": "snapfs tar", "snapfs.tar.gz": "snapfs tar.gz",
         "snapfs.tar.zst": "snapfs tar.zst", "rat.tar": "ratarmount tar", "rat.tar.gz": "ratarmount tar.gz"}
tests = [("seq", "bw"), ("rand", "iops"), ("randdirect", "iops")]
for t in targets:
    if f"fio.{t}.seq.bw" not in R:
        continue
    row = [names[t]] + [cell(f"fio.{t}.{x}.{m}", "{:.0f}") for x, m in tests]
    peer = "rat." + t.split(".", 1)[1] if t.startswith("snapfs.") else None
    for x, m in tests:
        row.append(ratio(num(f"fio.{t}.{x}.{m}"), num(f"fio.native.{x}.{m}")) if t != "native" else "")
    for x, m in tests:
        row.append(ratio(num(f"fio.{t}.{x}.{m}"), num(f"fio.{peer}.{x}.{m}")) if peer else "")
    p("| " + " | ".join(row) + " |")
p("")
checks = {k[6:]: v for k, v in R.items() if k.startswith("check.")}
p("**Data checks** (big file `cmp` with `tar -x`; small trees: file count and every 97th file): " +
  ", ".join(f"{k} {v}" for k, v in sorted(checks.items())))
if notes:
    p("")
    p("**Notes**")
    p("")
    for n in notes:
        p(f"- {n}")
print("\n".join(out))
EOF
REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')
git -C "$REPO" diff --quiet HEAD -- src 2>/dev/null || REV="$REV+dirty"
[[ -n ${SNAPFS_STALE:-} ]] && REV="$REV (build failed: previously built binary of unknown revision)"
if ((RAT)); then RATV="ratarmount $(ratarmount --version 2>/dev/null | head -n 1 | awk '{print $2}') (defaults: rapidgzip, parallel gzip decoding)"; else RATV="ratarmount not available"; fi
HOST="Linux $(uname -r), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo)"
python3 "$W/report.py" "$W" BIG_MB="$BIG_MB" SMALL_FILES="$SMALL_FILES" RUNTIME="$RUNTIME" NUMJOBS="$NUMJOBS" \
    REPS="$REPS" REV="$REV" RAT="$RATV" HOST="$HOST" >"$W/report.md"
cat "$W/report.md"
[[ -n $OUT ]] && cp "$W/report.md" "$OUT"
exit 0
