import io, random, sys, tarfile

letters = "abcdefghijklmnopqrstuvwxyz"
R = random.Random(12345)
vocab = ["".join(R.choice(letters) for _ in range(R.randint(2, 11))) for _ in range(2048)]

def pool(nbytes, seed):
    """Lines of 12 random words, some with a number: gzip ~2.7x, zstd ~3x."""
    r, out, n = random.Random(seed), [], 0
    while n < nbytes:
        ws = r.choices(vocab, k=12)
        if r.random() < 0.3:
            ws.append(str(r.randrange(1000000)))
        line = " ".join(ws) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()

def big(path, mb):
    # 64 KiB blocks cut at random places out of a 32 MiB pool, each stamped with its
    # number: gzip's 32 KiB window sees fresh text, and no two blocks are equal.
    r, p, block = random.Random(2), pool(32 << 20, 1), 64 << 10
    with open(path, "wb") as f:
        for i in range(mb * 16):
            stamp = b"#block %08d\n" % i
            off = r.randrange(len(p) - block)
            f.write(stamp + p[off:off + block - len(stamp)])

def small(path, files):
    r, p = random.Random(3), pool(8 << 20, 4)
    dirs = max(1, files // 100)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        def member(name, kind, size=0):
            ti = tarfile.TarInfo(name)
            ti.type, ti.size, ti.mtime, ti.uid, ti.gid = kind, size, 1700000000, 0, 0
            ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            return ti
        for a in range((dirs + 31) // 32):
            t.addfile(member("tree/a%02d" % a, tarfile.DIRTYPE))
        for d in range(dirs):
            t.addfile(member("tree/a%02d/b%04d" % (d // 32, d), tarfile.DIRTYPE))
        for i in range(files):
            d = i % dirs
            size = int(16384 * r.random() ** 2)  # 0-16 KiB, mostly small
            off = r.randrange(len(p) - size)
            t.addfile(member("tree/a%02d/b%04d/f%06d.txt" % (d // 32, d, i), tarfile.REGTYPE, size),
                      io.BytesIO(p[off:off + size]))


def layers(outdir, nlayers, per_layer):
    """nlayers small tars, each adding per_layer files spread over 20 shared dirs,
    plus single.tar holding the same merged tree in one archive."""
    import os
    r = random.Random(5)
    def member(name, kind, size=0):
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.mtime, ti.uid, ti.gid = kind, size, 1700000000, 0, 0
        ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        return ti
    dirs = ["tree/s%02d" % d for d in range(20)]
    allfiles = []
    for k in range(nlayers):
        files = []
        for j in range(per_layer):
            data = ("layer %d file %d " % (k, j) * 20).encode()[: r.randint(50, 400)]
            files.append(("%s/l%02d_f%04d.txt" % (dirs[j % 20], k, j), data))
        allfiles += files
        with tarfile.open(os.path.join(outdir, "layer%02d.tar" % k), "w", format=tarfile.GNU_FORMAT) as t:
            t.addfile(member("tree", tarfile.DIRTYPE))
            for d in dirs:
                t.addfile(member(d, tarfile.DIRTYPE))
            for n, data in files:
                t.addfile(member(n, tarfile.REGTYPE, len(data)), io.BytesIO(data))
    with tarfile.open(os.path.join(outdir, "single.tar"), "w", format=tarfile.GNU_FORMAT) as t:
        t.addfile(member("tree", tarfile.DIRTYPE))
        for d in dirs:
            t.addfile(member(d, tarfile.DIRTYPE))
        for n, data in allfiles:
            t.addfile(member(n, tarfile.REGTYPE, len(data)), io.BytesIO(data))

if sys.argv[1] == "big":
    big(sys.argv[2], int(sys.argv[3]))
elif sys.argv[1] == "small":
    small(sys.argv[2], int(sys.argv[3]))
elif sys.argv[1] == "layers":
    layers(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
