#!/usr/bin/env bash
# Single-core inflate speed (output MB/s, best of REPS full decodes of one gzip file)
# of zlib-rs (snapfs's inflate, examples/inflate.rs), the system zlib, zlib-ng and
# ISA-L (the PyPI packages zlib-ng and isal, which bundle those libraries; installed
# if missing). One core each, the same bytes: the table in docs/BENCHMARKS.md.
#
#   bash scripts/inflate-bench.sh FILE.gz [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
f=$1 reps=${2:-3}
python3 -c 'import isal, zlib_ng' 2>/dev/null || python3 -m pip install --quiet isal zlib-ng
cargo build --release --quiet --example inflate
echo "library	MB/s"
taskset -c 0 target/release/examples/inflate "$f" "$reps"
taskset -c 0 python3 - "$f" "$reps" <<'PY'
import sys, time, zlib
from isal import isal_zlib
from zlib_ng import zlib_ng
path, reps = sys.argv[1], int(sys.argv[2])
gz = open(path, "rb").read()
def run(mod):
    # Streamed like snapfs decodes: 256 KiB of input, at most 1 MiB of output per call.
    best, n = 1e9, 0
    for _ in range(reps):
        t0 = time.perf_counter()
        n, pos, tail, d = 0, 0, b"", mod.decompressobj(31)
        while True:
            if not tail:
                if pos >= len(gz):
                    break
                tail, pos = gz[pos:pos + (256 << 10)], pos + (256 << 10)
            out = d.decompress(tail, 1 << 20)
            n += len(out)
            tail = d.unconsumed_tail
            if d.eof:  # the next member (pigz writes one, snapfs one per chunk)
                tail, d = d.unused_data, mod.decompressobj(31)
        best = min(best, time.perf_counter() - t0)
    return n / 1e6 / best
for name, mod in (("zlib (system)", zlib), ("zlib-ng", zlib_ng), ("ISA-L", isal_zlib)):
    print(f"{name}\t{run(mod):.1f}")
PY
