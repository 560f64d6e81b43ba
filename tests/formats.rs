//! Every container format × GNU tar flavour, compared entry by entry with
//! `tar -x`; random-offset reads through compressed archives; huge sparse
//! files.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::corpus::{self, Comp};
use crate::tree::{self, read_full_at, CmpOpts};
use crate::util::{self, merge_ranges, seek_ranges, Lcg, Mount, TestDir};

fn std_roundtrip(name: &str, format: &str, comp: Comp) {
    let td = TestDir::new(name);
    let (tar, arch) = corpus::std_archive(td.path(), format, comp);
    let exp = td.join("x");
    corpus::extract(&tar, &exp);
    let m = Mount::new(&arch, &td.join("mnt"));
    let n = tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());
    assert!(n > 330, "expected a full tree, compared only {n} entries");
    assert_eq!(fs::read(m.join("text.txt")).unwrap(), b"hello snapfs\n");
    assert_eq!(
        fs::read_link(m.join("sym_abs")).unwrap(),
        Path::new("/etc/hostname")
    );
}

macro_rules! std_tests {
    ($($name:ident: $fmt:expr, $comp:expr;)*) => {$(
        #[test]
        fn $name() {
            std_roundtrip(stringify!($name), $fmt, $comp);
        }
    )*};
}

std_tests! {
    gnu_tar_plain: "gnu", Comp::None;
    gnu_tar_gzip: "gnu", Comp::Gzip;
    gnu_tar_pigz: "gnu", Comp::Pigz;
    gnu_tar_gzip_concat: "gnu", Comp::GzipConcat;
    gnu_tar_zstd_single: "gnu", Comp::ZstdSingle;
    gnu_tar_zstd_multi: "gnu", Comp::ZstdMulti;
    gnu_tar_pzstd: "gnu", Comp::Pzstd;
    pax_tar_plain: "posix", Comp::None;
    pax_tar_gzip: "posix", Comp::Gzip;
    pax_tar_pigz: "posix", Comp::Pigz;
    pax_tar_gzip_concat: "posix", Comp::GzipConcat;
    pax_tar_zstd_single: "posix", Comp::ZstdSingle;
    pax_tar_zstd_multi: "posix", Comp::ZstdMulti;
    pax_tar_pzstd: "posix", Comp::Pzstd;
    gnu_tar_xz_multi_block: "gnu", Comp::XzMulti;
    gnu_tar_xz_single_block: "gnu", Comp::XzSingle;
    gnu_tar_xz_multi_stream: "gnu", Comp::XzConcat;
    gnu_tar_bzip2_9: "gnu", Comp::Bzip2Best;
    gnu_tar_bzip2_1: "gnu", Comp::Bzip2Fast;
    gnu_tar_pbzip2: "gnu", Comp::Pbzip2;
    gnu_tar_lbzip2: "gnu", Comp::Lbzip2;
    gnu_tar_bzip2_concat: "gnu", Comp::Bzip2Concat;
    pax_tar_xz_multi_block: "posix", Comp::XzMulti;
    pax_tar_bzip2_9: "posix", Comp::Bzip2Best;
}

// ------------------------------------------------------------ random reads

const MIB: u64 = 1 << 20;

fn random_reads(name: &str, comp: Comp, size: usize, mount_args: &[&str]) {
    let td = TestDir::new(name);
    let src = td.mkdir("src");
    let data = util::semi_compressible(size, 42);
    fs::write(src.join("big.bin"), &data).unwrap();
    fs::write(src.join("after"), b"a small file after the big one\n").unwrap();
    let tar = td.join("r.tar");
    corpus::gnu_tar(&src, &tar, "posix", &[]);
    let arch = corpus::compress(&tar, comp);
    let m = Mount::with_args(&arch, &td.join("mnt"), mount_args);
    let p = m.join("big.bin");
    assert_eq!(fs::metadata(&p).unwrap().len(), size as u64);
    let size64 = size as u64;

    // Offsets: edges, every 4 MiB boundary straddled, and random ones.
    let mut reqs: Vec<(u64, usize)> = vec![
        (0, 1),
        (0, 4096),
        (size64 - 1, 1),
        (size64 - 100, 4096),
        (size64, 10),
    ];
    let mut k = 4 * MIB;
    while k < size64 {
        reqs.push((k - 1, 2));
        reqs.push((k - 3000, 70_000));
        reqs.push((k - MIB, (2 * MIB) as usize));
        k += 4 * MIB;
    }
    let mut g = Lcg::new(1234);
    for i in 0..300 {
        let off = g.below(size64);
        let len = match i % 4 {
            0 => 1 + g.below(64) as usize,
            1 => 1 + g.below(128 * 1024) as usize,
            2 => 1 + g.below(MIB) as usize,
            _ => 1 + g.below(6 * MIB) as usize,
        };
        reqs.push((off, len));
    }
    let check = |f: &File, off: u64, len: usize, what: &str| {
        let mut buf = vec![0u8; len];
        let n = read_full_at(f, &mut buf, off)
            .unwrap_or_else(|e| panic!("{what}: pread({off}, {len}) failed: {e}"));
        let end = (off as usize + len).min(size);
        let want = if off as usize >= size {
            &[][..]
        } else {
            &data[off as usize..end]
        };
        if n != want.len() || buf[..n] != *want {
            let first = buf[..n.min(want.len())]
                .iter()
                .zip(want)
                .position(|(a, b)| a != b);
            panic!("{what}: pread({off}, {len}) returned {n} bytes (want {}), first mismatch at +{first:?}", want.len());
        }
    };
    let f = File::open(&p).unwrap();
    for &(off, len) in &reqs {
        check(&f, off, len, "forward");
    }
    // Backwards, with a fresh handle.
    let f2 = File::open(&p).unwrap();
    let mut rev = reqs.clone();
    rev.sort_by_key(|r| std::cmp::Reverse(r.0));
    for &(off, len) in rev.iter().take(120) {
        check(&f2, off, len, "backward");
    }
    // Concurrent readers.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let p = p.clone();
            let check = &check;
            s.spawn(move || {
                let f = File::open(&p).unwrap();
                let mut g = Lcg::new(77 + t);
                for _ in 0..60 {
                    let off = g.below(size64);
                    let len = 1 + g.below(512 * 1024) as usize;
                    check(&f, off, len, "concurrent");
                }
            });
        }
    });
    // Whole file, sequentially.
    let all = fs::read(&p).unwrap();
    assert!(
        all.len() == data.len() && all == data,
        "sequential read of big.bin differs"
    );
    assert_eq!(
        fs::read(m.join("after")).unwrap(),
        b"a small file after the big one\n"
    );
}

#[test]
fn random_reads_gzip_64mib() {
    random_reads("rr-gzip", Comp::Gzip, 64 << 20, &[]);
}

#[test]
fn random_reads_pigz_small_cache() {
    random_reads(
        "rr-pigz",
        Comp::Pigz,
        24 << 20,
        &["--cache-size", "1048576"],
    );
}

#[test]
fn random_reads_zstd_multiframe() {
    random_reads("rr-zstd", Comp::ZstdMulti, 24 << 20, &[]);
}

#[test]
fn random_reads_xz_multi_block() {
    random_reads("rr-xz", Comp::XzMulti, 24 << 20, &[]);
}

#[test]
fn random_reads_xz_span_per_block_small_cache() {
    random_reads(
        "rr-xz-1m",
        Comp::XzMulti,
        12 << 20,
        &["--span", "1M", "--cache-size", "1048576"],
    );
}

#[test]
fn random_reads_bzip2() {
    random_reads("rr-bzip2", Comp::Bzip2Best, 16 << 20, &[]);
}

#[test]
fn random_reads_pbzip2_span_1m() {
    random_reads("rr-pbzip2", Comp::Pbzip2, 12 << 20, &["--span", "1M"]);
}

#[test]
fn random_reads_plain_tar() {
    random_reads("rr-plain", Comp::None, 16 << 20, &[]);
}

/// A single-block xz file (plain `xz`, no `-T`) with more than 64 MiB in its block has
/// no seek point inside it: it is decompressed once into a cache file, with a note.
#[test]
fn xz_single_block_falls_back_to_a_cache_file() {
    let td = TestDir::new("xz-cachefile");
    let data = util::semi_compressible(72 << 20, 18);
    fs::create_dir_all(td.join("src")).unwrap();
    fs::write(td.join("src/big.txt"), &data).unwrap();
    util::sh(
        td.path(),
        "tar -C src -cf a.tar big.txt && xz -q -0 -T1 a.tar",
    );
    let archive = td.join("a.tar.xz");
    let mnt = td.mkdir("mnt").canonicalize().unwrap();
    let cache = td.mkdir("cache");
    let r = util::run(
        std::process::Command::new(util::bin())
            .env("XDG_CACHE_HOME", &cache)
            .arg("mount")
            .arg(&archive)
            .arg(&mnt),
    );
    r.assert_ok();
    let m = Mount::adopt(&archive, &mnt);
    assert!(
        r.stderr_str().contains("decompressing it once") && r.stderr_str().contains("xz"),
        "no note: {}",
        r.stderr_str()
    );
    let f = File::open(m.join("big.txt")).unwrap();
    let mut buf = vec![0u8; 100_000];
    for off in [50 << 20, 3, 71 << 20] {
        let n = read_full_at(&f, &mut buf, off).unwrap();
        assert!(buf[..n] == data[off as usize..off as usize + n]);
    }
    assert!(fs::read(m.join("big.txt")).unwrap() == data);
    assert_eq!(fs::read_dir(cache.join("snapfs")).unwrap().count(), 1);
}

// ------------------------------------------------------------ huge sparse

// slow
fn huge_sparse(name: &str, format: &str, extra: &[&str]) {
    let td = TestDir::new(name);
    let src = td.join("src");
    let huge = corpus::build_huge_sparse(&src);
    let tar = td.join("h.tar");
    corpus::gnu_tar(&src, &tar, format, extra);
    assert!(
        fs::metadata(&tar).unwrap().len() < 16 << 20,
        "GNU tar did not store {} sparsely",
        huge.display()
    );
    let exp = td.join("x");
    corpus::extract(&tar, &exp);
    let m = Mount::new(&tar, &td.join("mnt"));
    tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());

    let mp = m.join("huge.img");
    let md = fs::symlink_metadata(&mp).unwrap();
    assert_eq!(md.len(), 9 << 30);
    let exp_ranges = merge_ranges(seek_ranges(&exp.join("huge.img")));
    let data_total: u64 = exp_ranges.iter().map(|r| r.1 - r.0).sum();
    assert!(
        md.blocks() > 0 && md.blocks() * 512 <= data_total + MIB,
        "st_blocks {} ({} bytes) of the sparse file should reflect its {} data bytes",
        md.blocks(),
        md.blocks() * 512,
        data_total
    );
    let mnt_ranges = merge_ranges(seek_ranges(&mp));
    for r in &exp_ranges {
        assert!(
            mnt_ranges.iter().any(|m| m.0 <= r.0 && r.1 <= m.1),
            "data range {r:?} not reported by SEEK_DATA/SEEK_HOLE in the mount; mount ranges: {mnt_ranges:?}"
        );
    }
    let mnt_total: u64 = mnt_ranges.iter().map(|r| r.1 - r.0).sum();
    assert!(
        mnt_total <= data_total + MIB,
        "mount reports {mnt_total} data bytes via SEEK_DATA/SEEK_HOLE, the file has {data_total}: {mnt_ranges:?}"
    );
    // du agrees.
    let du = util::run_ok(std::process::Command::new("du").arg("-k").arg(&mp));
    let kib: u64 = du
        .stdout_str()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        kib * 1024 <= data_total + MIB,
        "du reports {kib} KiB for a file with {data_total} data bytes"
    );
}

#[test]
fn huge_sparse_pax_1_0() {
    // slow
    huge_sparse("sparse-pax10", "posix", &["--sparse-version=1.0"]);
}

#[test]
fn huge_sparse_pax_0_1() {
    // slow
    huge_sparse("sparse-pax01", "posix", &["--sparse-version=0.1"]);
}

#[test]
fn huge_sparse_pax_0_0() {
    // slow
    huge_sparse("sparse-pax00", "posix", &["--sparse-version=0.0"]);
}

#[test]
fn huge_sparse_gnu_old() {
    // slow
    huge_sparse("sparse-gnu", "gnu", &[]);
}

#[test]
fn huge_sparse_pax_gzip() {
    // slow: a >8 GiB sparse file inside a compressed archive.
    let td = TestDir::new("sparse-gz");
    let src = td.join("src");
    corpus::build_huge_sparse(&src);
    let tar = td.join("h.tar");
    corpus::gnu_tar(&src, &tar, "posix", &[]);
    let gz = corpus::compress(&tar, Comp::Gzip);
    let exp = td.join("x");
    corpus::extract(&tar, &exp);
    let m = Mount::new(&gz, &td.join("mnt"));
    tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());
}
