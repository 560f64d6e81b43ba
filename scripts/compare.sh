#!/usr/bin/env bash
# Bounded-time comparison of snapfs with other ways to get at a tar archive's contents:
# ratarmount, archivemount, squashfuse (on an mksquashfs image of the same tree), the
# tree extracted on local disk ("native") and extracting it with `tar -x` ("restore by
# extraction"). Prints a markdown report and writes an SVG chart (gnuplot).
# Needs root (drop_caches, mounts), FUSE, fio, pigz, pzstd, python3; installs
# ratarmount (pip), archivemount, squashfuse, squashfs-tools, gnuplot-nox (apt-get) if
# missing and skips a tool with a note when that fails.
#
#   bash scripts/compare.sh                   # full run: under 15 min on 2 cores (see docs/BENCHMARKS.md)
#   BIG_MB=64 SMALL_FILES=2000 RUNTIME=2 REPS=1 LAYERS=5 bash scripts/compare.sh   # smoke
#
# Knobs (environment):
#   BIG_MB=1024        size of the big semi-compressible file (fio)
#   SMALL_FILES=100000 small files (0-16 KiB) over SMALL_FILES/100 dirs
#   RUNTIME=5          seconds per fio run
#   REPS=3             repetitions of every timing (median reported); cold mounts run once
#   READ_REPS=1        repetitions of the read-every-file timings (1 and 8 processes)
#   TMO=60             cap (s) of one timed step; a step over it is reported as ">TMO"
#   READ_TMO=20        cap (s) of one read-every-file step; a capped step reports the
#                      rate of the bytes it read
#   SLOW=8             a timing whose first run takes longer than this (s) is not
#                      repeated (noted in the report)
#   LAYERS=50          layers in the stacking test; LAYER_FILES=200 files per layer
#   XZ_MB=64           size of the file in the tar.xz / tar.bz2 rows (phase 5: cold and
#                      warm mount, fio); 0 skips them
#   PHASES=12345       phases to run: 1 mounts, 2 walk and read, 3 fio, 4 layers, 5 tar.xz
#                      and tar.bz2 (PHASES=5 builds only its own corpus)
#   WORK=dir KEEP=1    work dir (default: mktemp under /var/tmp, removed at exit)
#   OUT=file.md        also write the report there; SVG=file.svg chart path
#   SNAPFS=path        snapfs binary (default: cargo build --release)
#
# Results: $W/results.tsv (KEY<TAB>VALUE), report.md, chart.dat; see docs/BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

BIG_MB=${BIG_MB:-1024}
SMALL_FILES=${SMALL_FILES:-100000}
RUNTIME=${RUNTIME:-5}
REPS=${REPS:-3}
READ_REPS=${READ_REPS:-1}
TMO=${TMO:-60}
READ_TMO=${READ_TMO:-20}
SLOW=${SLOW:-8}
LAYERS=${LAYERS:-50}
LAYER_FILES=${LAYER_FILES:-200}
XZ_MB=${XZ_MB:-64}
PHASES=${PHASES:-12345}
has() { [[ $PHASES == *$1* ]]; }
KEEP=${KEEP:-0}
OUT=${OUT:-}
SVG=${SVG:-}

if [[ -z ${SNAPFS:-} ]]; then
    SNAPFS=$REPO/target/release/snapfs
    cargo build --release --quiet || [[ -x $SNAPFS ]] || { echo "cargo build --release failed" >&2; exit 1; }
fi
for tool in fio pigz pzstd python3 tar; do
    command -v "$tool" >/dev/null || { echo "compare.sh needs $tool" >&2; exit 1; }
done

if [[ -n ${WORK:-} ]]; then W=$WORK; mkdir -p "$W"; else W=$(mktemp -d /var/tmp/snapfs-compare.XXXXXX); fi
: >"$W/results.tsv"
: >"$W/notes.txt"
# shellcheck source=scripts/bench-lib.sh
source "$REPO/scripts/bench-lib.sh"
cp "$SNAPFS" "$W/snapfs" || { echo "cannot copy $SNAPFS" >&2; exit 1; }
# and the executable it hands serve, volume and remote objects to, where there is one
if [[ -x $(dirname "$SNAPFS")/snapfs-net ]]; then cp "$(dirname "$SNAPFS")/snapfs-net" "$W/snapfs-net"; fi
SNAPFS=$W/snapfs

cleanup() {
    unmount_all
    if [[ $KEEP == 1 || -n ${WORK:-} ]]; then log "work dir kept: $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ---------------------------------------------------------------- tools
need() { # need CMD INSTALLER...: installs if CMD is missing; status 1 if still missing
    local c=$1
    shift
    command -v "$c" >/dev/null && return 0
    log "installing $c: $*"
    "$@" >>"$W/install.log" 2>&1 || true
    hash -r
    command -v "$c" >/dev/null
}
APT_UPDATED=0
aptget() { ((APT_UPDATED)) || { apt-get update -qq || true; APT_UPDATED=1; }; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; }
HAVE_RAT=1 HAVE_AM=1 HAVE_SQ=1 HAVE_PLOT=1
need ratarmount pip install --quiet ratarmount || { HAVE_RAT=0; note "ratarmount: install failed, skipped"; }
need archivemount aptget archivemount || { HAVE_AM=0; note "archivemount: install failed, skipped"; }
{ need mksquashfs aptget squashfs-tools && need squashfuse aptget squashfuse; } || { HAVE_SQ=0; note "squashfuse/mksquashfs: install failed, skipped"; }
need gnuplot aptget gnuplot-nox || { HAVE_PLOT=0; note "gnuplot: install failed, no chart"; }

# ---------------------------------------------------------------- corpus
log "corpus in $W (BIG_MB=$BIG_MB SMALL_FILES=$SMALL_FILES LAYERS=$LAYERS x $LAYER_FILES)"
t0=$(now)
mkdir -p "$W/mnt"
BIGFILE=data/big.dat
if [[ $PHASES != 5 ]]; then # phase 5 alone builds its own corpus
mkdir -p "$W/src/data" "$W/native" "$W/small-native" "$W/layers"
python3 "$REPO/scripts/bench-gen.py" big "$W/src/data/big.dat" "$BIG_MB" || { echo "corpus generation failed" >&2; exit 1; }
tar -C "$W/src" --owner=0 --group=0 --numeric-owner --mtime=@1700000000 -cf "$W/big.tar" data
rm -rf "$W/src"
python3 "$REPO/scripts/bench-gen.py" small "$W/small.tar" "$SMALL_FILES" || { echo "corpus generation failed" >&2; exit 1; }
python3 "$REPO/scripts/bench-gen.py" layers "$W/layers" "$LAYERS" "$LAYER_FILES" || { echo "corpus generation failed" >&2; exit 1; }
for b in big small; do
    pigz -c "$W/$b.tar" >"$W/$b.tar.gz"
    pzstd -q -3 -c "$W/$b.tar" >"$W/$b.tar.zst"
done
tar -C "$W/native" -xf "$W/big.tar"
tar -C "$W/small-native" -xf "$W/small.tar"
for f in big.tar big.tar.gz big.tar.zst small.tar small.tar.gz small.tar.zst; do rec "size.$f" "$(stat -c %s "$W/$f")"; done
# File lists (archive-independent order): all, and 8 shards by directory.
(cd "$W/small-native" && find tree -type f | sort) >"$W/files.all"
for s in 0 1 2 3 4 5 6 7; do awk -F/ -v s=$s '{ d = substr($3, 2) + 0 } d % 8 == s' "$W/files.all" >"$W/files.$s"; done
rec small.bytes "$(cd "$W/small-native" && xargs -d '\n' stat -c %s <"$W/files.all" | awk '{ s += $1 } END { print s }')"
rec small.entries "$(find "$W/small-native/tree" | wc -l)"
fi
log "corpus ready in $(elapsed "$t0" "$(now)") s"

# ---------------------------------------------------------------- tool plumbing
# Tools: native tarx snapfs.gz snapfs.zst snapfs.tar rat.gz am.gz sqfs
TOOLS=(native tarx snapfs.gz snapfs.zst snapfs.tar)
((HAVE_RAT)) && TOOLS+=(rat.gz)
((HAVE_AM)) && TOOLS+=(am.gz)
((HAVE_SQ)) && TOOLS+=(sqfs)
ext_of() { case $1 in *.sgz) echo snap.tar.gz ;; *.gz) echo tar.gz ;; *.zst) echo tar.zst ;; *.xz) echo tar.xz ;; *.bz2) echo tar.bz2 ;; *.tar) echo tar ;; esac; }

am_mount() {
    local a=$1 m=$2
    mkdir -p "$m"
    MOUNTS+=("$m")
    if ! timeout 900 archivemount -o readonly "$a" "$m" >"$W/am.log" 2>&1 || ! wait_mounted "$m" 60; then
        note "archivemount $(basename "$a") failed: $(tail -n 1 "$W/am.log")"
        unmount "$m"
        return 1
    fi
}
sq_mount() {
    local a=$1 m=$2
    mkdir -p "$m"
    MOUNTS+=("$m")
    if ! timeout 300 squashfuse "$a" "$m" >"$W/sq.log" 2>&1 || ! wait_mounted "$m" 60; then
        note "squashfuse $(basename "$a") failed: $(tail -n 1 "$W/sq.log")"
        unmount "$m"
        return 1
    fi
}
# up TOOL KIND DIR: makes KIND (big|small) available through TOOL on DIR (a fresh
# mountpoint, or for tarx a fresh extraction dir); prints the root to read from.
up() {
    local t=$1 k=$2 m=$3
    case $t in
        native) [[ $k == big ]] && echo "$W/native" || echo "$W/small-native" ;;
        tarx) rm -rf "$m" && mkdir -p "$m" && tar -C "$m" -xzf "$W/$k.tar.gz" && echo "$m" ;;
        snapfs.*) snapfs_mount "$W/$k.$(ext_of "$t")" "$m" && echo "$m" ;;
        rat.*) rat_mount "$W/$k.$(ext_of "$t")" "$m" && echo "$m" ;;
        am.*) am_mount "$W/$k.$(ext_of "$t")" "$m" && echo "$m" ;;
        sqfs) sq_mount "$W/$k.sqfs" "$m" && echo "$m" ;;
    esac
}
down() {
    case $1 in native) ;; tarx) rm -rf "$2" ;; *) unmount "$2" ;; esac
}
# pid_of MNT: the daemon serving MNT (the process whose command line names it).
pid_of() {
    local p
    for p in /proc/[0-9]*; do
        [[ ${p#/proc/} == "$$" || ${p#/proc/} == "$BASHPID" ]] && continue
        { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF " $1 " && { echo "${p#/proc/}"; return 0; }
    done
    return 1
}
hwm_mib() { awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null; }

# tstep KEY CMD...: runs CMD once under TMO after dropping caches; echoes seconds, or
# ">TMO" on timeout / "err" on failure (with a note).
tstep() {
    local key=$1 t0 rc
    shift
    drop_caches
    t0=$(now)
    if declare -F "$1" >/dev/null; then
        ("$@") >/dev/null 2>"$W/tstep.err" # shell function: its commands carry their own timeouts
    else
        timeout -k 5 "$TMO" "$@" >/dev/null 2>"$W/tstep.err"
    fi
    rc=$?
    if ((rc == 0)); then elapsed "$t0" "$(now)"
    elif ((rc == 124 || rc == 137)); then echo ">$TMO"
    else note "$key: '$*' failed ($rc): $(tail -n 1 "$W/tstep.err")"; echo err; fi
}
# slow V: whether a time V (s) is over SLOW, i.e. not worth repeating.
slow() { awk -v v="$1" -v s="$SLOW" 'BEGIN { exit !(v > s) }'; }
# reps KEY CMD...: REPS runs of tstep, median recorded; stops at the first non-number,
# and after the first run when that took over SLOW s (noted).
reps() {
    local key=$1 i v times=()
    shift
    for ((i = 0; i < REPS; i++)); do
        v=$(tstep "$key" "$@")
        [[ $v =~ ^[0-9.]+$ ]] || { rec "$key" "$v"; return; }
        times+=("$v")
        if ((i == 0 && REPS > 1)) && slow "$v"; then
            note "$key: ran once (${v} s > SLOW=${SLOW} s)"
            break
        fi
    done
    rec "$key" "$(median "${times[@]}")"
}
# read_rate KEY ROOT [8]: reads every file of the small corpus (sorted path order; with
# 8, as 8 processes over shards by directory), capped at READ_TMO; records MB/s =
# bytes actually read / elapsed, so a capped run still yields a comparable rate.
read_rate() {
    local key=$1 r=$2 par=${3:-1} i s b t0 t vals=() pids=()
    for ((i = 0; i < READ_REPS; i++)); do
        drop_caches
        rm -f "$W"/bytes.*
        t0=$(now)
        if ((par == 1)); then
            (cd "$r" && timeout -k 5 "$READ_TMO" xargs -d '\n' cat <"$W/files.all" 2>/dev/null | wc -c >"$W/bytes.all")
        else
            pids=()
            for s in 0 1 2 3 4 5 6 7; do
                (cd "$r" && timeout -k 5 "$READ_TMO" xargs -d '\n' cat <"$W/files.$s" 2>/dev/null | wc -c >"$W/bytes.$s") &
                pids+=($!)
            done
            for s in "${pids[@]}"; do wait "$s"; done
        fi
        t=$(elapsed "$t0" "$(now)")
        b=$(cat "$W"/bytes.* | awk '{ s += $1 } END { print s + 0 }')
        vals+=("$(awk -v b="$b" -v t="$t" 'BEGIN { printf "%.2f", b / 1e6 / t }')")
        if ((b < $(awk -F'\t' '$1 == "small.bytes" { print $2 }' "$W/results.tsv"))); then
            note "$key: hit the ${READ_TMO} s cap after $((b / 1000000)) MB; rate from the bytes read"
        fi
    done
    rec "$key" "$(median "${vals[@]}")"
}
export W

n=0
# mnt NAME: sets M to a fresh mountpoint path (never reused: a daemon still exiting
# after its unmount could take a newer mount on the same path down with it).
mnt() { n=$((n + 1)); M=$W/mnt/$1.$n; }
# mount_ls TOOL DIR: up + ls of the root (what "mounted" means here).
mount_ls() { local r; r=$(up "$1" small "$2") && timeout 60 ls "$r" >/dev/null; }
mount_big() { local r; r=$(up "$1" big "$2") && timeout 60 ls "$r" >/dev/null; }

# ---------------------------------------------------------------- phase 1: mounts (small corpus)
if has 1; then
if ((HAVE_SQ)); then
    log "mksquashfs images (default gzip)"
    for k in small big; do
        root=$W/small-native
        [[ $k == big ]] && root=$W/native
        drop_caches
        t0=$(now)
        if mksquashfs "$root" "$W/$k.sqfs" -noappend -quiet -no-progress >"$W/mksq.log" 2>&1; then
            rec "sqfs.build.$k" "$(elapsed "$t0" "$(now)")"
        else
            note "mksquashfs $k failed: $(tail -n 1 "$W/mksq.log")"
            HAVE_SQ=0
        fi
    done
    ((HAVE_SQ)) || TOOLS=("${TOOLS[@]/sqfs/}")
fi

log "phase 1: cold and warm mounts of $SMALL_FILES small files"
for t in "${TOOLS[@]}"; do
    [[ -z $t || $t == native ]] && continue
    a=$W/small.$(ext_of "$t")
    # cold: no index (snapfs, ratarmount); image build (squashfuse); extraction (tar -x)
    mnt "cold.$t"; m=$M
    case $t in
        snapfs.*) rm -f "$a.snapfs-idx"; v=$(tstep "mount.cold.$t" mount_ls "$t" "$m") ;;
        rat.*) rm -f "$a.index.sqlite"; v=$(tstep "mount.cold.$t" mount_ls "$t" "$m") ;;
        sqfs) v=$(tstep "mount.cold.$t" mount_ls "$t" "$m")
              [[ $v =~ ^[0-9.]+$ ]] && v=$(python3 -c "import sys; print(f'{float(sys.argv[1]) + float(sys.argv[2]):.3f}')" "$v" "$(awk -F'\t' '$1 == "sqfs.build.small" { print $2 }' "$W/results.tsv")") ;;
        *) v=$(tstep "mount.cold.$t" mount_ls "$t" "$m") ;;
    esac
    rec "mount.cold.$t" "$v"
    down "$t" "$m"
    # warm: index / image present
    times=() ok=1
    for ((i = 0; i < REPS; i++)); do
        mnt "warm.$t"; m=$M
        v=$(tstep "mount.warm.$t" mount_ls "$t" "$m")
        down "$t" "$m"
        [[ $v =~ ^[0-9.]+$ ]] || { ok=0; rec "mount.warm.$t" "$v"; break; }
        times+=("$v")
        if ((i == 0 && REPS > 1)) && slow "$v"; then
            note "mount.warm.$t: ran once (${v} s > SLOW=${SLOW} s)"
            break
        fi
    done
    ((ok)) && rec "mount.warm.$t" "$(median "${times[@]}")"
done

fi # phase 1

# ---------------------------------------------------------------- phase 2: walking and reading (small corpus)
if has 2; then
log "phase 2: find+stat, read every file, 8 readers"
for t in "${TOOLS[@]}"; do
    [[ -z $t || $t == tarx ]] && continue
    log "  $t"
    mnt "walk.$t"; m=$M
    if ! r=$(up "$t" small "$m"); then
        for k in stat read read8 rss.small; do rec "$k.$t" err; done
        continue
    fi
    reps "stat.$t" find "$r" -exec stat -c %s {} +
    read_rate "read.$t" "$r"
    read_rate "read8.$t" "$r" 8
    if [[ $t != native ]] && pid=$(pid_of "$m"); then rec "rss.small.$t" "$(hwm_mib "$pid")"; fi
    down "$t" "$m"
done

fi # phase 2

# ---------------------------------------------------------------- phase 3: fio on the big file
cat >"$W/seq.fio" <<'EOF'
[global]
filename=${FILE}
ioengine=psync
rw=read
bs=1M
direct=${DIRECT}
allow_file_create=0
create_on_open=0
invalidate=1
runtime=${RUNTIME}
time_based=0
[seq]
EOF
run_fio() { # run_fio TOOL TEST JOBFILE NUMJOBS DIRECT [KIND PREFIX]
    local t=$1 test=$2 job=$3 nj=$4 direct=$5 kind=${6:-big} pre=${7:-} r m key pid
    key="${pre}fio.$test.$t"
    mnt "fio.$t"; m=$M
    if ! r=$(up "$t" "$kind" "$m"); then rec "$key" err; return; fi
    drop_caches
    if FILE=$r/$BIGFILE RUNTIME=$RUNTIME NUMJOBS=$nj DIRECT=$direct \
        timeout -k 10 $((RUNTIME * 3 + 60)) fio --output-format=json --output="$W/fio.json" "$job" >"$W/fio.err" 2>&1 &&
        python3 -c 'import json,sys
j = json.load(open(sys.argv[1]))["jobs"][0]
if j.get("error"): sys.exit(1)
r = j["read"]
print("%.1f" % (r["bw"] / 1024) if sys.argv[2] == "seq" else "%.0f" % r["iops"])' "$W/fio.json" "$test" >"$W/fio.num" 2>>"$W/fio.err"; then
        rec "$key" "$(cat "$W/fio.num")"
    else
        rec "$key" err
        note "fio $test on $t failed: $(grep -v '^\s*$' "$W/fio.err" | tail -n 1)"
    fi
    if [[ $t != native ]] && pid=$(pid_of "$m"); then rec "${pre}rss.big.$test.$t" "$(hwm_mib "$pid")"; fi
    down "$t" "$m"
}
if has 3; then
log "phase 3: fio, ${RUNTIME}s per run, fresh mount per run"
# Cold index of the big single-member tar.gz (pigz): snapfs's index pass against
# ratarmount's first mount.
for t in snapfs.gz rat.gz; do
    [[ " ${TOOLS[*]} " == *" $t "* ]] || continue
    rm -f "$W/big.tar.gz.snapfs-idx" "$W/big.tar.gz.index.sqlite"
    mnt "coldbig.$t"; m=$M
    rec "mount.coldbig.$t" "$(tstep "mount.coldbig.$t" mount_big "$t" "$m")"
    down "$t" "$m"
done
for t in "${TOOLS[@]}"; do
    [[ -z $t || $t == tarx ]] && continue
    log "  $t"
    run_fio "$t" seq "$W/seq.fio" 1 0
    run_fio "$t" rand1 "$REPO/scripts/fio/rand.fio" 1 0
    run_fio "$t" rand4 "$REPO/scripts/fio/rand.fio" 4 0
    run_fio "$t" rand1d "$REPO/scripts/fio/rand.fio" 1 1
done
# The big tree as snapfs writes it (`snapfs create`: independent 1 MiB gzip members,
# self-indexed): sequential and direct random reads, snapfs against ratarmount.
if "$SNAPFS" create "$W/native" -o "$W/big.snap.tar.gz" --format gz >"$W/create.log" 2>&1; then
    rec size.big.snap.tar.gz "$(stat -c %s "$W/big.snap.tar.gz")"
    for t in snapfs.sgz rat.sgz; do
        [[ $t == rat.sgz ]] && ! ((HAVE_RAT)) && continue
        log "  $t"
        run_fio "$t" seq "$W/seq.fio" 1 0
        run_fio "$t" rand1d "$REPO/scripts/fio/rand.fio" 1 1
    done
else
    note "snapfs create of the big tree failed: $(tail -n 1 "$W/create.log")"
fi

fi # phase 3

# ---------------------------------------------------------------- phase 4: layers
if has 4; then
log "phase 4: $LAYERS stacked layers vs one layer ($((LAYERS * LAYER_FILES)) files)"
mapfile -t LAYER_TARS < <(ls "$W"/layers/layer*.tar | sort)
for a in "${LAYER_TARS[@]}" "$W/layers/single.tar"; do "$SNAPFS" index "$a" >/dev/null 2>&1 || note "snapfs index $a failed"; done
layer_case() { # layer_case KEY MOUNTFN ARCHIVES...
    local key=$1 fn=$2 m r times=() i v ok=1
    shift 2
    for ((i = 0; i < REPS; i++)); do
        mnt "$key"; m=$M
        v=$(tstep "layers.mount.$key" "$fn" "$m" "$@")
        [[ $v =~ ^[0-9.]+$ ]] || { ok=0; rec "layers.mount.$key" "$v"; unmount "$m"; break; }
        times+=("$v")
        ((i == REPS - 1)) || unmount "$m"
    done
    ((ok)) || { rec "layers.stat.$key" err; return; }
    rec "layers.mount.$key" "$(median "${times[@]}")"
    reps "layers.stat.$key" find "$m" -exec stat -c %s {} +
    local cnt
    cnt=$(find "$m" | wc -l)
    rec "layers.entries.$key" "$cnt"
    unmount "$m"
}
lm_snapfs() { local m=$1; shift; mkdir -p "$m"; MOUNTS+=("$m"); timeout 300 "$SNAPFS" mount "$@" "$m" >/dev/null 2>&1 && timeout 60 ls "$m" >/dev/null; }
lm_rat() { local m=$1; shift; mkdir -p "$m"; MOUNTS+=("$m"); timeout 300 ratarmount "$@" "$m" >/dev/null 2>&1 && wait_mounted "$m" 60; }
layer_case snapfs.stack lm_snapfs "${LAYER_TARS[@]}"
layer_case snapfs.single lm_snapfs "$W/layers/single.tar"
if ((HAVE_RAT)); then
    # first union mount writes the 50 sqlite indexes; not timed
    mnt rat.prep; m=$M; lm_rat "$m" "${LAYER_TARS[@]}" || true; unmount "$m"
    mnt rat.prep; m=$M; lm_rat "$m" "$W/layers/single.tar" || true; unmount "$m"
    layer_case rat.stack lm_rat "${LAYER_TARS[@]}"
    layer_case rat.single lm_rat "$W/layers/single.tar"
fi
mkdir -p "$W/layers-native"
for a in "${LAYER_TARS[@]}"; do tar -C "$W/layers-native" -xf "$a"; done
reps layers.stat.native find "$W/layers-native" -exec stat -c %s {} +
rec layers.entries.native "$(find "$W/layers-native" | wc -l)"
fi # phase 4

# ---------------------------------------------------------------- phase 5: tar.xz and tar.bz2
# One file of XZ_MB MiB (the head of the big file), as a multi-block tar.xz (what
# xz -T2 writes, 1 MiB blocks) and a tar.bz2 (lbzip2 -9: 900 kB blocks): cold mount
# (index pass), warm mount, fio. Tools: snapfs and ratarmount only.
if has 5 && ((XZ_MB > 0)); then
log "phase 5: tar.xz and tar.bz2 of $XZ_MB MiB"
XB_OK=1
need xz aptget xz-utils || { XB_OK=0; note "xz: install failed, tar.xz rows skipped"; }
need lbzip2 aptget lbzip2 || note "lbzip2: install failed, tar.bz2 made with bzip2 -9"
mkdir -p "$W/xsrc/data"
if [[ -f $W/native/$BIGFILE ]]; then
    head -c "$((XZ_MB << 20))" "$W/native/$BIGFILE" >"$W/xsrc/$BIGFILE"
else
    python3 "$REPO/scripts/bench-gen.py" big "$W/xsrc/$BIGFILE" "$XZ_MB" || XB_OK=0
fi
tar -C "$W/xsrc" --owner=0 --group=0 --numeric-owner --mtime=@1700000000 -cf "$W/xb.tar" data
rm -rf "$W/xsrc"
xb_ls() { local r; r=$(up "$1" xb "$2") && timeout 60 ls "$r" >/dev/null; }
XB_TOOLS=()
if ((XB_OK)); then
    t0=$(now)
    xz -q -T2 -1 --block-size=1MiB -c "$W/xb.tar" >"$W/xb.tar.xz" && XB_TOOLS+=(snapfs.xz)
    if command -v lbzip2 >/dev/null; then lbzip2 -9 -n2 -c "$W/xb.tar" >"$W/xb.tar.bz2"; else bzip2 -9 -c "$W/xb.tar" >"$W/xb.tar.bz2"; fi && XB_TOOLS+=(snapfs.bz2)
    log "  compressed in $(elapsed "$t0" "$(now)") s"
    for f in xb.tar xb.tar.xz xb.tar.bz2; do [[ -f $W/$f ]] && rec "size.$f" "$(stat -c %s "$W/$f")"; done
    ((HAVE_RAT)) && XB_TOOLS+=(rat.xz rat.bz2)
fi
rm -f "$W/xb.tar"
for t in "${XB_TOOLS[@]}"; do
    log "  $t"
    a=$W/xb.$(ext_of "$t")
    rm -f "$a.snapfs-idx" "$a.index.sqlite"
    mnt "xb.cold.$t"; m=$M
    rec "xb.mount.cold.$t" "$(tstep "xb.mount.cold.$t" xb_ls "$t" "$m")"
    down "$t" "$m"
    mnt "xb.warm.$t"; m=$M
    rec "xb.mount.warm.$t" "$(tstep "xb.mount.warm.$t" xb_ls "$t" "$m")"
    down "$t" "$m"
    run_fio "$t" seq "$W/seq.fio" 1 0 xb xb.
    run_fio "$t" rand1 "$REPO/scripts/fio/rand.fio" 1 0 xb xb.
    run_fio "$t" rand1d "$REPO/scripts/fio/rand.fio" 1 1 xb xb.
done
fi # phase 5

# ---------------------------------------------------------------- report
unmount_all
REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')
git -C "$REPO" diff --quiet HEAD -- src 2>/dev/null || REV="$REV+dirty"
VERS="ratarmount $(ratarmount --version 2>/dev/null | head -n 1 | awk '{print $2}'); archivemount $(archivemount --version 2>&1 | awk '/archivemount version/ {print $3}'); squashfuse $(squashfuse --version 2>&1 | awk 'NR == 1 {print $2}'); fio $(fio --version)"
HOST="Linux $(uname -r), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo)"
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

TOOLS = ["native", "tarx", "snapfs.gz", "snapfs.zst", "snapfs.tar", "rat.gz", "am.gz", "sqfs"]
NAME = {"native": "native", "tarx": "tar -x", "snapfs.gz": "snapfs gz", "snapfs.zst": "snapfs zst",
        "snapfs.tar": "snapfs tar", "rat.gz": "ratarmount gz", "am.gz": "archivemount gz", "sqfs": "squashfuse"}
present = [t for t in TOOLS if t in ("native", "tarx") or any(k.endswith("." + t) for k in R)]
MB = 1e6
small_mb = (num("small.bytes") or 0) / MB

# (label, key prefix, kind, format, reference for "vs native"); kind: time (lower is
# better), rate_from_time (MB/s from a time over the small corpus), rate, mem
ROWS = [
    ("cold mount, small (s)", "mount.cold", "time", "{:.2f}", "tarx"),
    ("warm mount, small (s)", "mount.warm", "time", "{:.3f}", "tarx"),
    ("find + stat all entries (s)", "stat", "time", "{:.2f}", "native"),
    ("read every file, 1 proc (MB/s)", "read", "rate", "{:.1f}", "native"),
    ("read every file, 8 procs (MB/s)", "read8", "rate", "{:.1f}", "native"),
    ("fio seq 1M (MiB/s)", "fio.seq", "rate", "{:.0f}", "native"),
    ("fio rand 4k, 1 job (IOPS)", "fio.rand1", "rate", "{:.0f}", "native"),
    ("fio rand 4k, 4 jobs (IOPS)", "fio.rand4", "rate", "{:.0f}", "native"),
    ("fio rand 4k direct, 1 job (IOPS)", "fio.rand1d", "rate", "{:.0f}", "native"),
    ("daemon peak RSS, small walk+read (MiB)", "rss.small", "mem", "{:.0f}", None),
    ("daemon peak RSS, fio max (MiB)", "rss.big", "mem", "{:.0f}", None),
]

SHORT = {"mount.cold": "cold mount", "mount.warm": "warm mount", "stat": "find+stat", "read": "read all",
         "read8": "read all x8", "fio.seq": "seq 1M", "fio.rand1": "rand 4k", "fio.rand4": "rand 4k x4",
         "fio.rand1d": "rand 4k direct"}

def value(prefix, kind, t):
    """(number, or None and the raw string)"""
    if prefix == "rss.big":
        vs = [num(f"rss.big.{x}.{t}") for x in ("seq", "rand1", "rand4", "rand1d")]
        vs = [v for v in vs if v is not None]
        return (max(vs) if vs else None), None
    key = f"{prefix}.{t}"
    raw = R.get(key)
    v = num(key)
    if kind == "rate_from_time":
        if v is None:
            if raw and raw.startswith(">"):
                return None, "<%.1f" % (small_mb / float(raw[1:]))
            return None, raw
        return small_mb / v, None
    if v is None:
        return None, raw
    return v, None

def speed(kind, v, ref):
    if v is None or ref is None or v == 0 or ref == 0:
        return None
    return ref / v if kind in ("time", "mem") else v / ref

tab = {}
for label, prefix, kind, fmt, refname in ROWS:
    for t in present:
        tab[(label, t)] = value(prefix, kind, t)
out = []
p = out.append
p(f"{env['HOST']}; snapfs {env['REV']}; {env['VERS']}.")
p("")
full = num('size.big.tar') is not None
if full:
    p(f"Corpora: {env['BIG_MB']} MiB semi-compressible file (tar {num('size.big.tar')/2**20:.0f} MiB, tar.gz {num('size.big.tar.gz')/2**20:.0f} MiB, "
      f"tar.zst {num('size.big.tar.zst')/2**20:.0f} MiB); {env['SMALL_FILES']} small files, {small_mb:.0f} MB in {int(num('small.entries'))} entries "
      f"(tar {num('size.small.tar')/2**20:.0f} MiB, tar.gz {num('size.small.tar.gz')/2**20:.0f} MiB). Medians of {env['REPS']} runs (read-every-file rows: {env['READ_REPS']}; cold mounts: 1 run; a timing whose first run took over {env['SLOW']} s: 1 run); "
      f"page caches dropped before every timed step; fio {env['RUNTIME']} s per run, each on a fresh mount; "
      f"steps capped at {env['TMO']} s, read-every-file steps at {env['READ_TMO']} s, reported as bytes read / elapsed (\">N\" = still running at the cap).")
    p("")
    p("**Raw numbers**")
    p("")
    p("| metric | " + " | ".join(NAME[t] for t in present) + " |")
    p("|---|" + "---:|" * len(present))
    for label, prefix, kind, fmt, refname in ROWS:
        cells = []
        for t in present:
            v, s = tab[(label, t)]
            if t == "tarx" and not prefix.startswith("mount"):
                cells.append("= native")
            elif t == "native" and prefix.startswith("mount"):
                cells.append("0 (on disk)")
            elif v is not None:
                cells.append(fmt.format(v))
            else:
                cells.append(s or "—")
        p(f"| {label} | " + " | ".join(cells) + " |")
    p("")
    chart = []
    for title, peer in (("native (mount rows: relative to `tar -xzf` extraction)", None), ("ratarmount (same tar.gz)", "rat.gz")):
        p(f"**Speed relative to {title}**: >1 = faster than the reference (RSS rows: smaller)")
        p("")
        cols = [t for t in present if t not in ("native", "tarx")]
        p("| metric | " + " | ".join(NAME[t] for t in cols) + " |")
        p("|---|" + "---:|" * len(cols))
        for label, prefix, kind, fmt, refname in ROWS:
            ref = peer or refname
            if ref is None or ref not in present:
                continue
            rv, _ = tab[(label, ref)]
            cells, crow = [], []
            for t in cols:
                v, s = tab[(label, t)]
                r = speed(kind, v, rv)
                if r is None and s and s.startswith(">") and rv:
                    cells.append("<%.3f×" % (rv / float(s[1:])))
                elif r is None and s and s.startswith("<") and rv:
                    cells.append("<%.3f×" % (float(s[1:]) / rv))
                else:
                    cells.append(f"{r:.2f}×" if r is not None else "—")
                crow.append(f"{r:.4g}" if r is not None else "?")
            p(f"| {label} | " + " | ".join(cells) + " |")
            if peer is None:
                chart.append(('"%s"' % SHORT[prefix], crow))
        p("")
        if peer is None:
            with open(f"{W}/chart.dat", "w") as f:
                f.write("metric " + " ".join('"%s"' % NAME[t] for t in cols) + "\n")
                for lab, crow in chart:
                    f.write(lab + " " + " ".join(crow) + "\n")
    p(f"**{env['LAYERS']} stacked layers vs one layer** (each layer adds {env['LAYER_FILES']} files to 20 shared dirs; "
      "`find -exec stat {} +` over every entry after dropping caches; mount = until the root lists, indexes present)")
    p("")
    p("| | entries | mount (s) | find + stat (s) |")
    p("|---|---:|---:|---:|")
    for k, lab in [("native", "native (layers extracted in order)"), ("snapfs.single", "snapfs, 1 layer"),
                   ("snapfs.stack", f"snapfs, {env['LAYERS']} layers"), ("rat.single", "ratarmount, 1 archive"),
                   ("rat.stack", f"ratarmount union, {env['LAYERS']} archives")]:
        if f"layers.stat.{k}" not in R:
            continue
        p(f"| {lab} | {R.get('layers.entries.' + k, '—')} | {R.get('layers.mount.' + k, '—')} | {R.get('layers.stat.' + k, '—')} |")

# snapfs-written tar.gz and the big tar.gz's cold index (phase 3)
SG = [("cold index of the big tar.gz (s; ratarmount: first mount)", "mount.coldbig", "snapfs.gz", "rat.gz", "time", "{:.2f}"),
      ("fio seq 1M, snapfs-written tar.gz (MiB/s)", "fio.seq", "snapfs.sgz", "rat.sgz", "rate", "{:.0f}"),
      ("fio rand 4k direct, snapfs-written tar.gz (IOPS)", "fio.rand1d", "snapfs.sgz", "rat.sgz", "rate", "{:.0f}"),
      ("daemon peak RSS, snapfs-written tar.gz (MiB)", "rss.sgz", "snapfs.sgz", "rat.sgz", "mem", "{:.0f}")]
def sgv(prefix, t):
    if prefix == "rss.sgz":
        vs = [num(f"rss.big.{x}.{t}") for x in ("seq", "rand1d")]
        vs = [v for v in vs if v is not None]
        return max(vs) if vs else None
    return num(f"{prefix}.{t}")
if any(sgv(pre, a) is not None for _, pre, a, _b, _k, _f in SG):
    sz = num("size.big.snap.tar.gz")
    p("")
    p("**The big tree as `snapfs create` writes it** (independent 1 MiB gzip members, index embedded"
      + (f"; {sz / 2**20:.0f} MiB" if sz else "") + ") and the cold index of the pigz-written big tar.gz")
    p("")
    p("| metric | snapfs | ratarmount | snapfs / ratarmount |")
    p("|---|---:|---:|---:|")
    for label, pre, a, b, kind, fmt in SG:
        va, vb = sgv(pre, a), sgv(pre, b)
        r = speed(kind, va, vb)
        cell = lambda v, k: fmt.format(v) if v is not None else (R.get(f"{pre}.{k}") or "—")
        p(f"| {label} | {cell(va, a)} | {cell(vb, b)} | " + (f"{r:.2f}×" if r is not None else "—") + " |")

# tar.xz / tar.bz2 (phase 5)
XB = [("snapfs.xz", "snapfs xz"), ("rat.xz", "ratarmount xz"), ("snapfs.bz2", "snapfs bz2"), ("rat.bz2", "ratarmount bz2")]
xb_present = [(t, n) for t, n in XB if f"xb.mount.cold.{t}" in R]
if xb_present:
    def xbv(prefix, t):
        if prefix == "rss":
            vs = [num(f"xb.rss.big.{x}.{t}") for x in ("seq", "rand1", "rand1d")]
            vs = [v for v in vs if v is not None]
            return max(vs) if vs else None, None
        return num(f"xb.{prefix}.{t}"), R.get(f"xb.{prefix}.{t}")
    sz = lambda f: num(f"size.{f}") / 2**20 if num(f"size.{f}") else float("nan")
    p("")
    p(f"**tar.xz and tar.bz2**: one {env['XZ_MB']} MiB file (the head of the big file; tar {sz('xb.tar'):.0f} MiB), "
      f"`xz -T2 -1 --block-size=1MiB` ({sz('xb.tar.xz'):.0f} MiB) and `lbzip2 -9` ({sz('xb.tar.bz2'):.0f} MiB); "
      "cold mount = index pass until the root lists; fio as above on a fresh mount")
    p("")
    XROWS = [("cold mount (s)", "mount.cold", "time", "{:.2f}"), ("warm mount (s)", "mount.warm", "time", "{:.3f}"),
             ("fio seq 1M (MiB/s)", "fio.seq", "rate", "{:.0f}"), ("fio rand 4k, 1 job (IOPS)", "fio.rand1", "rate", "{:.0f}"),
             ("fio rand 4k direct, 1 job (IOPS)", "fio.rand1d", "rate", "{:.0f}"), ("daemon peak RSS (MiB)", "rss", "mem", "{:.0f}")]
    ratios = [(f, f"snapfs / ratarmount {f}") for f in ("xz", "bz2") if f"xb.mount.cold.rat.{f}" in R]
    p("| metric | " + " | ".join(n for _, n in xb_present) + "".join(f" | {n}" for _, n in ratios) + " |")
    p("|---|" + "---:|" * (len(xb_present) + len(ratios)))
    for label, prefix, kind, fmt in XROWS:
        cells = []
        for t, _ in xb_present:
            v, raw = xbv(prefix, t)
            cells.append(fmt.format(v) if v is not None else (raw or "—"))
        for f, _ in ratios:
            a, _r = xbv(prefix, f"snapfs.{f}")
            b, _r = xbv(prefix, f"rat.{f}")
            r = speed(kind, a, b)
            cells.append(f"{r:.2f}×" if r is not None else "—")
        p(f"| {label} | " + " | ".join(cells) + " |")
if notes:
    p("")
    p("**Notes**")
    p("")
    for n in notes:
        p(f"- {n}")
print("\n".join(out))
EOF
python3 "$W/report.py" "$W" BIG_MB="$BIG_MB" SMALL_FILES="$SMALL_FILES" RUNTIME="$RUNTIME" \
    REPS="$REPS" READ_REPS="$READ_REPS" TMO="$TMO" READ_TMO="$READ_TMO" SLOW="$SLOW" LAYERS="$LAYERS" LAYER_FILES="$LAYER_FILES" XZ_MB="$XZ_MB" REV="$REV" VERS="$VERS" HOST="$HOST" >"$W/report.md"
if ((HAVE_PLOT)) && [[ -s $W/chart.dat ]]; then
    [[ -n $SVG ]] || SVG=$W/benchmarks.svg
    gnuplot -e "datafile='$W/chart.dat'; outfile='$SVG'" "$REPO/scripts/plot.gnuplot" 2>"$W/gnuplot.err" || note "gnuplot failed: $(tail -n 1 "$W/gnuplot.err")"
    log "chart: $SVG"
fi
cat "$W/report.md"
[[ -n $OUT ]] && cp "$W/report.md" "$OUT"
exit 0
