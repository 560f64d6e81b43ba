//! Criterion benchmarks: index build throughput (tar, tar.gz) and random 4 KiB reads
//! through `IndexTree` on a tar.gz with a small and a large span cache.
//!
//! The corpus is generated once per run into a temp dir and is deterministic:
//! * `big`: one ~64 MiB file of LCG-chosen words (gzip ratio ~2.5x), plus a few
//!   small files, as tar, tar.gz (flate2) and tar.gz (pigz, if installed);
//! * `small`: 20k files of 0–16 KiB over 200 dirs, as tar and tar.gz (flate2, pigz);
//! * both also as multi-frame tar.zst (independent 4 MiB frames, like `pzstd`).
//!
//! An archive snapfs cannot index (say, a format still being written) is reported on
//! stderr and its benches are skipped, so the others still run.
//!
//! `cargo bench --bench index -- --test` runs every bench once on a shrunken corpus
//! (4 MiB / 2k files) as a smoke test. `SNAPFS_BENCH_MB` and `SNAPFS_BENCH_FILES`
//! override the corpus size.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use snapfs::archive::{Archive, StreamReader};
use snapfs::index::build::{build_index, BuildOptions};
use snapfs::index::tree::{IndexTree, Tree};
use snapfs::index::{Index, ROOT_INO};

const BIG_NAME: &str = "big.dat";

/// Deterministic 64-bit LCG (Knuth MMIX constants).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A vocabulary of 2048 pseudo-words of 2–11 lowercase letters.
fn vocabulary(rng: &mut Lcg) -> Vec<Vec<u8>> {
    (0..2048)
        .map(|_| {
            let len = 2 + rng.below(10) as usize;
            (0..len).map(|_| b'a' + rng.below(26) as u8).collect()
        })
        .collect()
}

/// `len` bytes of word text: semi-compressible (neither random nor repetitive).
fn words(rng: &mut Lcg, vocab: &[Vec<u8>], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    let mut col = 0;
    while out.len() < len {
        let w = &vocab[rng.below(vocab.len() as u64) as usize];
        out.extend_from_slice(w);
        col += w.len() + 1;
        if col > 72 {
            out.push(b'\n');
            col = 0;
        } else {
            out.push(b' ');
        }
        // A sprinkle of digits, like logs and dumps have.
        if rng.below(16) == 0 {
            write!(out, "{} ", rng.next() % 100_000).unwrap();
        }
    }
    out.truncate(len);
    out
}

fn append(b: &mut tar::Builder<BufWriter<File>>, path: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, data).unwrap();
}

fn append_dir(b: &mut tar::Builder<BufWriter<File>>, path: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Directory);
    b.append_data(&mut h, path, &[][..]).unwrap();
}

fn write_big_tar(path: &Path, mb: usize) {
    let mut rng = Lcg(0x5eed_0001);
    let vocab = vocabulary(&mut rng);
    let mut b = tar::Builder::new(BufWriter::new(File::create(path).unwrap()));
    append_dir(&mut b, "data/");
    append(&mut b, "data/README", b"benchmark corpus\n", 0o644);
    let total = mb << 20;
    let mut h = tar::Header::new_gnu();
    h.set_size(total as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    let chunks: Vec<u8> = (0..mb)
        .flat_map(|_| words(&mut rng, &vocab, 1 << 20))
        .collect();
    b.append_data(&mut h, format!("data/{BIG_NAME}"), &chunks[..])
        .unwrap();
    append(&mut b, "data/trailer", b"end\n", 0o644);
    b.into_inner().unwrap().flush().unwrap();
}

fn write_small_tar(path: &Path, files: usize) {
    let mut rng = Lcg(0x5eed_0002);
    let vocab = vocabulary(&mut rng);
    let pool = words(&mut rng, &vocab, 4 << 20);
    let dirs = (files / 100).max(1);
    let mut b = tar::Builder::new(BufWriter::new(File::create(path).unwrap()));
    for d in 0..dirs {
        append_dir(&mut b, &format!("d{:04}/", d));
    }
    for i in 0..files {
        // Skewed towards small files, like source trees: 16 KiB * u^2.
        let u = rng.below(1 << 16);
        let size = ((16384 * u * u) >> 32) as usize;
        let off = rng.below((pool.len() - size) as u64) as usize;
        append(
            &mut b,
            &format!("d{:04}/f{:06}.txt", i % dirs, i),
            &pool[off..off + size],
            0o644,
        );
    }
    b.into_inner().unwrap().flush().unwrap();
}

fn gzip_flate2(src: &Path, dst: &Path) {
    let mut enc = flate2::write::GzEncoder::new(
        BufWriter::new(File::create(dst).unwrap()),
        flate2::Compression::default(),
    );
    std::io::copy(&mut File::open(src).unwrap(), &mut enc).unwrap();
    enc.finish().unwrap().flush().unwrap();
}

/// Compresses `src` as independent zstd frames of 4 MiB input each (seekable by snapfs).
fn zstd_frames(src: &Path, dst: &Path) {
    let data = std::fs::read(src).unwrap();
    let mut out = BufWriter::new(File::create(dst).unwrap());
    for chunk in data.chunks(4 << 20) {
        out.write_all(&zstd::bulk::compress(chunk, 3).unwrap())
            .unwrap();
    }
    out.flush().unwrap();
}

fn gzip_pigz(src: &Path, dst: &Path) -> bool {
    let ok = Command::new("pigz")
        .arg("-c")
        .stdin(File::open(src).unwrap())
        .stdout(File::create(dst).unwrap())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = std::fs::remove_file(dst);
    }
    ok
}

struct Corpus {
    _dir: tempfile::TempDir,
    /// (label, path, uncompressed tar bytes)
    archives: Vec<(String, PathBuf, u64)>,
    big_gz: PathBuf,
    big_zst: PathBuf,
    big_tar: PathBuf,
    big_size: u64,
}

fn smoke() -> bool {
    std::env::args().any(|a| a == "--test")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn corpus() -> &'static Corpus {
    static C: OnceLock<Corpus> = OnceLock::new();
    C.get_or_init(|| {
        let (mb, files) = if smoke() { (4, 2000) } else { (64, 20_000) };
        let mb = env_usize("SNAPFS_BENCH_MB", mb).max(1);
        let files = env_usize("SNAPFS_BENCH_FILES", files).max(1);
        let dir = tempfile::Builder::new()
            .prefix("snapfs-bench")
            .tempdir()
            .unwrap();
        let p = |n: &str| dir.path().join(n);
        let t = std::time::Instant::now();
        write_big_tar(&p("big.tar"), mb);
        write_small_tar(&p("small.tar"), files);
        let mut archives = Vec::new();
        for base in ["big", "small"] {
            let tar = p(&format!("{base}.tar"));
            let len = std::fs::metadata(&tar).unwrap().len();
            archives.push((format!("{base}.tar"), tar.clone(), len));
            let gz = p(&format!("{base}.flate2.tar.gz"));
            gzip_flate2(&tar, &gz);
            archives.push((format!("{base}.tar.gz(flate2)"), gz, len));
            let pz = p(&format!("{base}.pigz.tar.gz"));
            if gzip_pigz(&tar, &pz) {
                archives.push((format!("{base}.tar.gz(pigz)"), pz, len));
            }
            let zs = p(&format!("{base}.tar.zst"));
            zstd_frames(&tar, &zs);
            archives.push((format!("{base}.tar.zst"), zs, len));
        }
        for (label, path, len) in &archives {
            let c = std::fs::metadata(path).unwrap().len();
            eprintln!(
                "corpus: {label}: {:.1} MiB -> {:.1} MiB ({:.2}x)",
                *len as f64 / 1048576.0,
                c as f64 / 1048576.0,
                *len as f64 / c as f64
            );
        }
        eprintln!(
            "corpus: generated in {:.1} s in {}",
            t.elapsed().as_secs_f64(),
            dir.path().display()
        );
        // Keep only what this snapfs can index.
        archives.retain(|(label, path, _)| {
            let ok = Archive::open(path)
                .and_then(|a| build_index(&a, &BuildOptions::default(), &Default::default()));
            if let Err(e) = &ok {
                eprintln!("corpus: SKIPPING {label}: snapfs cannot index it: {e}");
            }
            ok.is_ok()
        });
        Corpus {
            big_gz: p("big.flate2.tar.gz"),
            big_zst: p("big.tar.zst"),
            big_tar: p("big.tar"),
            big_size: (mb as u64) << 20,
            archives,
            _dir: dir,
        }
    })
}

fn index_of(path: &Path) -> Index {
    let archive = Archive::open(path).unwrap();
    build_index(&archive, &BuildOptions::default(), &Default::default()).unwrap()
}

fn bench_build(c: &mut Criterion) {
    let corpus = corpus();
    let mut g = c.benchmark_group("build_index");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    for (label, path, tar_len) in &corpus.archives {
        // Throughput in uncompressed tar bytes, so tar and tar.gz compare directly.
        g.throughput(Throughput::Bytes(*tar_len));
        g.bench_with_input(BenchmarkId::from_parameter(label), path, |b, path| {
            // A fresh Archive per build: build_index reads through a dup of the
            // archive's fd, which shares its file offset.
            b.iter(|| {
                let index = index_of(path);
                assert!(index.inodes.len() > 2);
                index
            })
        });
    }
    g.finish();
}

/// A tree over `path` and the inode of its big file.
fn tree_of(path: &Path, cache_bytes: u64) -> (IndexTree, u64) {
    let index = Arc::new(index_of(path));
    let archive = Archive::open(path).unwrap();
    let stream = StreamReader::new(archive.source, index.table.clone(), cache_bytes);
    let tree = IndexTree::new(index, stream);
    let dir = tree.lookup(ROOT_INO, b"data").unwrap();
    let ino = tree.lookup(dir, BIG_NAME.as_bytes()).unwrap();
    (tree, ino)
}

fn bench_read(c: &mut Criterion) {
    let corpus = corpus();
    let size = corpus.big_size;
    let pages = size / 4096;
    // Check the data path once against the plain tar before timing anything.
    let (plain, plain_ino) = tree_of(&corpus.big_tar, 0);
    assert_eq!(plain.attr(plain_ino).unwrap().size, size);
    let mut g = c.benchmark_group("read_4k_random");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes(4096));
    let cases: [(&str, &Path, u64); 5] = [
        ("tar", &corpus.big_tar, 0),
        ("tar.gz/cache16M", &corpus.big_gz, 16 << 20),
        ("tar.gz/cache1G", &corpus.big_gz, 1 << 30),
        ("tar.zst/cache16M", &corpus.big_zst, 16 << 20),
        ("tar.zst/cache1G", &corpus.big_zst, 1 << 30),
    ];
    for (label, path, cache) in cases {
        if !corpus.archives.iter().any(|(_, p, _)| p == path) {
            eprintln!("read_4k_random/{label}: skipped (archive not indexable)");
            continue;
        }
        let (tree, ino) = tree_of(path, cache);
        let mut check = Lcg(7);
        for _ in 0..8 {
            let off = check.below(pages) * 4096;
            assert_eq!(
                tree.read(ino, off, 4096).unwrap(),
                plain.read(plain_ino, off, 4096).unwrap(),
                "{label} @ {off}"
            );
        }
        let mut rng = Lcg(42);
        g.bench_function(label, |b| {
            b.iter(|| {
                let off = rng.below(pages) * 4096;
                let data = tree.read(ino, off, 4096).unwrap();
                assert_eq!(data.len(), 4096);
                data
            })
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_build(&mut c);
    bench_read(&mut c);
    c.final_summary();
}
