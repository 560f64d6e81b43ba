# Helpers for scripts/bench.sh (sourced, not run). Expects W (work dir), SNAPFS.

# Monotonic-enough wall clock in seconds with microseconds (bash 5).
now() { echo "$EPOCHREALTIME"; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }

# rec KEY VALUE: one measured number (or "err"/"n/a") for the report.
rec() { printf '%s\t%s\n' "$1" "$2" >>"$W/results.tsv"; }
# note TEXT: a line for the report's notes section (failures, skipped columns).
note() { log "NOTE: $*"; printf '%s\n' "$*" >>"$W/notes.txt"; }

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

# is_mounted DIR: DIR appears as a mountpoint (also when its daemon died).
is_mounted() { awk -v m="$1" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }

# Every mountpoint we ever used, for the EXIT trap.
MOUNTS=()

# unmount DIR: snapfs umount, then fusermount3, then a lazy umount as a last resort.
unmount() {
    local m=$1 i
    for i in 1 2 3 4 5; do
        is_mounted "$m" || return 0
        "$SNAPFS" umount "$m" >/dev/null 2>&1 || fusermount3 -u "$m" >/dev/null 2>&1 || umount "$m" >/dev/null 2>&1 || true
        is_mounted "$m" || return 0
        sleep 0.5
    done
    note "could not unmount $m cleanly; detaching it lazily"
    umount -l "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true
}

# Unmounts everything we mounted, and anything else under $W/mnt (mounts made in
# subshells do not reach MOUNTS).
unmount_all() {
    local m
    for m in "${MOUNTS[@]}"; do unmount "$m"; done
    awk -v p="$W/mnt/" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do unmount "$m"; done
}

# wait_mounted DIR SECONDS: polls until DIR is a live mount whose root lists.
wait_mounted() {
    local m=$1 deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        if is_mounted "$m" && timeout 10 ls "$m" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    return 1
}

# snapfs_mount ARCHIVE DIR [extra args]: mounts, returns non-zero (with a note) on failure.
snapfs_mount() {
    local a=$1 m=$2
    shift 2
    mkdir -p "$m"
    MOUNTS+=("$m")
    local err
    if ! err=$(timeout 900 "$SNAPFS" mount "$@" "$a" "$m" 2>&1); then
        note "snapfs mount $(basename "$a") failed: $(echo "$err" | tail -n 1)"
        unmount "$m"
        return 1
    fi
}

# rat_mount ARCHIVE DIR [extra args]: ratarmount in the background; waits until live.
rat_mount() {
    local a=$1 m=$2
    shift 2
    mkdir -p "$m"
    MOUNTS+=("$m")
    if ! timeout 900 ratarmount "$@" "$a" "$m" >"$W/ratarmount.log" 2>&1 || ! wait_mounted "$m" 120; then
        note "ratarmount $(basename "$a") failed: $(grep -v '^\s*$' "$W/ratarmount.log" | tail -n 1)"
        unmount "$m"
        return 1
    fi
}

# median of the arguments
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
