//! Glue: the bodies of the fuzz targets, shared by the cargo-fuzz crate in `fuzz/` and
//! the bounded corpus test in `tests/fuzz.rs`, so both run exactly the same code.
//! Not part of the supported API.
//!
//! Each target drives the library as `snapfs index` and a mount do (archive bytes →
//! index → tree → every `Tree` call a FUSE request can make) and checks invariants on
//! the way. Malformed input is expected: parse and read errors are `Ok(())`. An
//! `Err` is a violated invariant (a bug); the callers turn it into a panic.
//!
//! * [`tar_index`]: bytes as an archive (plain tar, or gzip / zstd by magic) →
//!   embedded index and indexing pass → round trip through the index file → walk.
//! * [`checkpoint_reader`]: gzip / zstd / xz / bzip2 seek tables. The first byte picks
//!   the mode: valid streams compressed here from the rest (members, flushes, frames,
//!   blocks, streams, levels drawn from the input) whose checkpoint reads must return
//!   exactly the bytes put in, or the rest as a raw stream that must be refused or read
//!   back consistently.
//! * [`index_loader`]: bytes as an index file, as is and with its checksum fixed up
//!   (so mutations reach `validate`) → decode → walk.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use crate::archive::bzip2::{self as bz2, Bz2Indexer, Bz2SeekTable};
use crate::archive::gzip::{self, GzipIndexer, GzipSeekTable};
use crate::archive::xz::{self, XzIndexer, XzSeekTable};
use crate::archive::zstd::{self as zst, ZstdIndexer, ZstdSeekTable};
use crate::archive::{Archive, Compression, Progress, SeekTable, StreamReader};
use crate::index::build::{build_index, BuildOptions};
use crate::index::tree::{IndexTree, Tree};
use crate::index::{format, Index, ROOT_INO};
use crate::source::{FileSource, Source};

/// `Err` names a violated invariant; malformed input alone is never an `Err`.
pub type Outcome = std::result::Result<(), String>;

/// Decompressed bytes a target is willing to handle (bombs are cut short, not bugs).
const MAX_STREAM: usize = 8 << 20;
/// File bytes compared per file.
const FILE_READ_CAP: u64 = 256 << 10;
/// Directories visited per walk.
const MAX_DIRS: usize = 20_000;
/// Spans decoded one by one per stream (a sample, first and last included, if more).
const MAX_SPANS: usize = 48;

/// A small deterministic generator (xorshift64*), seeded from the input.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (0 is remapped).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A generator seeded from `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Rng {
        let h = crc32fast::hash(bytes);
        Rng::new(u64::from(h) << 32 | bytes.len() as u64)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }
}

/// An unnamed temporary file holding `bytes`.
fn temp_file(bytes: &[u8]) -> std::result::Result<File, String> {
    let mut f = tempfile::tempfile().map_err(|e| format!("harness: tempfile: {e}"))?;
    f.write_all(bytes)
        .map_err(|e| format!("harness: writing tempfile: {e}"))?;
    Ok(f)
}

/// A path naming the open (unlinked) temporary file `f`, so that readers checking
/// that their archive's path still names the held file find it unchanged.
fn path_of(f: &File) -> PathBuf {
    use std::os::unix::io::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// A source over the open temporary file `f`, named by [`path_of`].
fn source_of(f: &File) -> std::result::Result<Arc<dyn Source>, String> {
    let file = f.try_clone().map_err(|e| format!("harness: clone: {e}"))?;
    let source = FileSource::from_file(file, path_of(f)).map_err(|e| format!("harness: {e}"))?;
    Ok(Arc::new(source))
}

/// An [`Archive`] over `bytes`, as [`Archive::open`] would make it, and the file that
/// holds them.
fn archive_of(bytes: &[u8]) -> std::result::Result<(Archive, File), String> {
    let file = temp_file(bytes)?;
    let archive = Archive::from_source(source_of(&file)?).map_err(|e| format!("harness: {e}"))?;
    Ok((archive, file))
}

/// Target 1: `data` is an archive (and, if plain, again with its header checksums
/// fixed up). Never panics; an index built from it must survive the index file round
/// trip, and its tree must walk and read back consistently.
pub fn tar_index(data: &[u8]) -> Outcome {
    archive_case(data)?;
    // Recompute header checksums so that mutated header fields reach the parser.
    if Compression::detect(data) == Compression::None {
        if let Some(fixed) = fix_tar_checksums(data) {
            archive_case(&fixed)?;
        }
    }
    Ok(())
}

/// `data` with the checksum of every 512-byte block that has one rewritten to match
/// (`None` if none changed). Data blocks are left alone unless they happen to hold
/// octal digits exactly where a header keeps its checksum.
pub fn fix_tar_checksums(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = data.to_vec();
    let mut changed = false;
    for block in out.chunks_exact_mut(512) {
        let Some(field) = block.get(148..156) else {
            continue;
        };
        let digits = field.iter().filter(|b| (b'0'..=b'7').contains(b)).count();
        if digits == 0 || field.iter().any(|b| !b"01234567 \0".contains(b)) {
            continue;
        }
        let sum: u32 = block
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        let want = format!("{sum:06o}\0 ");
        if let Some(field) = block.get_mut(148..156) {
            if field != want.as_bytes() {
                field.copy_from_slice(want.as_bytes());
                changed = true;
            }
        }
    }
    changed.then_some(out)
}

/// One archive: embedded index, indexing pass, index file round trip, walk.
fn archive_case(data: &[u8]) -> Outcome {
    let (archive, file) = archive_of(data)?;
    let mut rng = Rng::from_bytes(data);
    // The mount path looks for an embedded index first (only valid, checked ones load).
    if let Ok(Some(index)) = crate::snapshot::read_embedded(&archive) {
        walk_index(index, &file, false, &mut rng)?;
    }
    let opts = BuildOptions {
        span_bytes: 1 + rng.below(4096) as u64,
    };
    let Ok(index) = build_index(&archive, &opts, &Progress::default()) else {
        return Ok(());
    };
    // What the indexer produced must be accepted by the loader, unchanged.
    let bytes = format::encode(&index);
    let loaded =
        format::decode(&bytes).map_err(|e| format!("a freshly built index is rejected: {e}"))?;
    if format::encode(&loaded) != bytes {
        return Err("the index changes in an encode/decode round trip".into());
    }
    if index.table.max_span_len() > MAX_STREAM as u64 {
        return Ok(());
    }
    // Built from these very bytes, so every read must succeed.
    walk_index(loaded, &file, true, &mut rng)
}

/// Target 3: `data` is an index file. Decoding never panics; an accepted index walks
/// without panics or loops, and encodes to an index that is accepted again.
pub fn index_loader(data: &[u8]) -> Outcome {
    let _ = format::peek(data);
    let _ = format::peek_prefix(data);
    load_and_walk(data)?;
    // Recompute the checksums so that mutated records reach the record checks.
    let mut fixed = data.to_vec();
    if format::reseal(&mut fixed) {
        load_and_walk(&fixed)?;
        map_and_walk(&fixed)?;
    }
    Ok(())
}

/// Serves `bytes` as a mount does, from a mapped file, each record checked when it
/// is first read: corrupt ones may fail requests, but nothing may panic or loop.
fn map_and_walk(bytes: &[u8]) -> Outcome {
    use std::io::Write;
    let mut file = tempfile::tempfile().map_err(|e| format!("harness: tempfile: {e}"))?;
    file.write_all(bytes)
        .map_err(|e| format!("harness: write: {e}"))?;
    if bytes.is_empty() {
        return Ok(());
    }
    // SAFETY: a private temporary file nobody else writes.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("harness: mmap: {e}"))?;
    let Ok(index) = format::decode_mapped(&std::sync::Arc::new(map), std::path::Path::new("fuzz"))
    else {
        return Ok(());
    };
    let backing = tempfile::tempfile().map_err(|e| format!("harness: tempfile: {e}"))?;
    backing
        .set_len(index.stream_size.min(1 << 20))
        .map_err(|e| format!("harness: set_len: {e}"))?;
    let mut rng = Rng::from_bytes(bytes);
    walk_index(index, &backing, false, &mut rng)
}

fn load_and_walk(bytes: &[u8]) -> Outcome {
    let Ok(index) = format::decode(bytes) else {
        return Ok(());
    };
    let again = format::encode(&index);
    let reloaded = format::decode(&again)
        .map_err(|e| format!("an accepted index re-encodes to a rejected one: {e}"))?;
    if format::encode(&reloaded) != again {
        return Err("an accepted index changes in an encode/decode round trip".into());
    }
    // No archive belongs to a fuzzed index: serve reads from zeros (they may fail).
    let backing = tempfile::tempfile().map_err(|e| format!("harness: tempfile: {e}"))?;
    backing
        .set_len(index.stream_size.min(1 << 20))
        .map_err(|e| format!("harness: set_len: {e}"))?;
    let mut rng = Rng::from_bytes(bytes);
    match walk_index(index, &backing, false, &mut rng) {
        // A record found corrupt on first use fails its requests (EIO): allowed.
        Err(e) if e.contains("index fuzz: ") => Ok(()),
        other => other,
    }
}

/// Serves `index` over `archive` and walks it. `strict`: reads must not fail.
fn walk_index(index: Index, archive: &File, strict: bool, rng: &mut Rng) -> Outcome {
    let source = source_of(archive)?;
    let table = index.table.clone();
    let stream = if table.max_span_len() > crate::index::store::MAX_SPAN {
        // A mount serves such a stream from a decompressed cache file instead (made
        // by `store::cache_file_for`); the archive file stands in for it.
        let cache_file = archive
            .try_clone()
            .map_err(|e| format!("harness: clone: {e}"))?;
        StreamReader::with_cache_file(source, table, cache_file)
    } else {
        StreamReader::new(source, table, 1 + rng.below(256 << 10) as u64)
    };
    let tree = IndexTree::new(Arc::new(index), stream);
    walk(&tree, strict, rng)
}

/// One `read_dir` entry: (offset of the next entry, name, inode, type bits).
type Entry = (u64, Vec<u8>, u64, u32);

/// Lists `dir` the way the kernel does: pages of `page` entries (0 = no limit), each
/// call resuming at the offset of the last entry taken.
fn list(tree: &dyn Tree, dir: u64, page: usize) -> crate::Result<Vec<Entry>> {
    let mut out: Vec<Entry> = Vec::new();
    let mut offset = 0;
    loop {
        let before = out.len();
        let mut taken = 0;
        tree.read_dir(dir, offset, &mut |off, name, ino, kind| {
            if page != 0 && taken == page {
                return true;
            }
            taken += 1;
            out.push((off, name.to_vec(), ino, kind));
            false
        })?;
        if page == 0 || out.len() == before {
            return Ok(out);
        }
        offset = out.last().map_or(0, |e| e.0);
    }
}

/// Walks the whole tree from the root: listings, lookups, attributes, links, xattrs
/// and file reads must agree with each other, and no directory may be reached twice.
pub fn walk(tree: &dyn Tree, strict: bool, rng: &mut Rng) -> Outcome {
    let root = tree
        .attr(ROOT_INO)
        .map_err(|e| format!("the root has no attributes: {e}"))?;
    if root.mode & libc::S_IFMT != libc::S_IFDIR {
        return Err("the root is not a directory".into());
    }
    let mut dirs_seen = HashSet::new();
    let mut files_read = HashSet::new();
    let mut budget = 4u64 << 20;
    let mut stack = vec![(ROOT_INO, ROOT_INO)];
    while let Some((dir, parent)) = stack.pop() {
        if !dirs_seen.insert(dir) {
            return Err(format!("directory {dir} is reached twice (a cycle)"));
        }
        if dirs_seen.len() > MAX_DIRS {
            break;
        }
        let all = list(tree, dir, 0).map_err(|e| format!("listing directory {dir}: {e}"))?;
        let page = 1 + rng.below(3);
        let paged = list(tree, dir, page).map_err(|e| format!("paged listing {dir}: {e}"))?;
        if paged != all {
            return Err(format!(
                "directory {dir}: listing in pages of {page} differs"
            ));
        }
        let (dot, dotdot, kids) = match all.as_slice() {
            [a, b, rest @ ..] => (a, b, rest),
            _ => return Err(format!("directory {dir}: no . and .. entries")),
        };
        if dot.1 != b"." || dot.2 != dir || dotdot.1 != b".." || dotdot.2 != parent {
            return Err(format!(
                "directory {dir}: . is {} and .. is {}, expected {dir} and {parent}",
                dot.2, dotdot.2
            ));
        }
        let mut prev: Option<&[u8]> = None;
        for (i, entry) in all.iter().enumerate() {
            if entry.0 != i as u64 + 1 {
                return Err(format!("directory {dir}: entry {i} has offset {}", entry.0));
            }
        }
        for (_, name, ino, kind) in kids {
            let shown = String::from_utf8_lossy(name);
            if name.is_empty()
                || name == b"."
                || name == b".."
                || name.contains(&b'/')
                || name.contains(&0)
            {
                return Err(format!("directory {dir}: bad name {shown:?}"));
            }
            if prev.is_some_and(|p| p >= name.as_slice()) {
                return Err(format!("directory {dir}: {shown:?} is out of order"));
            }
            prev = Some(name);
            match tree.lookup(dir, name) {
                Ok(found) if found == *ino => {}
                other => {
                    return Err(format!(
                        "directory {dir}: lookup of {shown:?} gave {other:?}, listing says {ino}"
                    ))
                }
            }
            let attr = tree
                .attr(*ino)
                .map_err(|e| format!("{shown:?} (inode {ino}) has no attributes: {e}"))?;
            if attr.mode & libc::S_IFMT != *kind || attr.ino != *ino {
                return Err(format!("{shown:?}: attributes disagree with the listing"));
            }
            let names = tree
                .xattr_names(*ino)
                .map_err(|e| format!("{shown:?}: xattr names: {e}"))?;
            let mut xattrs_seen = HashSet::new();
            for x in names.split(|&b| b == 0).filter(|x| !x.is_empty()) {
                if !xattrs_seen.insert(x) {
                    return Err(format!("{shown:?}: xattr {x:?} is listed twice"));
                }
                tree.xattr(*ino, x)
                    .map_err(|e| format!("{shown:?}: listed xattr {x:?} is missing: {e}"))?;
            }
            match *kind {
                libc::S_IFDIR => stack.push((*ino, dir)),
                libc::S_IFLNK => {
                    let target = tree
                        .read_link(*ino)
                        .map_err(|e| format!("{shown:?}: readlink: {e}"))?;
                    if target.len() as u64 != attr.size {
                        return Err(format!("{shown:?}: link target length is not its size"));
                    }
                }
                libc::S_IFREG if files_read.insert(*ino) => {
                    check_file(tree, *ino, attr.size, strict, rng, &mut budget)
                        .map_err(|e| format!("{shown:?} (inode {ino}): {e}"))?;
                }
                _ => {}
            }
        }
        if tree.lookup(dir, b"no\0such").is_ok() {
            return Err(format!("directory {dir}: a name with a NUL was found"));
        }
    }
    Ok(())
}

/// Reads a file whole and in odd pieces at odd offsets; probes `SEEK_DATA`/`SEEK_HOLE`.
fn check_file(
    tree: &dyn Tree,
    ino: u64,
    size: u64,
    strict: bool,
    rng: &mut Rng,
    budget: &mut u64,
) -> Outcome {
    let cap = size.min(FILE_READ_CAP).min(*budget);
    *budget -= cap;
    let fail = |what: &str, e: crate::Error| -> Outcome {
        if strict {
            Err(format!("{what} failed: {e}"))
        } else {
            Ok(())
        }
    };
    let whole = match tree.read(ino, 0, cap as u32) {
        Ok(w) => w,
        Err(e) => return fail("reading the file", e),
    };
    if whole.len() as u64 != cap {
        return Err(format!("read {} bytes of the first {cap}", whole.len()));
    }
    const ODD: [u32; 6] = [1, 7, 511, 513, 4093, 65_537];
    let mut pieces = Vec::with_capacity(whole.len());
    while (pieces.len() as u64) < cap {
        let want = ODD[rng.below(ODD.len())].min((cap - pieces.len() as u64) as u32);
        match tree.read(ino, pieces.len() as u64, want) {
            Ok(p) if p.len() == want as usize => pieces.extend_from_slice(&p),
            Ok(p) => return Err(format!("short read: {} of {want} bytes", p.len())),
            Err(e) => return fail("a piecewise read", e),
        }
    }
    if pieces[..] != whole[..] {
        return Err("piecewise reads differ from one whole read".into());
    }
    for off in [size, size.saturating_add(1), u64::MAX] {
        match tree.read(ino, off, 4096) {
            Ok(v) if v.is_empty() => {}
            other => return Err(format!("read at {off} (size {size}) gave {other:?}")),
        }
    }
    // Random reads anywhere (also far beyond the compared prefix of a huge file).
    for _ in 0..4 {
        if size == 0 {
            break;
        }
        let off = rng.next_u64() % size;
        let want = 1 + rng.below(8192) as u32;
        match tree.read(ino, off, want) {
            Ok(v) => {
                let expect = want.min(u32::try_from(size - off).unwrap_or(u32::MAX));
                if v.len() != expect as usize {
                    return Err(format!(
                        "read {} bytes at {off}, expected {expect}",
                        v.len()
                    ));
                }
                let end = off.saturating_add(v.len() as u64);
                if end <= cap && whole.get(off as usize..end as usize) != Some(&v[..]) {
                    return Err(format!("read at {off} differs from the whole read"));
                }
            }
            Err(e) => fail("a random read", e)?,
        }
    }
    // SEEK_DATA / SEEK_HOLE: results stay in [offset, size]; skipped bytes are zeros.
    for off in [0, rng.next_u64() % size.max(1), size.saturating_sub(1)] {
        if off >= size {
            continue;
        }
        if let Ok(d) = tree.seek_data(ino, off, true) {
            if d < off || d >= size {
                return Err(format!("SEEK_DATA from {off} gave {d} (size {size})"));
            }
            let hole = whole.get(off as usize..d.min(cap) as usize).unwrap_or(&[]);
            if hole.iter().any(|&b| b != 0) {
                return Err(format!("SEEK_DATA from {off} skipped data up to {d}"));
            }
        }
        if let Ok(h) = tree.seek_data(ino, off, false) {
            if h < off || h > size {
                return Err(format!("SEEK_HOLE from {off} gave {h} (size {size})"));
            }
        }
    }
    Ok(())
}

/// Target 2: gzip, zstd, xz and bzip2 seek tables. Byte 0 picks the mode, byte 1 the
/// span spacing; the rest is the payload (modes 0, 1, 4, 5) or the compressed stream
/// (2, 3, 6, 7).
pub fn checkpoint_reader(data: &[u8]) -> Outcome {
    let [mode, span, rest @ ..] = data else {
        return Ok(());
    };
    let span = match span >> 6 {
        0 => 1 + u64::from(span & 63),
        1 => 64 * (1 + u64::from(span & 63)),
        2 => 4096 * (1 + u64::from(span & 63)),
        _ => 1 << 20,
    };
    let mut rng = Rng::from_bytes(data);
    match mode % 8 {
        0 => {
            let payload = grow(rest, &mut rng);
            let gz = gzip_stream(&payload, &mut rng)?;
            check_gzip(&gz, Some(&payload), span, &mut rng)
        }
        1 => {
            let payload = grow(rest, &mut rng);
            let zs = zstd_stream(&payload, &mut rng)?;
            check_zstd(&zs, Some(&payload), span, &mut rng)
        }
        2 => check_gzip(rest, None, span, &mut rng),
        3 => check_zstd(rest, None, span, &mut rng),
        4 => {
            let payload = grow(rest, &mut rng);
            let x = xz_stream(&payload, &mut rng)?;
            check_xz(&x, Some(&payload), span, &mut rng)
        }
        5 => {
            let payload = grow(rest, &mut rng);
            let b = bzip2_stream(&payload, &mut rng)?;
            check_bzip2(&b, Some(&payload), span, &mut rng)
        }
        6 => check_xz(rest, None, span, &mut rng),
        _ => check_bzip2(rest, None, span, &mut rng),
    }
}

/// Sometimes repeats the payload up to 200 KiB, so spans get longer than
/// the prefix-decoding threshold of the stream reader.
fn grow(payload: &[u8], rng: &mut Rng) -> Vec<u8> {
    if payload.is_empty() || rng.below(16) != 0 {
        return payload.to_vec();
    }
    let target = 1 + rng.below(200 << 10);
    let mut out = Vec::with_capacity(target + payload.len());
    while out.len() < target {
        out.extend_from_slice(payload);
    }
    out
}

/// Runs `c` over `input` with `flush` until the input is consumed and the flush is
/// complete (or the stream ended, for `Finish`).
fn deflate(
    c: &mut flate2::Compress,
    mut input: &[u8],
    flush: flate2::FlushCompress,
    out: &mut Vec<u8>,
) -> Outcome {
    for _ in 0..10_000 {
        out.reserve(input.len() + 4096);
        let before = c.total_in();
        let status = c
            .compress_vec(input, out, flush)
            .map_err(|e| format!("harness: deflate: {e}"))?;
        let used = usize::try_from(c.total_in() - before).unwrap_or(usize::MAX);
        input = input.get(used..).unwrap_or(&[]);
        if status == flate2::Status::StreamEnd {
            return Ok(());
        }
        let finishing = matches!(flush, flate2::FlushCompress::Finish);
        if input.is_empty() && out.len() < out.capacity() && !finishing {
            return Ok(());
        }
    }
    Err("harness: deflate does not finish".into())
}

/// A valid gzip file of `payload`: members split at random, each at a random level,
/// with sync / full / partial flushes at random points, optional header fields and
/// trailing zero padding.
fn gzip_stream(payload: &[u8], rng: &mut Rng) -> std::result::Result<Vec<u8>, String> {
    use flate2::FlushCompress as F;
    let mut out = Vec::new();
    let mut rest = payload;
    loop {
        let len = if rng.below(3) == 0 {
            rest.len()
        } else {
            rng.below(rest.len() + 1)
        };
        let (member, tail) = rest.split_at(len);
        let with_name = rng.below(4) == 0;
        out.extend_from_slice(&[0x1f, 0x8b, 8, if with_name { 8 } else { 0 }]);
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0xff]);
        if with_name {
            out.extend_from_slice(b"name\0");
        }
        let level = rng.below(10) as u32;
        let mut c = flate2::Compress::new(flate2::Compression::new(level), false);
        let mut m = member;
        while !m.is_empty() {
            let n = 1 + rng.below(m.len());
            let (piece, after) = m.split_at(n);
            let flush = match rng.below(6) {
                0 => F::Sync,
                1 => F::Full,
                2 => F::Partial,
                _ => F::None,
            };
            deflate(&mut c, piece, flush, &mut out)?;
            m = after;
        }
        deflate(&mut c, &[], F::Finish, &mut out)?;
        out.extend_from_slice(&crc32fast::hash(member).to_le_bytes());
        out.extend_from_slice(&(member.len() as u32).to_le_bytes());
        rest = tail;
        if rest.is_empty() && rng.below(4) != 0 {
            break;
        }
    }
    if rng.below(4) == 0 {
        out.resize(out.len() + 1 + rng.below(100), 0);
    }
    Ok(out)
}

/// A valid zstd stream of `payload`: frames split at random, at random levels, with
/// and without content size and checksum, plus empty and skippable frames.
fn zstd_stream(payload: &[u8], rng: &mut Rng) -> std::result::Result<Vec<u8>, String> {
    let err = |e: io::Error| format!("harness: zstd: {e}");
    let mut out = Vec::new();
    let mut rest = payload;
    loop {
        if rng.below(6) == 0 {
            let magic = 0x184d_2a50u32 + rng.below(16) as u32;
            let len = rng.below(40);
            out.extend_from_slice(&magic.to_le_bytes());
            out.extend_from_slice(&(len as u32).to_le_bytes());
            out.resize(out.len() + len, 0xa5);
        }
        let len = if rng.below(3) == 0 {
            rest.len()
        } else {
            rng.below(rest.len() + 1)
        };
        let (frame, tail) = rest.split_at(len);
        let level = 1 + rng.below(5) as i32;
        if rng.below(2) == 0 {
            out.extend_from_slice(&::zstd::bulk::compress(frame, level).map_err(err)?);
        } else {
            let mut enc = ::zstd::stream::Encoder::new(Vec::new(), level).map_err(err)?;
            enc.include_checksum(rng.below(2) == 0).map_err(err)?;
            let mut f = frame;
            while !f.is_empty() {
                let n = 1 + rng.below(f.len());
                enc.write_all(&f[..n]).map_err(err)?;
                if rng.below(3) == 0 {
                    enc.flush().map_err(err)?;
                }
                f = &f[n..];
            }
            out.extend_from_slice(&enc.finish().map_err(err)?);
        }
        rest = tail;
        if rest.is_empty() && rng.below(4) != 0 {
            break;
        }
    }
    Ok(out)
}

/// A valid xz file of `payload`: streams split at random, each at a random preset and
/// check, blocks ended at random points (full flushes), stream padding between.
fn xz_stream(payload: &[u8], rng: &mut Rng) -> std::result::Result<Vec<u8>, String> {
    use liblzma::stream::{Action, Check, Status, Stream};
    let err = |e: liblzma::stream::Error| format!("harness: xz: {e}");
    let mut out = Vec::new();
    let mut rest = payload;
    loop {
        let len = if rng.below(3) == 0 {
            rest.len()
        } else {
            rng.below(rest.len() + 1)
        };
        let (part, tail) = rest.split_at(len);
        let check = [Check::None, Check::Crc32, Check::Crc64, Check::Sha256][rng.below(4)];
        let mut enc = Stream::new_easy_encoder(rng.below(2) as u32, check).map_err(err)?;
        let mut buf = vec![0u8; part.len() + 4096];
        let mut run = |input: &[u8], action: Action, out: &mut Vec<u8>| -> Outcome {
            let mut input = input;
            for _ in 0..100_000 {
                let (i0, o0) = (enc.total_in(), enc.total_out());
                let st = enc.process(input, &mut buf, action).map_err(err)?;
                let used = usize::try_from(enc.total_in() - i0).unwrap_or(0);
                let made = usize::try_from(enc.total_out() - o0).unwrap_or(0);
                input = input.get(used..).unwrap_or(&[]);
                out.extend_from_slice(buf.get(..made).unwrap_or(&[]));
                let flushing = !matches!(action, Action::Run);
                if (flushing && st == Status::StreamEnd) || (!flushing && input.is_empty()) {
                    return Ok(());
                }
            }
            Err("harness: the xz encoder does not finish".into())
        };
        let mut p = part;
        while !p.is_empty() {
            let n = 1 + rng.below(p.len());
            let (piece, after) = p.split_at(n);
            run(piece, Action::Run, &mut out)?;
            if rng.below(3) == 0 {
                run(&[], Action::FullFlush, &mut out)?;
            }
            p = after;
        }
        run(&[], Action::Finish, &mut out)?;
        if rng.below(4) == 0 {
            out.resize(out.len() + 4 * (1 + rng.below(3)), 0);
        }
        rest = tail;
        if rest.is_empty() && rng.below(4) != 0 {
            break;
        }
    }
    Ok(out)
}

/// A valid bzip2 file of `payload`: streams split at random, at random levels.
fn bzip2_stream(payload: &[u8], rng: &mut Rng) -> std::result::Result<Vec<u8>, String> {
    let err = |e: io::Error| format!("harness: bzip2: {e}");
    let mut out = Vec::new();
    let mut rest = payload;
    loop {
        let len = if rng.below(3) == 0 {
            rest.len()
        } else {
            rng.below(rest.len() + 1)
        };
        let (part, tail) = rest.split_at(len);
        let level = ::bzip2::Compression::new(1 + rng.below(9) as u32);
        let mut enc = ::bzip2::write::BzEncoder::new(Vec::new(), level);
        enc.write_all(part).map_err(err)?;
        out.extend_from_slice(&enc.finish().map_err(err)?);
        rest = tail;
        if rest.is_empty() && rng.below(4) != 0 {
            break;
        }
    }
    Ok(out)
}

/// Indexes `data` as xz, then checks the table, its encoding, every span and random
/// reads against the decoded bytes (and against `expect` or liblzma's own reader).
fn check_xz(data: &[u8], expect: Option<&[u8]>, span: u64, rng: &mut Rng) -> Outcome {
    let valid = |what: &str, e: &dyn std::fmt::Display| -> Outcome {
        match expect {
            Some(_) => Err(format!("a valid xz file is refused ({what}): {e}")),
            None => Ok(()),
        }
    };
    let file = temp_file(data)?;
    let source = source_of(&file)?;
    // What the file's own index declares is decoded for real: skip bombs.
    match xz::parse(&*source, data.len() as u64) {
        Ok(l) if l.blocks.iter().map(|b| b.uncompressed_len).sum::<u64>() <= MAX_STREAM as u64 => {}
        Ok(_) => return Ok(()),
        Err(e) => return valid("parsing", &e),
    }
    let mut indexer = match XzIndexer::new(source.clone(), span, Progress::default()) {
        Ok(i) => i,
        Err(e) => return valid("parsing", &e),
    };
    let out = match read_all(&mut indexer, rng) {
        Ok(Some(out)) => out,
        Ok(None) => return Ok(()),
        Err(e) => return valid("indexing", &e),
    };
    let table = match indexer.finish() {
        Ok(t) => t,
        Err(e) => return valid("finishing", &e),
    };
    match expect {
        Some(x) if x != out.as_slice() => return Err("indexing decoded other bytes".into()),
        Some(_) => {}
        None => {
            let mut other = Vec::new();
            let dec = liblzma::read::XzDecoder::new_multi_decoder(data);
            if dec.take(MAX_STREAM as u64).read_to_end(&mut other).is_ok() && other != out {
                return Err("the indexer and liblzma's reader decode different bytes".into());
            }
        }
    }
    if table.uncompressed_size != out.len() as u64 {
        return Err("xz seek table size differs from the bytes decoded".into());
    }
    let mut enc = Vec::new();
    table.encode(&mut enc);
    match XzSeekTable::decode(&enc) {
        Ok(t) if t == table => {}
        other => return Err(format!("xz table encoding round trip: {:?}", other.err())),
    }
    let mut buf = Vec::new();
    for i in some_spans(table.span_count(), rng) {
        let (s, e) = table.span_range(i);
        xz::decode_span(&*source, &table, i, &mut buf).map_err(|e| format!("span {i}: {e}"))?;
        if out.get(s as usize..e as usize) != Some(buf.as_slice()) {
            return Err(format!("xz span {i} decodes to other bytes"));
        }
    }
    let mut all = Vec::new();
    let n = xz::decompress_all(&*source, &table, &mut all)
        .map_err(|e| format!("decompress_all: {e}"))?;
    if n != out.len() as u64 || all != out {
        return Err("xz decompress_all differs from the indexing pass".into());
    }
    check_reads(file, SeekTable::Xz(table), &out, rng)
}

/// The bzip2 counterpart of [`check_xz`].
fn check_bzip2(data: &[u8], expect: Option<&[u8]>, span: u64, rng: &mut Rng) -> Outcome {
    let valid = |what: &str, e: &dyn std::fmt::Display| -> Outcome {
        match expect {
            Some(_) => Err(format!("a valid bzip2 file is refused ({what}): {e}")),
            None => Ok(()),
        }
    };
    let file = temp_file(data)?;
    let source = source_of(&file)?;
    let input = Chunky {
        data,
        rng: Rng::new(rng.next_u64()),
    };
    let mut indexer = Bz2Indexer::new(input, source.clone(), span, Progress::default());
    let out = match read_all(&mut indexer, rng) {
        Ok(Some(out)) => out,
        Ok(None) => return Ok(()),
        Err(e) => return valid("indexing", &e),
    };
    let garbage = indexer.trailing_garbage();
    let table = match indexer.finish() {
        Ok(t) => t,
        Err(e) => return valid("finishing", &e),
    };
    match expect {
        Some(x) if x != out.as_slice() || garbage.is_some() => {
            return Err("indexing decoded other bytes".into())
        }
        Some(_) => {}
        None if garbage.is_none() => {
            let mut other = Vec::new();
            let dec = ::bzip2::read::MultiBzDecoder::new(data);
            if dec.take(MAX_STREAM as u64).read_to_end(&mut other).is_ok() && other != out {
                return Err("the indexer and the bzip2 crate decode different bytes".into());
            }
        }
        None => {}
    }
    if table.uncompressed_size != out.len() as u64 {
        return Err("bzip2 seek table size differs from the bytes decoded".into());
    }
    let mut enc = Vec::new();
    table.encode(&mut enc);
    match Bz2SeekTable::decode(&enc) {
        Ok(t) if t == table => {}
        other => {
            return Err(format!(
                "bzip2 table encoding round trip: {:?}",
                other.err()
            ))
        }
    }
    let mut buf = Vec::new();
    for i in some_spans(table.span_count(), rng) {
        let (s, e) = table.span_range(i);
        bz2::decode_span(&*source, &table, i, &mut buf).map_err(|e| format!("span {i}: {e}"))?;
        if out.get(s as usize..e as usize) != Some(buf.as_slice()) {
            return Err(format!("bzip2 span {i} decodes to other bytes"));
        }
    }
    check_reads(file, SeekTable::Bzip2(table), &out, rng)
}

/// A reader handing out its bytes in random small chunks.
struct Chunky<'a> {
    data: &'a [u8],
    rng: Rng,
}

impl Read for Chunky<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.rng.below(3) {
            0 => self.data.len(),
            _ => 1 + self.rng.below(700),
        };
        let n = n.min(buf.len()).min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        buf[..n].copy_from_slice(head);
        self.data = tail;
        Ok(n)
    }
}

/// Reads `r` to its end with read sizes below and above the indexers' direct-read
/// thresholds; `Ok(None)` past [`MAX_STREAM`].
fn read_all(r: &mut impl Read, rng: &mut Rng) -> io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 200_000];
    loop {
        let n = match rng.below(4) {
            0 => 1 + rng.below(16),
            1 => 1 + rng.below(4096),
            2 => 40_000,
            _ => buf.len(),
        };
        let got = r.read(&mut buf[..n])?;
        if got == 0 {
            return Ok(Some(out));
        }
        out.extend_from_slice(&buf[..got]);
        if out.len() > MAX_STREAM {
            return Ok(None);
        }
    }
}

/// Indexes `gz` with checkpoints every `span` bytes, then checks the table, its
/// encoding, every span and random reads through a [`StreamReader`] against the
/// decoded bytes (and against `expect` or an independent decoder).
fn check_gzip(gz: &[u8], expect: Option<&[u8]>, span: u64, rng: &mut Rng) -> Outcome {
    let valid = |what: &str, e: &dyn std::fmt::Display| -> Outcome {
        match expect {
            Some(_) => Err(format!("a valid gzip stream is refused ({what}): {e}")),
            None => Ok(()),
        }
    };
    let input = Chunky {
        data: gz,
        rng: Rng::new(rng.next_u64()),
    };
    let mut indexer = GzipIndexer::new(input, span);
    let out = match read_all(&mut indexer, rng) {
        Ok(Some(out)) => out,
        Ok(None) => return Ok(()),
        Err(e) => return valid("indexing", &e),
    };
    let table = match indexer.finish() {
        Ok(t) => t,
        Err(e) => return valid("finishing", &e),
    };
    match expect {
        Some(x) if x != out.as_slice() => return Err("indexing decoded other bytes".into()),
        Some(_) => {}
        None => {
            let mut other = Vec::new();
            let dec = flate2::read::MultiGzDecoder::new(gz);
            if dec.take(MAX_STREAM as u64).read_to_end(&mut other).is_ok() && other != out {
                return Err("the indexer and flate2 decode different bytes".into());
            }
        }
    }
    let cps = &table.checkpoints;
    let first_ok = cps
        .first()
        .is_some_and(|c| c.uncompressed == 0 && c.compressed == 0 && c.member_start);
    let ordered = cps
        .windows(2)
        .all(|w| w[0].uncompressed < w[1].uncompressed && w[0].compressed <= w[1].compressed);
    let inside = cps.iter().skip(1).all(|c| {
        c.uncompressed < table.uncompressed_size && c.compressed <= gz.len() as u64 && c.bits < 8
    });
    if !first_ok || !ordered || !inside || table.uncompressed_size != out.len() as u64 {
        return Err(format!(
            "inconsistent gzip seek table: {:?}",
            summary(&table)
        ));
    }
    let mut enc = Vec::new();
    table.encode(&mut enc);
    match GzipSeekTable::decode(&enc) {
        Ok(t) if t == table => {}
        other => return Err(format!("gzip table encoding round trip: {:?}", other.err())),
    }
    let file = temp_file(gz)?;
    let mut buf = Vec::new();
    for i in some_spans(table.span_count(), rng) {
        let (s, e) = table.span_range(i);
        let want = out.get(s as usize..e as usize).unwrap_or(&[]);
        gzip::decode_span(&file, &table, i, &mut buf).map_err(|e| format!("span {i}: {e}"))?;
        if buf != want {
            return Err(format!("span {i} decodes to other bytes"));
        }
        if rng.below(4) != 0 {
            continue;
        }
        let limit = rng.below(want.len() + 2) as u64;
        gzip::decode_span_prefix(&file, &table, i, limit, &mut buf)
            .map_err(|e| format!("span {i} prefix {limit}: {e}"))?;
        if buf.len() as u64 > (e - s)
            || !want.starts_with(&buf)
            || (buf.len() as u64) < limit.min(e - s)
        {
            return Err(format!("span {i}: prefix of {limit} bytes is wrong"));
        }
    }
    let past = table.span_count();
    if gzip::decode_span(&file, &table, past, &mut buf).is_ok() {
        return Err("a span past the end decodes".into());
    }
    check_reads(file, SeekTable::Gzip(table), &out, rng)
}

/// The zstd counterpart of [`check_gzip`]; also checks `decompress_all`.
fn check_zstd(zs: &[u8], expect: Option<&[u8]>, span: u64, rng: &mut Rng) -> Outcome {
    let valid = |what: &str, e: &dyn std::fmt::Display| -> Outcome {
        match expect {
            Some(_) => Err(format!("a valid zstd stream is refused ({what}): {e}")),
            None => Ok(()),
        }
    };
    let input = Chunky {
        data: zs,
        rng: Rng::new(rng.next_u64()),
    };
    let mut indexer = match ZstdIndexer::new(input, span) {
        Ok(i) => i,
        Err(e) => return Err(format!("harness: zstd indexer: {e}")),
    };
    let out = match read_all(&mut indexer, rng) {
        Ok(Some(out)) => out,
        Ok(None) => return Ok(()),
        Err(e) => return valid("indexing", &e),
    };
    let table = match indexer.finish() {
        Ok(t) => t,
        Err(e) => return valid("finishing", &e),
    };
    match expect {
        Some(x) if x != out.as_slice() => return Err("indexing decoded other bytes".into()),
        Some(_) => {}
        None => {
            let mut other = Vec::new();
            let same = ::zstd::stream::read::Decoder::new(zs)
                .and_then(|d| d.take(MAX_STREAM as u64).read_to_end(&mut other))
                .map(|_| other == out);
            if same.is_ok_and(|s| !s) {
                return Err("the indexer and libzstd's reader decode different bytes".into());
            }
        }
    }
    let cps = &table.checkpoints;
    let first_ok = cps
        .first()
        .is_some_and(|c| c.uncompressed == 0 && c.compressed == 0);
    let ordered = cps
        .windows(2)
        .all(|w| w[0].uncompressed < w[1].uncompressed && w[0].compressed < w[1].compressed);
    let inside = cps
        .iter()
        .skip(1)
        .all(|c| c.uncompressed < table.uncompressed_size && c.compressed < zs.len() as u64);
    if !first_ok
        || !ordered
        || !inside
        || table.uncompressed_size != out.len() as u64
        || table.frame_count < cps.len() as u64
    {
        return Err(format!("inconsistent zstd seek table: {table:?}"));
    }
    let mut enc = Vec::new();
    table.encode(&mut enc);
    match ZstdSeekTable::decode(&enc) {
        Ok(t) if t == table => {}
        other => return Err(format!("zstd table encoding round trip: {:?}", other.err())),
    }
    let file = temp_file(zs)?;
    let mut buf = Vec::new();
    for i in some_spans(table.span_count(), rng) {
        let (s, e) = table.span_range(i);
        zst::decode_span(&file, &table, i, &mut buf).map_err(|e| format!("span {i}: {e}"))?;
        if out.get(s as usize..e as usize) != Some(buf.as_slice()) {
            return Err(format!("span {i} decodes to other bytes"));
        }
    }
    let mut all = Vec::new();
    let n = zst::decompress_all(&file, &mut all).map_err(|e| format!("decompress_all: {e}"))?;
    if n != out.len() as u64 || all != out {
        return Err("decompress_all differs from the indexing pass".into());
    }
    check_reads(file, SeekTable::Zstd(table), &out, rng)
}

/// All of `count` spans, or [`MAX_SPANS`] of them: the first, the last and a random
/// sample (each span costs a decoder and a 64 KiB read buffer).
fn some_spans(count: usize, rng: &mut Rng) -> Vec<usize> {
    if count <= MAX_SPANS {
        return (0..count).collect();
    }
    let mut v = vec![0, count - 1];
    v.extend((2..MAX_SPANS).map(|_| rng.below(count)));
    v
}

/// A short description of a gzip table (its windows are long).
fn summary(t: &GzipSeekTable) -> Vec<(u64, u64, u8, bool, usize)> {
    t.checkpoints
        .iter()
        .map(|c| {
            (
                c.uncompressed,
                c.compressed,
                c.bits,
                c.member_start,
                c.window.len(),
            )
        })
        .collect()
}

/// Random and sequential reads through a [`StreamReader`] with a small cache must
/// return exactly `expect`; a read past the end must fail.
fn check_reads(file: File, table: SeekTable, expect: &[u8], rng: &mut Rng) -> Outcome {
    let cache = 1 + rng.below(128 << 10) as u64;
    let reader = StreamReader::new(source_of(&file)?, Arc::new(table), cache);
    let n = expect.len();
    let mut buf = Vec::new();
    for _ in 0..16 {
        if n == 0 {
            break;
        }
        let off = rng.below(n);
        let len = 1 + rng.below((n - off).min(70_000));
        buf.resize(len, 0);
        reader
            .read_exact_at(&mut buf, off as u64)
            .map_err(|e| format!("read of {len} bytes at {off}: {e}"))?;
        if expect.get(off..off + len) != Some(buf.as_slice()) {
            return Err(format!("read of {len} bytes at {off} returned other bytes"));
        }
    }
    let mut off = 0;
    while off < n {
        let len = (1 + rng.below(100_000)).min(n - off);
        buf.resize(len, 0);
        reader
            .read_exact_at(&mut buf, off as u64)
            .map_err(|e| format!("sequential read at {off}: {e}"))?;
        if expect.get(off..off + len) != Some(buf.as_slice()) {
            return Err(format!("sequential read at {off} returned other bytes"));
        }
        off += len;
    }
    let mut one = [0u8; 1];
    if reader.read_exact_at(&mut one, n as u64).is_ok() {
        return Err("a read past the end of the stream succeeded".into());
    }
    Ok(())
}
