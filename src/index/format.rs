//! The persisted index file: little-endian fixed records, offsets not pointers, a
//! CRC-32 over everything, and [`validate`] before anything is trusted.
//!
//! Layout (version 2):
//! ```text
//! magic "SNAPFSIX" | version u32 | flags u32
//! archive id: size u64 | mtime_ns i64 | head_crc u32 | tail_crc u32
//! span_bytes u64 | compression u8 | 7 zero bytes | stream_size u64 | skipped u64
//! counts u64 x 6: inodes, dirents, names, xattrs, segments, seek-table bytes
//! inodes (96 B each) | dirents (12 B) | names | xattrs (16 B) | segments (24 B)
//! seek table (gzip/zstd/xz/bzip2 encoding, empty for plain tar) | crc32 u32 of all before
//! ```
//! Version history: 1 — first format; 2 — inode records carry atime and ctime
//! (72 → 96 bytes: `atime i64 | ctime i64 | atime_nsec u32 | ctime_nsec u32` after
//! `flags`), from PAX `atime`/`ctime` records or the mtime.
//!
//! Compression codes: 0 tar, 1 gzip, 2 zstd; 3 xz and 4 bzip2 were added later
//! without a version bump (a reader that does not know a code refuses the index as
//! unknown and rebuilds it, which it could not do for that archive anyway).

use crate::archive::bzip2::Bz2SeekTable;
use crate::archive::gzip::GzipSeekTable;
use crate::archive::tar::Segment;
use crate::archive::xz::XzSeekTable;
use crate::archive::zstd::ZstdSeekTable;
use crate::archive::{ArchiveId, Compression, SeekTable};
use std::sync::Arc;

use crate::index::records::Records;
use crate::index::{DirentRecord, Index, InodeRecord, XattrRecord, FLAG_SPARSE};

/// File magic.
pub const MAGIC: &[u8; 8] = b"SNAPFSIX";
/// Current format version.
pub const VERSION: u32 = 2;

const INODE_BYTES: usize = 96;
const DIRENT_BYTES: usize = 12;
const XATTR_BYTES: usize = 16;
const SEGMENT_BYTES: usize = 24;
const HEADER_BYTES: usize = 8 + 4 + 4 + 24 + 8 + 8 + 8 + 8 + 6 * 8;

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
    let mut out = Vec::with_capacity(
        HEADER_BYTES
            + index.inodes.len() * INODE_BYTES
            + index.dirents.len() * DIRENT_BYTES
            + index.names.len()
            + table.len()
            + 4,
    );
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
    for r in &index.inodes {
        put32(&mut out, r.mode);
        put32(&mut out, r.nlink);
        put32(&mut out, r.uid);
        put32(&mut out, r.gid);
        put64(&mut out, r.mtime as u64);
        put32(&mut out, r.mtime_nsec);
        put32(&mut out, r.rdev);
        put64(&mut out, r.size);
        put64(&mut out, r.data);
        put32(&mut out, r.first);
        put32(&mut out, r.count);
        put32(&mut out, r.xattr_first);
        put32(&mut out, r.xattr_count);
        put32(&mut out, r.parent);
        put32(&mut out, r.flags);
        put64(&mut out, r.atime as u64);
        put64(&mut out, r.ctime as u64);
        put32(&mut out, r.atime_nsec);
        put32(&mut out, r.ctime_nsec);
    }
    for d in &index.dirents {
        put32(&mut out, d.name_off);
        put32(&mut out, d.name_len);
        put32(&mut out, d.ino);
    }
    out.extend_from_slice(&index.names);
    for x in &index.xattrs {
        put32(&mut out, x.name_off);
        put32(&mut out, x.name_len);
        put32(&mut out, x.value_off);
        put32(&mut out, x.value_len);
    }
    for s in &index.segments {
        put64(&mut out, s.logical);
        put64(&mut out, s.stream);
        put64(&mut out, s.len);
    }
    out.extend_from_slice(&table);
    let crc = crc32fast::hash(&out);
    put32(&mut out, crc);
    out
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
    /// A record count, bounded by the bytes that remain.
    fn count(&mut self, record: usize) -> Result<usize, String> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| "record count too large")?;
        let remaining = self.bytes.len().saturating_sub(self.pos);
        if n.checked_mul(record.max(1)).is_none_or(|b| b > remaining) {
            return Err("record count exceeds the file size".into());
        }
        Ok(n)
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

/// Checks magic, version and checksum, and reads the identity and options: the part
/// of an index file shared by [`peek`] and [`decode`]. Returns the body (without the
/// checksum) and a cursor positioned after the header fields read.
fn open_header(bytes: &[u8]) -> Result<(Header, Cursor<'_>), String> {
    if bytes.len() < HEADER_BYTES + 4 {
        return Err("index file is truncated".into());
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let mut c = Cursor {
        bytes: body,
        pos: 0,
    };
    check_magic_and_version(&mut c)?;
    if crc32fast::hash(body) != stored {
        return Err("index checksum mismatch (corrupt file)".into());
    }
    let header = header_fields(&mut c)?;
    Ok((header, c))
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

/// Parses and validates an index file. Nothing in `bytes` is trusted.
pub fn decode(bytes: &[u8]) -> Result<Index, String> {
    decode_in(bytes, None)
}

/// Parses and validates a mapped index file, reading the inode and entry records and
/// the name arena in place ([`Records`]) instead of copying them: the mount keeps in
/// memory only what it touches. Nothing in the file is trusted.
pub fn decode_mapped(map: &Arc<memmap2::Mmap>) -> Result<Index, String> {
    decode_in(map, Some(map))
}

/// `bytes` is the whole file; `map`, when given, is the mapping they are.
fn decode_in(bytes: &[u8], map: Option<&Arc<memmap2::Mmap>>) -> Result<Index, String> {
    let (Header { id, span_bytes }, mut c) = open_header(bytes)?;
    let body = c.bytes;
    let comp = Compression::from_code(c.take(8)?[0]).ok_or("unknown compression code")?;
    let stream_size = c.u64()?;
    let skipped = c.u64()?;
    let n_inodes = c.count(INODE_BYTES)?;
    let n_dirents = c.count(DIRENT_BYTES)?;
    let n_names = c.count(1)?;
    let n_xattrs = c.count(XATTR_BYTES)?;
    let n_segments = c.count(SEGMENT_BYTES)?;
    let n_table = c.count(1)?;
    // Each section is one bounds-checked slice, then parsed record by record.
    let at = c.pos;
    let raw = c.take(n_inodes * INODE_BYTES)?;
    let inodes = match in_place(map, at, n_inodes) {
        Some(r) => r,
        None => raw
            .chunks_exact(INODE_BYTES)
            .map(parse_inode)
            .collect::<Vec<_>>()
            .into(),
    };
    let at = c.pos;
    let raw = c.take(n_dirents * DIRENT_BYTES)?;
    let dirents = match in_place(map, at, n_dirents) {
        Some(r) => r,
        None => raw
            .chunks_exact(DIRENT_BYTES)
            .map(|r| DirentRecord {
                name_off: le32(r, 0),
                name_len: le32(r, 4),
                ino: le32(r, 8),
            })
            .collect::<Vec<_>>()
            .into(),
    };
    let at = c.pos;
    let raw = c.take(n_names)?;
    let names = match in_place(map, at, n_names) {
        Some(r) => r,
        None => raw.to_vec().into(),
    };
    let xattrs = c
        .take(n_xattrs * XATTR_BYTES)?
        .chunks_exact(XATTR_BYTES)
        .map(|r| XattrRecord {
            name_off: le32(r, 0),
            name_len: le32(r, 4),
            value_off: le32(r, 8),
            value_len: le32(r, 12),
        })
        .collect();
    let segments = c
        .take(n_segments * SEGMENT_BYTES)?
        .chunks_exact(SEGMENT_BYTES)
        .map(|r| Segment {
            logical: le64(r, 0),
            stream: le64(r, 8),
            len: le64(r, 16),
        })
        .collect();
    let table_bytes = c.take(n_table)?;
    if c.pos != body.len() {
        return Err("trailing bytes after the index".into());
    }
    let table = match comp {
        Compression::None => SeekTable::Plain,
        Compression::Gzip => SeekTable::Gzip(GzipSeekTable::decode(table_bytes)?),
        Compression::Zstd => SeekTable::Zstd(ZstdSeekTable::decode(table_bytes)?),
        Compression::Xz => SeekTable::Xz(XzSeekTable::decode(table_bytes)?),
        Compression::Bzip2 => SeekTable::Bzip2(Bz2SeekTable::decode(table_bytes)?),
    };
    let index = Index {
        id,
        span_bytes,
        stream_size,
        table: std::sync::Arc::new(table),
        inodes,
        dirents,
        names,
        xattrs,
        segments,
        skipped,
    };
    validate(&index)?;
    Ok(index)
}

/// `n` records at byte `at` of the mapped file, read in place, if there is a mapping
/// and they can be (see [`Records::mapped`]).
fn in_place<T: crate::index::records::Record>(
    map: Option<&Arc<memmap2::Mmap>>,
    at: usize,
    n: usize,
) -> Option<Records<T>> {
    map.and_then(|m| Records::mapped(m, at, n))
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

/// Reads just the header of an index file and checks magic, version and checksum,
/// without decoding the records: enough to know whether it is current.
pub fn peek(bytes: &[u8]) -> Result<Header, String> {
    open_header(bytes).map(|(h, _)| h)
}

fn range_ok(off: u64, len: u64, limit: usize) -> bool {
    off.checked_add(len).is_some_and(|e| e <= limit as u64)
}

/// Checks every offset, count and reference so that serving the index can never index
/// out of bounds or loop: directories form a tree rooted at inode 1, entries are
/// sorted, names are valid, data ranges lie inside the stream.
pub fn validate(index: &Index) -> Result<(), String> {
    let n = index.inodes.len();
    let root = index.inodes.first().ok_or("index has no root")?;
    if !root.is_dir() || root.parent != 1 {
        return Err("index root is not a directory".into());
    }
    match &*index.table {
        SeekTable::Plain => {}
        SeekTable::Gzip(t) if t.uncompressed_size == index.stream_size => {}
        SeekTable::Zstd(t) if t.uncompressed_size == index.stream_size => {}
        SeekTable::Xz(t) if t.uncompressed_size == index.stream_size => {}
        SeekTable::Bzip2(t) if t.uncompressed_size == index.stream_size => {}
        _ => return Err("seek table size does not match the stream size".into()),
    }
    let mut referenced_dirs = vec![0u8; n];
    for (i, r) in index.inodes.iter().enumerate() {
        let ino = i as u64 + 1;
        let bad = |what: &str| format!("inode {ino}: {what}");
        if !range_ok(
            u64::from(r.xattr_first),
            u64::from(r.xattr_count),
            index.xattrs.len(),
        ) {
            return Err(bad("xattr range out of bounds"));
        }
        if r.xattr_count > 1 {
            let mut seen = std::collections::HashSet::new();
            for x in index.inode_xattrs(r) {
                let name = index.arena(u64::from(x.name_off), u64::from(x.name_len));
                if !seen.insert(name) {
                    return Err(bad("xattr name given twice"));
                }
            }
        }
        match r.file_type() {
            libc::S_IFDIR => {
                if !range_ok(u64::from(r.first), u64::from(r.count), index.dirents.len()) {
                    return Err(bad("directory range out of bounds"));
                }
                let kids = index.children(r);
                let mut prev: Option<&[u8]> = None;
                for d in kids {
                    if !range_ok(
                        u64::from(d.name_off),
                        u64::from(d.name_len),
                        index.names.len(),
                    ) {
                        return Err(bad("entry name out of bounds"));
                    }
                    let name = index.dirent_name(d);
                    if name.is_empty()
                        || name == b"."
                        || name == b".."
                        || name.contains(&b'/')
                        || name.contains(&0)
                    {
                        return Err(bad("invalid entry name"));
                    }
                    if prev.is_some_and(|p| p >= name) {
                        return Err(bad("entries not sorted"));
                    }
                    prev = Some(name);
                    let child = d.ino as usize;
                    if child < 2 || child > n {
                        return Err(bad("entry refers to an invalid inode"));
                    }
                    let c = &index.inodes[child - 1];
                    if c.is_dir() {
                        if u64::from(c.parent) != ino || referenced_dirs[child - 1] != 0 {
                            return Err(bad("directory linked twice or with a wrong parent"));
                        }
                        referenced_dirs[child - 1] = 1;
                    }
                }
            }
            libc::S_IFREG => {
                if r.flags & FLAG_SPARSE != 0 {
                    if !range_ok(u64::from(r.first), u64::from(r.count), index.segments.len()) {
                        return Err(bad("segment range out of bounds"));
                    }
                    let mut end = 0u64;
                    for s in index.file_segments(r) {
                        if s.logical < end
                            || !range_ok(s.stream, s.len, usize::MAX)
                            || s.stream + s.len > index.stream_size
                        {
                            return Err(bad("bad sparse segment"));
                        }
                        end = s
                            .logical
                            .checked_add(s.len)
                            .ok_or_else(|| bad("segment overflow"))?;
                        if end > r.size {
                            return Err(bad("sparse segment past the end of file"));
                        }
                    }
                } else if r
                    .data
                    .checked_add(r.size)
                    .is_none_or(|e| e > index.stream_size)
                {
                    return Err(bad("file data outside the archive stream"));
                }
            }
            libc::S_IFLNK => {
                if !range_ok(r.data, r.size, index.names.len()) {
                    return Err(bad("symlink target out of bounds"));
                }
            }
            libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO | libc::S_IFSOCK => {}
            _ => return Err(bad("unknown file type")),
        }
    }
    for x in &index.xattrs {
        if !range_ok(
            u64::from(x.name_off),
            u64::from(x.name_len),
            index.names.len(),
        ) || !range_ok(
            u64::from(x.value_off),
            u64::from(x.value_len),
            index.names.len(),
        ) {
            return Err("xattr out of bounds".into());
        }
        let name = index.arena(u64::from(x.name_off), u64::from(x.name_len));
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
