//! The persisted index file: little-endian fixed records, offsets not pointers, a
//! CRC-32 over the header and one per 4 KiB block of the body, so that a mapped index
//! is checked where it is read ([`super::lazy`]) instead of whole at mount time.
//! [`decode`] checks everything at once (for bytes that are read, not mapped).
//!
//! Layout (version 3):
//! ```text
//! magic "SNAPFSIX" | version u32 | flags u32
//! archive id: size u64 | mtime_ns i64 | head_crc u32 | tail_crc u32
//! span_bytes u64 | compression u8 | 7 zero bytes | stream_size u64 | skipped u64
//! counts u64 x 6: inodes, dirents, names, xattrs, segments, seek-table bytes
//! stat_blocks u64 | block_bytes u32 | header_crc u32
//! block crcs: u32 x ceil(body length / block_bytes) | zero padding to 8 bytes
//! body: inodes (96 B each) | dirents (12 B) | names | xattrs (16 B) | segments (24 B)
//!       | seek table (gzip/zstd/xz/bzip2 encoding, empty for plain tar)
//! ```
//! `header_crc` covers every byte before the body but itself; block `i`'s CRC covers
//! body bytes `[i * block_bytes, (i + 1) * block_bytes)` (the last block is shorter).
//!
//! Version history: 1 — first format; 2 — inode records carry atime and ctime
//! (72 → 96 bytes: `atime i64 | ctime i64 | atime_nsec u32 | ctime_nsec u32` after
//! `flags`), from PAX `atime`/`ctime` records or the mtime; 3 — a CRC per 4 KiB block
//! of the body and one over the header instead of one CRC at the end of the file,
//! and `stat_blocks` (the 512-byte blocks `statfs` reports) in the header, so a warm
//! mount reads the header and the records it serves, not the whole file.
//!
//! Compression codes: 0 tar, 1 gzip, 2 zstd; 3 xz and 4 bzip2 were added later
//! without a version bump (a reader that does not know a code refuses the index as
//! unknown and rebuilds it, which it could not do for that archive anyway).

use crate::archive::bzip2::Bz2SeekTable;
use crate::archive::gzip::{GzipSeekTable, SharedBytes};
use crate::archive::tar::Segment;
use crate::archive::xz::XzSeekTable;
use crate::archive::zstd::ZstdSeekTable;
use crate::archive::{ArchiveId, Compression, SeekTable};
use std::sync::Arc;

use std::path::Path;

use crate::index::lazy::{self, Lazy};
use crate::index::records::Records;
use crate::index::{DirentRecord, Index, InodeRecord, XattrRecord, ROOT_INO};

/// File magic.
pub const MAGIC: &[u8; 8] = b"SNAPFSIX";
/// Current format version.
pub const VERSION: u32 = 3;

pub(crate) const INODE_BYTES: usize = 96;
pub(crate) const DIRENT_BYTES: usize = 12;
const XATTR_BYTES: usize = 16;
const SEGMENT_BYTES: usize = 24;
/// The fixed header, up to and including `header_crc`.
const HEADER_BYTES: usize = 8 + 4 + 4 + 24 + 8 + 8 + 8 + 8 + 6 * 8 + 8 + 4 + 4;
/// Where `header_crc` sits.
const HEADER_CRC_AT: usize = HEADER_BYTES - 4;
/// Bytes of the body covered by one CRC: a page, so that a first touch checks what
/// it faults in.
pub const BLOCK_BYTES: usize = 4096;

/// Serializes an index.
pub fn encode(index: &Index) -> Vec<u8> {
    let mut table = Vec::new();
    match &*index.table {
        SeekTable::Plain => {}
        SeekTable::Gzip(t) => t.encode(&mut table),
        SeekTable::Zstd(t) => t.encode(&mut table),
        SeekTable::Xz(t) => t.encode(&mut table),
        SeekTable::Bzip2(t) => t.encode(&mut table),
    }
    let mut body = Vec::with_capacity(
        index.inodes.len() * INODE_BYTES
            + index.dirents.len() * DIRENT_BYTES
            + index.names.len()
            + table.len(),
    );
    for r in &index.inodes {
        put32(&mut body, r.mode);
        put32(&mut body, r.nlink);
        put32(&mut body, r.uid);
        put32(&mut body, r.gid);
        put64(&mut body, r.mtime as u64);
        put32(&mut body, r.mtime_nsec);
        put32(&mut body, r.rdev);
        put64(&mut body, r.size);
        put64(&mut body, r.data);
        put32(&mut body, r.first);
        put32(&mut body, r.count);
        put32(&mut body, r.xattr_first);
        put32(&mut body, r.xattr_count);
        put32(&mut body, r.parent);
        put32(&mut body, r.flags);
        put64(&mut body, r.atime as u64);
        put64(&mut body, r.ctime as u64);
        put32(&mut body, r.atime_nsec);
        put32(&mut body, r.ctime_nsec);
    }
    for d in &index.dirents {
        put32(&mut body, d.name_off);
        put32(&mut body, d.name_len);
        put32(&mut body, d.ino);
    }
    body.extend_from_slice(&index.names);
    for x in &index.xattrs {
        put32(&mut body, x.name_off);
        put32(&mut body, x.name_len);
        put32(&mut body, x.value_off);
        put32(&mut body, x.value_len);
    }
    for s in &index.segments {
        put64(&mut body, s.logical);
        put64(&mut body, s.stream);
        put64(&mut body, s.len);
    }
    body.extend_from_slice(&table);
    let stat_blocks = index
        .inodes
        .iter()
        .map(|r| crate::index::blocks_for(index.data_bytes(r)))
        .fold(0, u64::saturating_add);

    let mut out = Vec::with_capacity(HEADER_BYTES + body.len() / BLOCK_BYTES * 4 + 8 + body.len());
    out.extend_from_slice(MAGIC);
    put32(&mut out, VERSION);
    put32(&mut out, 0);
    put64(&mut out, index.id.size);
    put64(&mut out, index.id.mtime_ns as u64);
    put32(&mut out, index.id.head_crc);
    put32(&mut out, index.id.tail_crc);
    put64(&mut out, index.span_bytes);
    out.push(index.table.compression().code());
    out.extend_from_slice(&[0; 7]);
    put64(&mut out, index.stream_size);
    put64(&mut out, index.skipped);
    for n in [
        index.inodes.len(),
        index.dirents.len(),
        index.names.len(),
        index.xattrs.len(),
        index.segments.len(),
        table.len(),
    ] {
        put64(&mut out, n as u64);
    }
    put64(&mut out, stat_blocks);
    put32(&mut out, BLOCK_BYTES as u32);
    put32(&mut out, 0); // header_crc, set below
    for block in body.chunks(BLOCK_BYTES) {
        put32(&mut out, crc32fast::hash(block));
    }
    out.resize(out.len().next_multiple_of(8), 0);
    let crc = header_crc(&out);
    out[HEADER_CRC_AT..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The CRC of the bytes before the body (`head`), without the `header_crc` field.
fn header_crc(head: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&head[..HEADER_CRC_AT]);
    h.update(&head[HEADER_BYTES..]);
    h.finalize()
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or("index file is truncated")?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// The identity and options stored in an index header (read without decoding the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The archive the index belongs to.
    pub id: ArchiveId,
    /// Seek point spacing it was built with.
    pub span_bytes: u64,
}

/// Where everything lies in an index file, from its header (checked against
/// `header_crc`) and its length. The body is not read.
struct Layout {
    header: Header,
    comp: Compression,
    stream_size: u64,
    skipped: u64,
    /// Records per section: inodes, dirents, names, xattrs, segments, table bytes.
    counts: [usize; 6],
    stat_blocks: u64,
    block_bytes: usize,
    /// The CRC of each body block.
    crcs: Vec<u32>,
    /// File offset of the body.
    body: usize,
}

/// Record sizes of the sections, in [`Layout::counts`] order.
const SECTION_BYTES: [usize; 6] = [INODE_BYTES, DIRENT_BYTES, 1, XATTR_BYTES, SEGMENT_BYTES, 1];

impl Layout {
    /// Body offset and length of section `i` (offsets fit: their sum is the body).
    fn section(&self, i: usize) -> (usize, usize) {
        let at = (0..i).map(|j| self.counts[j] * SECTION_BYTES[j]).sum();
        (at, self.counts[i] * SECTION_BYTES[i])
    }

    /// Section `i`'s bytes in `file`.
    fn bytes<'a>(&self, file: &'a [u8], i: usize) -> &'a [u8] {
        let (at, len) = self.section(i);
        &file[self.body + at..self.body + at + len]
    }
}

/// Checks magic, version, header checksum and that the file is exactly as long as its
/// header says. Reads only the header and the block CRCs.
fn layout(bytes: &[u8]) -> Result<Layout, String> {
    let (l, stored) = layout_unchecked(bytes)?;
    if header_crc(&bytes[..l.body]) != stored {
        return Err("index header checksum mismatch (corrupt file)".into());
    }
    Ok(l)
}

/// [`layout`] without the header checksum, and the checksum stored.
fn layout_unchecked(bytes: &[u8]) -> Result<(Layout, u32), String> {
    let mut c = Cursor { bytes, pos: 0 };
    check_magic_and_version(&mut c)?;
    let header = header_fields(&mut c)?;
    let comp = Compression::from_code(c.take(8)?[0]).ok_or("unknown compression code")?;
    let stream_size = c.u64()?;
    let skipped = c.u64()?;
    let mut counts = [0usize; 6];
    let mut body_len = 0usize;
    for (n, size) in counts.iter_mut().zip(SECTION_BYTES) {
        *n = usize::try_from(c.u64()?).map_err(|_| "record count too large")?;
        body_len = n
            .checked_mul(size)
            .and_then(|b| body_len.checked_add(b))
            .filter(|&b| b <= bytes.len())
            .ok_or("record count exceeds the file size")?;
    }
    let stat_blocks = c.u64()?;
    let block_bytes = c.u32()? as usize;
    if !block_bytes.is_power_of_two() || !(512..=1 << 24).contains(&block_bytes) {
        return Err(format!("bad checksum block size {block_bytes}"));
    }
    let stored = c.u32()?;
    let n_blocks = body_len.div_ceil(block_bytes);
    let crcs: Vec<u32> = c
        .take(n_blocks * 4)?
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let body = c.pos.next_multiple_of(8);
    c.take(body - c.pos)?;
    match bytes.len().checked_sub(body) {
        Some(n) if n == body_len => {}
        Some(n) if n > body_len => return Err("trailing bytes after the index".into()),
        _ => return Err("index file is truncated".into()),
    }
    let l = Layout {
        header,
        comp,
        stream_size,
        skipped,
        counts,
        stat_blocks,
        block_bytes,
        crcs,
        body,
    };
    Ok((l, stored))
}

/// Recomputes the header and block checksums of an index file in place (for tests
/// and the fuzzer, so that changed records reach the record checks); false if its
/// header cannot be parsed.
pub fn reseal(bytes: &mut [u8]) -> bool {
    let Ok((l, _)) = layout_unchecked(bytes) else {
        return false;
    };
    let (head, body) = bytes.split_at_mut(l.body);
    for (i, block) in body.chunks(l.block_bytes).enumerate() {
        let at = HEADER_BYTES + 4 * i;
        head[at..at + 4].copy_from_slice(&crc32fast::hash(block).to_le_bytes());
    }
    let crc = header_crc(head);
    head[HEADER_CRC_AT..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    true
}

/// The number of leading bytes [`peek_prefix`] needs.
pub const PREFIX_BYTES: usize = HEADER_BYTES;

/// Reads magic, version, archive identity and span from the first [`PREFIX_BYTES`] of
/// an index file, without the checksum: a cheap answer to "was this index built for
/// this archive?". Only [`decode`] makes an index trusted.
pub fn peek_prefix(prefix: &[u8]) -> Result<Header, String> {
    let mut c = Cursor {
        bytes: prefix,
        pos: 0,
    };
    check_magic_and_version(&mut c)?;
    header_fields(&mut c)
}

fn check_magic_and_version(c: &mut Cursor<'_>) -> Result<(), String> {
    if c.take(8).ok() != Some(&MAGIC[..]) {
        return Err("not a snapfs index (bad magic)".into());
    }
    let version = c.u32()?;
    if version != VERSION {
        return Err(format!(
            "index format version {version}, this snapfs reads {VERSION}"
        ));
    }
    Ok(())
}

/// Flags, archive identity and span, after magic and version.
fn header_fields(c: &mut Cursor<'_>) -> Result<Header, String> {
    let _flags = c.u32()?;
    let id = ArchiveId {
        size: c.u64()?,
        mtime_ns: c.u64()? as i64,
        head_crc: c.u32()?,
        tail_crc: c.u32()?,
    };
    let span_bytes = c.u64()?;
    Ok(Header { id, span_bytes })
}

/// Parses and validates a whole index file: every block checksum, every record.
/// Nothing in `bytes` is trusted.
pub fn decode(bytes: &[u8]) -> Result<Index, String> {
    let l = layout(bytes)?;
    let body = &bytes[l.body..];
    for (i, (block, &crc)) in body.chunks(l.block_bytes).zip(&l.crcs).enumerate() {
        if crc32fast::hash(block) != crc {
            return Err(format!("index block {i} checksum mismatch (corrupt file)"));
        }
    }
    let inodes = l
        .bytes(bytes, 0)
        .chunks_exact(INODE_BYTES)
        .map(parse_inode)
        .collect::<Vec<_>>()
        .into();
    let dirents = l
        .bytes(bytes, 1)
        .chunks_exact(DIRENT_BYTES)
        .map(|r| DirentRecord {
            name_off: le32(r, 0),
            name_len: le32(r, 4),
            ino: le32(r, 8),
        })
        .collect::<Vec<_>>()
        .into();
    let names = l.bytes(bytes, 2).to_vec().into();
    let index = assemble(&l, bytes, None, inodes, dirents, names, None)?;
    validate(&index)?;
    Ok(index)
}

/// Opens a mapped index file for serving in place: checks the header and its
/// checksum, the small sections decoded into memory (xattrs, segments, seek table),
/// and the root directory. Every other record is checked where it is first read
/// ([`crate::index::lazy`]): a corrupt one fails the requests that need it with EIO
/// (and one log line naming `path` and the record), and the rest is served.
pub fn decode_mapped(map: &Arc<memmap2::Mmap>, path: &Path) -> Result<Index, String> {
    let l = layout(map)?;
    let (at_inodes, _) = l.section(0);
    let (at_dirents, _) = l.section(1);
    let (at_names, _) = l.section(2);
    let lazy = Arc::new(Lazy::new(
        path.to_path_buf(),
        map.clone(),
        l.body,
        l.block_bytes,
        l.crcs.clone(),
        l.counts[0],
        [at_dirents, at_names],
    ));
    // The sections parsed into memory: check their blocks now. A gzip table's
    // windows are not read here: each is read from the mapping (its blocks checked
    // then) when its span is decoded.
    let (tail, _) = l.section(3);
    let (at_table, table_len) = l.section(5);
    let table_head = match l.comp {
        Compression::Gzip => GzipSeekTable::head_len(l.bytes(map, 5)),
        _ => table_len,
    };
    lazy.bytes_ok(tail, at_table + table_head - tail)?;
    let records = (
        Records::mapped(map, l.body + at_inodes, l.counts[0]),
        Records::mapped(map, l.body + at_dirents, l.counts[1]),
        Records::mapped(map, l.body + at_names, l.counts[2]),
    );
    let (Some(inodes), Some(dirents), Some(names)) = records else {
        // Not readable in place (a big-endian machine): check and parse all of it.
        return decode(map);
    };
    let shared: SharedBytes = lazy.clone();
    let index = assemble(&l, map, Some(&shared), inodes, dirents, names, Some(lazy))?;
    // The small sections are in memory now (the seek table's windows are read from
    // the mapping when their span is decoded): their pages need not stay mapped.
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let from = (l.body + tail).div_ceil(page) * page;
    if from < map.len() {
        // SAFETY: a read-only private file mapping: dropped pages are read from the
        // file again when touched, and nothing holds references that could observe
        // anything but the file's bytes.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, map.len() - from)
        };
    }
    // The root is needed by every mount: a bad one is an unusable index (rebuilt).
    index
        .record(ROOT_INO)
        .and_then(|_| index.entries(ROOT_INO))
        .map_err(|e| match e {
            crate::error::Error::Index { message, .. } => message,
            e => e.to_string(),
        })?;
    Ok(index)
}

/// An [`Index`] of the given record arrays, with the header's fields and the small
/// sections parsed (their bytes already checked), and the seek table's size matched
/// against the stream's.
fn assemble(
    l: &Layout,
    bytes: &[u8],
    shared: Option<&SharedBytes>,
    inodes: Records<InodeRecord>,
    dirents: Records<DirentRecord>,
    names: Records<u8>,
    lazy: Option<Arc<Lazy>>,
) -> Result<Index, String> {
    let xattrs = l
        .bytes(bytes, 3)
        .chunks_exact(XATTR_BYTES)
        .map(|r| XattrRecord {
            name_off: le32(r, 0),
            name_len: le32(r, 4),
            value_off: le32(r, 8),
            value_len: le32(r, 12),
        })
        .collect();
    let segments = l
        .bytes(bytes, 4)
        .chunks_exact(SEGMENT_BYTES)
        .map(|r| Segment {
            logical: le64(r, 0),
            stream: le64(r, 8),
            len: le64(r, 16),
        })
        .collect();
    let table_bytes = l.bytes(bytes, 5);
    let table = match l.comp {
        Compression::None => SeekTable::Plain,
        Compression::Gzip => {
            // Where the table lies in `bytes` (which `shared`, if given, holds).
            let at = l.body + l.section(5).0;
            SeekTable::Gzip(GzipSeekTable::decode_in(
                table_bytes,
                shared.map(|s| (s, at)),
            )?)
        }
        Compression::Zstd => SeekTable::Zstd(ZstdSeekTable::decode(table_bytes)?),
        Compression::Xz => SeekTable::Xz(XzSeekTable::decode(table_bytes)?),
        Compression::Bzip2 => SeekTable::Bzip2(Bz2SeekTable::decode(table_bytes)?),
    };
    match &table {
        SeekTable::Plain => {}
        SeekTable::Gzip(t) if t.uncompressed_size == l.stream_size => {}
        SeekTable::Zstd(t) if t.uncompressed_size == l.stream_size => {}
        SeekTable::Xz(t) if t.uncompressed_size == l.stream_size => {}
        SeekTable::Bzip2(t) if t.uncompressed_size == l.stream_size => {}
        _ => return Err("seek table size does not match the stream size".into()),
    }
    if inodes.is_empty() {
        return Err("index has no root".into());
    }
    Ok(Index {
        id: l.header.id,
        span_bytes: l.header.span_bytes,
        stream_size: l.stream_size,
        table: Arc::new(table),
        inodes,
        dirents,
        names,
        xattrs,
        segments,
        skipped: l.skipped,
        stat_blocks: Some(l.stat_blocks),
        lazy,
    })
}

/// One inode record from its 96 file bytes.
fn parse_inode(r: &[u8]) -> InodeRecord {
    InodeRecord {
        mode: le32(r, 0),
        nlink: le32(r, 4),
        uid: le32(r, 8),
        gid: le32(r, 12),
        mtime: le64(r, 16) as i64,
        mtime_nsec: le32(r, 24),
        rdev: le32(r, 28),
        size: le64(r, 32),
        data: le64(r, 40),
        first: le32(r, 48),
        count: le32(r, 52),
        xattr_first: le32(r, 56),
        xattr_count: le32(r, 60),
        parent: le32(r, 64),
        flags: le32(r, 68),
        atime: le64(r, 72) as i64,
        ctime: le64(r, 80) as i64,
        atime_nsec: le32(r, 88),
        ctime_nsec: le32(r, 92),
    }
}

/// Little-endian u32 at `at` of a record slice (callers pass fixed-size records).
fn le32(r: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([r[at], r[at + 1], r[at + 2], r[at + 3]])
}

/// Little-endian u64 at `at` of a record slice.
fn le64(r: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&r[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Reads just the header of an index file and checks magic, version, header checksum
/// and length, without reading the records: enough to know whether it is current.
pub fn peek(bytes: &[u8]) -> Result<Header, String> {
    layout(bytes).map(|l| l.header)
}

/// Checks every offset, count and reference so that serving the index can never index
/// out of bounds or loop: directories form a tree rooted at inode 1, entries are
/// sorted, names are valid, data ranges lie inside the stream. The same checks as a
/// mapped index makes record by record ([`crate::index::lazy`]), plus that no
/// directory is listed twice anywhere, and every xattr record.
pub fn validate(index: &Index) -> Result<(), String> {
    let n = index.inodes.len();
    if n == 0 {
        return Err("index has no root".into());
    }
    let mut referenced_dirs = vec![0u8; n];
    for (i, r) in index.inodes.iter().enumerate() {
        let ino = i as u64 + 1;
        lazy::check_record(index, ino, r).map_err(|e| format!("inode {ino}: {e}"))?;
        if r.is_dir() {
            lazy::check_entries(index, ino, r, Some(&mut referenced_dirs))
                .map_err(|e| format!("inode {ino}: {e}"))?;
        }
    }
    for x in &index.xattrs {
        let name = index.arena_checked(u64::from(x.name_off), u64::from(x.name_len));
        let value = index.arena_checked(u64::from(x.value_off), u64::from(x.value_len));
        let name = name.and_then(|n| value.map(|_| n))?;
        if name.is_empty() || name.contains(&0) {
            return Err("xattr name is empty or contains a NUL".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Archive;
    use crate::index::build::{build_index, BuildOptions};

    fn sample_index() -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in [("d/x", &b"hello"[..]), ("d/y", b"world"), ("z", b"!")] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o640);
            b.append_data(&mut h, name, data).unwrap();
        }
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        let archive = Archive::open(&path).unwrap();
        let idx = build_index(&archive, &BuildOptions::default(), &Default::default()).unwrap();
        (dir, encode(&idx))
    }

    #[test]
    fn round_trips() {
        let (_d, bytes) = sample_index();
        let idx = decode(&bytes).unwrap();
        assert_eq!(idx.inodes.len(), 5);
        assert_eq!(encode(&idx), bytes);
    }

    #[test]
    fn rejects_every_truncation_and_flip_without_panicking() {
        let (_d, bytes) = sample_index();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err());
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            assert!(decode(&b).is_err(), "flip at {i} accepted");
        }
    }

    /// Found by the bounded fuzz pass (a mutated index with its CRC fixed up): an
    /// xattr name with a NUL passed `validate`, so `listxattr` listed names that
    /// `getxattr` could not find.
    #[test]
    fn fuzz_validate_rejects_bad_or_repeated_xattr_names() {
        let (_d, bytes) = sample_index();
        let mut idx = decode(&bytes).unwrap();
        idx.names.to_mut().extend_from_slice(b"user.a\0b");
        let name_off = (idx.names.len() - 8) as u32;
        idx.xattrs.push(XattrRecord {
            name_off,
            name_len: 8,
            value_off: 0,
            value_len: 1,
        });
        idx.inodes[1].xattr_first = 0;
        idx.inodes[1].xattr_count = 1;
        let err = |idx: &Index| decode(&encode(idx)).err().unwrap_or_default();
        assert!(err(&idx).contains("NUL"));
        idx.xattrs[0].name_len = 0;
        assert!(err(&idx).contains("empty"));
        idx.xattrs[0].name_len = 6;
        assert!(decode(&encode(&idx)).is_ok());
        idx.xattrs.push(idx.xattrs[0]);
        idx.inodes[1].xattr_count = 2;
        assert!(err(&idx).contains("twice"));
    }

    /// An index of 300 files in three directories (its inode records span 8 blocks),
    /// encoded, with the archive it describes.
    fn many_files_index() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..300 {
            let data = format!("file {i}\n");
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            let name = format!("d{}/f{i:03}", i / 100);
            b.append_data(&mut h, name, data.as_bytes()).unwrap();
        }
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        let archive = Archive::open(&path).unwrap();
        let idx = build_index(&archive, &BuildOptions::default(), &Default::default()).unwrap();
        (dir, path, encode(&idx))
    }

    /// `bytes` written to a file and mapped, as a mount opens an index.
    fn mapped(bytes: &[u8]) -> (tempfile::NamedTempFile, Result<Index, String>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        // SAFETY: a private temporary file nobody else writes.
        let map = Arc::new(unsafe { memmap2::Mmap::map(f.as_file()) }.unwrap());
        let index = decode_mapped(&map, f.path());
        (f, index)
    }

    /// File offset of inode `ino`'s record.
    fn inode_at(bytes: &[u8], ino: usize) -> usize {
        layout(bytes).unwrap().body + (ino - 1) * INODE_BYTES
    }

    #[test]
    fn a_mapped_index_reads_in_place_with_the_header_totals() {
        let (_d, _p, bytes) = many_files_index();
        let full = decode(&bytes).unwrap();
        let (_f, lazy) = mapped(&bytes);
        let lazy = lazy.unwrap();
        assert!(lazy.inodes.is_mapped() && lazy.lazy.is_some());
        assert_eq!(lazy.inodes, full.inodes);
        assert_eq!(lazy.stat_blocks, Some(full.total_blocks()));
        assert_eq!(full.total_blocks(), 300 * 8, "one 4 KiB page per file");
        // Only the header's and the root's blocks were read at open.
        let l = lazy.lazy.as_ref().unwrap();
        assert!(
            l.checked_blocks() <= 3,
            "{} blocks read",
            l.checked_blocks()
        );
        for ino in 1..=lazy.inodes.len() as u64 {
            assert_eq!(lazy.record(ino).unwrap(), full.record(ino).unwrap());
        }
    }

    #[test]
    fn a_corrupt_block_fails_only_its_records_naming_the_index() {
        let (_d, _p, mut bytes) = many_files_index();
        // Inode 150's block (3) holds no record the root needs.
        let n = 150;
        let at = inode_at(&bytes, n) + 32; // its size
        bytes[at] ^= 0x40;
        assert!(decode(&bytes).is_err(), "a whole check finds it");
        let (f, index) = mapped(&bytes);
        let index = index.expect("the root is intact: the index opens");
        let err = index.record(n as u64).unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        let shown = err.to_string();
        assert!(shown.contains(&f.path().display().to_string()), "{shown}");
        assert!(shown.contains(&format!("inode {n}")), "{shown}");
        assert!(shown.contains("checksum"), "{shown}");
        // Same verdict again; the records of other blocks are served.
        assert_eq!(index.record(n as u64).unwrap_err().errno(), libc::EIO);
        assert!(index.record(2).is_ok());
        assert!(index.entries(ROOT_INO).is_ok());
        let neighbour = index.record(n as u64 + 1).unwrap_err().errno();
        assert_eq!(neighbour, libc::EIO, "the same block");
        assert_eq!(index.record(400).unwrap_err().errno(), libc::ENOENT);
    }

    #[test]
    fn a_bad_record_with_good_checksums_fails_on_first_use() {
        let (_d, _p, mut bytes) = many_files_index();
        let n = decode(&bytes).unwrap().inodes.len();
        let at = inode_at(&bytes, n) + 32;
        bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(reseal(&mut bytes));
        let whole = decode(&bytes).err().unwrap();
        assert!(whole.contains("outside the archive stream"), "{whole}");
        let (_f, index) = mapped(&bytes);
        let index = index.unwrap();
        let err = index.record(n as u64).unwrap_err().to_string();
        assert!(err.contains("outside the archive stream"), "{err}");
        assert!(index.record(n as u64 - 1).is_ok(), "its neighbour is fine");
        // An entry name out of the arena: its directory's entries fail, others do not.
        let (_d, _p, mut bytes) = many_files_index();
        let full = decode(&bytes).unwrap();
        let dir = full.entries(ROOT_INO).unwrap()[2].ino;
        let first = full.inode(u64::from(dir)).unwrap().first as usize;
        let l = layout(&bytes).unwrap();
        let at = l.body + n * INODE_BYTES + first * DIRENT_BYTES;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(reseal(&mut bytes));
        let (_f, index) = mapped(&bytes);
        let index = index.unwrap();
        let err = index.entries(u64::from(dir)).unwrap_err().to_string();
        assert!(err.contains(&format!("inode {dir} entries")), "{err}");
        let other = full.entries(ROOT_INO).unwrap()[0].ino;
        assert_eq!(index.entries(u64::from(other)).unwrap().len(), 100);
    }

    #[test]
    fn a_mapped_gzip_index_reads_a_window_when_its_span_is_decoded() {
        let dir = tempfile::tempdir().unwrap();
        // Words of a small vocabulary: back-references reach across the whole window.
        let mut x = 1u64;
        let mut data = Vec::new();
        while data.len() < 6_000_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            data.extend_from_slice(format!("w{} ", (x >> 40) % 4000).as_bytes());
        }
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, "big", &data[..]).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &b.into_inner().unwrap()).unwrap();
        let path = dir.path().join("a.tar.gz");
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        let archive = Archive::open(&path).unwrap();
        let opts = BuildOptions {
            span_bytes: 1 << 20,
        };
        let bytes = encode(&build_index(&archive, &opts, &Default::default()).unwrap());
        let l = layout(&bytes).unwrap();
        let (at_table, _) = l.section(5);
        let table = l.bytes(&bytes, 5);
        let SeekTable::Gzip(t) = &*decode(&bytes).unwrap().table else {
            panic!("not a gzip table")
        };
        // Damage the last window (its block checksum now fails).
        let victim = t
            .checkpoints
            .iter()
            .rposition(|c| !c.window.is_empty())
            .unwrap();
        // Body offsets of every window's stored bytes.
        let windows_at = at_table + GzipSeekTable::head_len(table);
        let window_ranges: Vec<(usize, usize)> = t
            .checkpoints
            .iter()
            .scan(windows_at, |at, c| {
                let r = (*at, *at + c.window.stored_len());
                *at = r.1;
                Some(r)
            })
            .collect();
        let damaged = window_ranges[victim].0;
        assert!(
            damaged >= windows_at.next_multiple_of(BLOCK_BYTES),
            "the window shares a block with what an open reads"
        );
        let mut bad = bytes.clone();
        bad[l.body + damaged] ^= 0x10;
        let (_f, index) = mapped(&bad);
        let index = index.expect("windows are not read at open");
        let lazy = index.lazy.as_ref().unwrap();
        assert!(
            lazy.checked_blocks() * 4 < l.crcs.len(),
            "{} of {} blocks read at open",
            lazy.checked_blocks(),
            l.crcs.len()
        );
        let SeekTable::Gzip(t) = &*index.table else {
            panic!("not a gzip table")
        };
        // The spans whose windows lie in the damaged block fail, naming the index;
        // the others decode.
        let block = damaged / BLOCK_BYTES;
        let file = std::fs::File::open(&path).unwrap();
        let mut out = Vec::new();
        for (i, &(from, to)) in window_ranges.iter().enumerate() {
            let r = crate::archive::gzip::decode_span(&file, t, i, &mut out);
            if from < to && from / BLOCK_BYTES <= block && block <= (to - 1) / BLOCK_BYTES {
                let e = r.unwrap_err().to_string();
                assert!(e.contains("checksum mismatch in index block"), "{e}");
            } else {
                r.unwrap();
            }
        }
    }

    #[test]
    fn a_corrupt_root_or_header_refuses_the_mapped_index() {
        let (_d, _p, bytes) = many_files_index();
        let mut b = bytes.clone();
        b[inode_at(&bytes, 1)] ^= 1;
        assert!(mapped(&b).1.err().unwrap().contains("checksum"));
        let mut b = bytes.clone();
        b[60] ^= 1; // stream size
        assert!(mapped(&b).1.err().unwrap().contains("header checksum"));
        assert!(mapped(&bytes[..bytes.len() - 1]).1.is_err());
        assert!(mapped(&bytes).1.is_ok());
    }

    #[test]
    fn validate_catches_bad_records_even_with_a_good_checksum() {
        let (_d, bytes) = sample_index();
        let mut idx = decode(&bytes).unwrap();
        idx.dirents[0].ino = 1; // root inside a directory: a loop
        assert!(validate(&idx).is_err());
        let mut idx = decode(&bytes).unwrap();
        let last = idx.inodes.len() - 1;
        idx.inodes[last].size = u64::MAX;
        assert!(validate(&idx).is_err());
    }
}
