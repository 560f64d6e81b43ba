//! Tar member parsing over an uncompressed tar stream: headers (via the `tar` crate's
//! `Header`), PAX (local and global), GNU longname/longlink, old-GNU and PAX sparse maps
//! and xattrs. Yields [`Member`]s that say where each member's data lives in the stream;
//! it never interprets paths (that is `index::build`'s job).

use std::io::{self, Read};
use std::path::Path;

use base64::Engine;
use tar::{GnuExtSparseHeader, Header};

use crate::error::{Error, Result};

const BLOCK: u64 = 512;

/// A sparse map: (offset in file, length) pairs.
type SparseMap = Vec<(u64, u64)>;
/// PAX records in order: (key, value).
type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;
/// Largest PAX / longname / sparse-map block we accept (hostile input caps allocations).
const MAX_META_BYTES: u64 = 64 << 20;

/// What kind of filesystem object a member creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKind {
    /// Regular file (also contiguous files and unknown type flags, as GNU tar does).
    File,
    /// Directory.
    Dir,
    /// Symbolic link; `Member::link` is its target.
    Symlink,
    /// Hard link to the earlier member named by `Member::link`.
    Hardlink,
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
}

/// A run of file bytes stored contiguously in the tar stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Offset within the file.
    pub logical: u64,
    /// Offset within the uncompressed tar stream.
    pub stream: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Where a member's content lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// `size` bytes starting at this stream offset.
    Contiguous(u64),
    /// A sparse file: these segments, holes elsewhere.
    Sparse(Vec<Segment>),
}

/// One tar member, after PAX/GNU extensions have been applied.
#[derive(Debug, Clone)]
pub struct Member {
    /// The member name, raw bytes as stored (not cleaned).
    pub path: Vec<u8>,
    /// Symlink target or hardlink target, raw.
    pub link: Vec<u8>,
    /// Object kind.
    pub kind: MemberKind,
    /// Permission bits (including setuid/setgid/sticky).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u64,
    /// Numeric group.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: u32,
    /// Access time (seconds, nanoseconds) from a PAX `atime` record, if any.
    pub atime: Option<(i64, u32)>,
    /// Status change time (seconds, nanoseconds) from a PAX `ctime` record, if any.
    pub ctime: Option<(i64, u32)>,
    /// Apparent file size (the real size for sparse files).
    pub size: u64,
    /// Where the content is.
    pub data: Data,
    /// Device major number (char/block devices).
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// Extended attributes (name, value).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Stream offset of the member's (first) header, for messages.
    pub header_offset: u64,
}

/// A readable uncompressed tar stream that can also skip forward cheaply.
pub trait TarStream: Read {
    /// Skip `n` bytes. Errors if the stream ends first (where that can be known).
    fn skip(&mut self, n: u64) -> io::Result<()>;
}

/// A [`TarStream`] over any reader: skipping reads and discards.
pub struct ReadStream<R>(pub R);

impl<R: Read> Read for ReadStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read> TarStream for ReadStream<R> {
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let copied = io::copy(&mut (&mut self.0).take(n), &mut io::sink())?;
        if copied < n {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stream ends inside member data",
            ));
        }
        Ok(())
    }
}

/// A [`TarStream`] over a plain (uncompressed) source: skipping skips the data.
pub struct FileStream {
    inner: crate::source::SourceReader,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

/// Bytes a [`FileStream`] reads at a time.
const FILE_STREAM_BUF: usize = 256 << 10;

impl FileStream {
    /// Wraps `inner`.
    pub fn new(inner: crate::source::SourceReader) -> Self {
        FileStream {
            inner,
            buf: vec![0; FILE_STREAM_BUF],
            pos: 0,
            end: 0,
        }
    }
}

impl Read for FileStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.end {
            if buf.len() >= self.buf.len() {
                return self.inner.read(buf);
            }
            self.end = self.inner.read(&mut self.buf)?;
            self.pos = 0;
        }
        let n = buf.len().min(self.end - self.pos);
        buf[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl TarStream for FileStream {
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let buffered = (self.end - self.pos) as u64;
        if n <= buffered {
            self.pos += n as usize;
            return Ok(());
        }
        self.pos = 0;
        self.end = 0;
        self.inner.skip(n - buffered)
    }
}

/// Reads members one by one from a tar stream.
pub struct MemberReader<'a, S> {
    stream: S,
    archive: &'a Path,
    pos: u64,
    global_pax: Vec<(Vec<u8>, Vec<u8>)>,
    done: bool,
}

/// Extensions collected from headers that precede a member.
#[derive(Default)]
struct Pending {
    pax: Vec<(Vec<u8>, Vec<u8>)>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

impl<'a, S: TarStream> MemberReader<'a, S> {
    /// Starts reading `stream`; `archive` names the archive in messages.
    pub fn new(stream: S, archive: &'a Path) -> Self {
        MemberReader {
            stream,
            archive,
            pos: 0,
            global_pax: Vec::new(),
            done: false,
        }
    }

    /// Starts reading `stream`, which begins at offset `start` of the tar stream (a
    /// header boundary); offsets in the members it returns are stream offsets.
    pub fn starting_at(stream: S, archive: &'a Path, start: u64) -> Self {
        MemberReader {
            pos: start,
            ..Self::new(stream, archive)
        }
    }

    /// Stream offset reached so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Gives back the stream (e.g. to finish a decompressor).
    pub fn into_inner(self) -> S {
        self.stream
    }

    fn err(&self, entry: Option<&[u8]>, offset: u64, msg: impl Into<String>) -> Error {
        Error::archive(self.archive, entry, Some(offset), msg)
    }

    /// Reads one 512-byte block; `Ok(false)` on a clean end of stream.
    fn read_block(&mut self, block: &mut [u8; 512]) -> Result<bool> {
        let mut got = 0;
        while got < block.len() {
            match self.stream.read(&mut block[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.stream_error(None, e)),
            }
        }
        if got == 0 {
            return Ok(false);
        }
        if got < block.len() {
            return Err(self.err(None, self.pos, "archive is truncated inside a header block"));
        }
        self.pos += BLOCK;
        Ok(true)
    }

    fn stream_error(&self, entry: Option<&[u8]>, e: io::Error) -> Error {
        let msg = if e.kind() == io::ErrorKind::UnexpectedEof {
            format!("archive is truncated: {e}")
        } else {
            e.to_string()
        };
        self.err(entry, self.pos, msg)
    }

    fn read_meta(&mut self, size: u64, what: &str) -> Result<Vec<u8>> {
        if size > MAX_META_BYTES {
            return Err(self.err(
                None,
                self.pos,
                format!("{what} of {size} bytes is too large"),
            ));
        }
        let mut buf = vec![0u8; size as usize];
        self.stream
            .read_exact(&mut buf)
            .map_err(|e| self.stream_error(None, e))?;
        self.pos += size;
        self.skip(padding(size))?;
        Ok(buf)
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.stream
            .skip(n)
            .map_err(|e| self.stream_error(None, e))?;
        self.pos += n;
        Ok(())
    }

    /// The next member, or `None` at the end of the archive.
    pub fn next_member(&mut self) -> Result<Option<Member>> {
        if self.done {
            return Ok(None);
        }
        let mut pending = Pending::default();
        let mut block = [0u8; 512];
        loop {
            let header_offset = self.pos;
            if !self.read_block(&mut block)? {
                self.done = true;
                if pending.pax.is_empty() && pending.long_name.is_none() {
                    return Ok(None);
                }
                return Err(self.err(
                    None,
                    header_offset,
                    "archive ends after an extension header",
                ));
            }
            if block.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            let header = Header::from_byte_slice(&block);
            verify_checksum(&block).map_err(|m| self.err(None, header_offset, m))?;
            let size = header
                .entry_size()
                .map_err(|e| self.err(None, header_offset, format!("bad size field: {e}")))?;
            match header.entry_type().as_byte() {
                b'x' | b'X' => {
                    let raw = self.read_meta(size, "PAX header")?;
                    pending
                        .pax
                        .extend(parse_pax(&raw).map_err(|m| self.err(None, header_offset, m))?);
                }
                b'g' => {
                    let raw = self.read_meta(size, "global PAX header")?;
                    let recs = parse_pax(&raw).map_err(|m| self.err(None, header_offset, m))?;
                    for (k, v) in recs {
                        self.global_pax.retain(|(gk, _)| *gk != k);
                        self.global_pax.push((k, v));
                    }
                }
                b'L' => {
                    let raw = self.read_meta(size, "GNU long name")?;
                    pending.long_name = Some(trim_nul(raw));
                }
                b'K' => {
                    let raw = self.read_meta(size, "GNU long link")?;
                    pending.long_link = Some(trim_nul(raw));
                }
                b'V' => {
                    // GNU volume label: not a file.
                    self.skip(
                        round_up(size)
                            .ok_or_else(|| self.err(None, header_offset, "size overflow"))?,
                    )?;
                    pending = Pending::default();
                }
                b'M' => {
                    return Err(self.err(
                        Some(&header.path_bytes()),
                        header_offset,
                        "multi-volume continuation members are not supported",
                    ))
                }
                _ => {
                    let member = self.member(header, &block, header_offset, size, pending)?;
                    return Ok(Some(member));
                }
            }
        }
    }

    fn member(
        &mut self,
        header: &Header,
        block: &[u8; 512],
        header_offset: u64,
        header_size: u64,
        pending: Pending,
    ) -> Result<Member> {
        let type_byte = header.entry_type().as_byte();
        let mut path = pending
            .long_name
            .unwrap_or_else(|| header.path_bytes().into_owned());
        let mut link = pending.long_link.unwrap_or_else(|| {
            header
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default()
        });
        let bad = |this: &Self, path: &[u8], field: &str, e: io::Error| {
            this.err(Some(path), header_offset, format!("bad {field} field: {e}"))
        };
        // A field left blank (all NUL or spaces) reads as 0, as GNU tar reads it.
        let field = |r: io::Result<u64>, range: std::ops::Range<usize>, name: &str| match r {
            Ok(v) => Ok(v),
            Err(_) if block[range.clone()].iter().all(|&b| b == 0 || b == b' ') => Ok(0),
            Err(e) => Err(bad(self, &path, name, e)),
        };
        let mut mode = field(header.mode().map(u64::from), 100..108, "mode")? as u32 & 0o7777;
        let mut uid = field(header.uid(), 108..116, "uid")?;
        let mut gid = field(header.gid(), 116..124, "gid")?;
        let mut mtime =
            i64::try_from(field(header.mtime(), 136..148, "mtime")?).unwrap_or(i64::MAX);
        let mut mtime_nsec = 0u32;
        let (mut atime, mut ctime) = (None, None);
        let mut stored = header_size;
        let (dev_major, dev_minor) = if matches!(type_byte, b'3' | b'4') {
            let ma = header.device_major().ok().flatten().unwrap_or(0);
            let mi = header.device_minor().ok().flatten().unwrap_or(0);
            (ma, mi)
        } else {
            (0, 0)
        };

        let mut xattrs = Vec::new();
        let mut sparse = SparseInfo::default();
        let records = self.global_pax.iter().chain(pending.pax.iter());
        for (key, value) in records {
            let v = || String::from_utf8_lossy(value);
            match key.as_slice() {
                b"path" => path = value.clone(),
                b"linkpath" => link = value.clone(),
                b"size" => {
                    stored = parse_u64(value).ok_or_else(|| {
                        self.err(
                            Some(&path),
                            header_offset,
                            format!("bad PAX size {:?}", v()),
                        )
                    })?
                }
                b"uid" => uid = parse_u64(value).unwrap_or(uid),
                b"gid" => gid = parse_u64(value).unwrap_or(gid),
                b"mtime" => {
                    if let Some((s, ns)) = parse_pax_time(value) {
                        mtime = s;
                        mtime_nsec = ns;
                    }
                }
                b"atime" => atime = parse_pax_time(value).or(atime),
                b"ctime" => ctime = parse_pax_time(value).or(ctime),
                b"GNU.sparse.size" | b"GNU.sparse.realsize" => sparse.real_size = parse_u64(value),
                b"GNU.sparse.name" => sparse.name = Some(value.clone()),
                b"GNU.sparse.major" => sparse.major = parse_u64(value),
                b"GNU.sparse.minor" => sparse.minor = parse_u64(value),
                b"GNU.sparse.offset" => sparse.pending_offset = parse_u64(value),
                b"GNU.sparse.numbytes" => {
                    if let (Some(o), Some(n)) = (sparse.pending_offset.take(), parse_u64(value)) {
                        sparse.map.push((o, n));
                    } else {
                        return Err(self.err(
                            Some(&path),
                            header_offset,
                            "bad GNU.sparse.numbytes",
                        ));
                    }
                    sparse.pax0 = true;
                }
                b"GNU.sparse.map" => {
                    sparse.map = parse_sparse_map_01(value).ok_or_else(|| {
                        self.err(Some(&path), header_offset, "bad GNU.sparse.map")
                    })?;
                    sparse.pax0 = true;
                }
                k if k.starts_with(b"SCHILY.xattr.") => {
                    let name = k[b"SCHILY.xattr.".len()..].to_vec();
                    xattrs.retain(|(n, _)| *n != name);
                    xattrs.push((name, value.clone()))
                }
                k if k.starts_with(b"LIBARCHIVE.xattr.") => {
                    let name = percent_decode(&k[b"LIBARCHIVE.xattr.".len()..]);
                    let val = base64::engine::general_purpose::STANDARD_NO_PAD
                        .decode(
                            value
                                .iter()
                                .copied()
                                .filter(|&b| b != b'=')
                                .collect::<Vec<_>>(),
                        )
                        .map_err(|e| {
                            self.err(
                                Some(&path),
                                header_offset,
                                format!("bad LIBARCHIVE.xattr value: {e}"),
                            )
                        })?;
                    xattrs.retain(|(n, _)| *n != name);
                    xattrs.push((name, val));
                }
                _ => {}
            }
        }
        // An xattr name is a C string to the kernel: an empty one or one with a NUL
        // cannot be listed or read back (extractors cannot set it either).
        let before = xattrs.len();
        xattrs.retain(|(n, _)| !n.is_empty() && !n.contains(&0));
        if xattrs.len() != before {
            log::warn!(
                "{}: member {:?}: dropping xattrs with an empty name or a NUL in it",
                self.archive.display(),
                String::from_utf8_lossy(&path)
            );
        }
        if let Some(name) = sparse.name.take() {
            if sparse.pax0 || sparse.major.is_some() {
                path = name;
            }
        }

        let mut kind = match type_byte {
            b'0' | 0 | b'7' => MemberKind::File,
            b'1' => MemberKind::Hardlink,
            b'2' => MemberKind::Symlink,
            b'3' => MemberKind::Char,
            b'4' => MemberKind::Block,
            b'5' | b'D' => MemberKind::Dir,
            b'6' => MemberKind::Fifo,
            b'S' => MemberKind::File,
            other => {
                log::warn!(
                    "{}: member {:?} has unknown type {:?}; treating it as a regular file",
                    self.archive.display(),
                    String::from_utf8_lossy(&path),
                    other as char
                );
                MemberKind::File
            }
        };
        if kind == MemberKind::File
            && type_byte != b'S'
            && path.ends_with(b"/")
            && sparse.major.is_none()
            && !sparse.pax0
        {
            // Old (V7) archives mark directories with a trailing slash only.
            kind = MemberKind::Dir;
        }

        // Names are C strings to GNU tar: anything after a NUL is not part of them.
        truncate_at_nul(&mut path);
        truncate_at_nul(&mut link);
        let data_start = self.pos;
        let padded = round_up(stored)
            .ok_or_else(|| self.err(Some(&path), header_offset, "size overflow"))?;
        let (size, data) = if type_byte == b'S' {
            let (real, segs, ext_blocks) = self.old_gnu_sparse(header, &path, header_offset)?;
            let data_start = data_start + ext_blocks * BLOCK;
            (
                real,
                Data::Sparse(
                    place_segments(&segs, data_start, stored)
                        .map_err(|m| self.err(Some(&path), header_offset, m))?,
                ),
            )
        } else if sparse.major == Some(1) {
            // PAX 1.0: the map sits at the start of the data area.
            let (segs, map_len) = self.pax1_sparse_map(&path, header_offset, stored)?;
            let real = sparse.real_size.unwrap_or(0);
            let rest = stored - map_len;
            let segs = place_segments(&segs, data_start + map_len, rest)
                .map_err(|m| self.err(Some(&path), header_offset, m))?;
            check_segments(&segs, real).map_err(|m| self.err(Some(&path), header_offset, m))?;
            self.skip(padded - map_len)?;
            return Ok(Member {
                path,
                link,
                kind,
                mode,
                uid,
                gid,
                mtime,
                mtime_nsec,
                atime,
                ctime,
                size: real,
                data: Data::Sparse(segs),
                dev_major,
                dev_minor,
                xattrs,
                header_offset,
            });
        } else if sparse.pax0 {
            let real = sparse.real_size.unwrap_or(stored);
            (
                real,
                Data::Sparse(
                    place_segments(&sparse.map, data_start, stored)
                        .map_err(|m| self.err(Some(&path), header_offset, m))?,
                ),
            )
        } else {
            (
                if kind == MemberKind::File { stored } else { 0 },
                Data::Contiguous(data_start),
            )
        };
        if let Data::Sparse(segs) = &data {
            check_segments(segs, size).map_err(|m| self.err(Some(&path), header_offset, m))?;
        }
        // Skip the data (for old GNU sparse, extension blocks were already consumed).
        self.skip(padded)?;
        if kind != MemberKind::File {
            mode &= 0o7777;
        }
        Ok(Member {
            path,
            link,
            kind,
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            atime,
            ctime,
            size,
            data,
            dev_major,
            dev_minor,
            xattrs,
            header_offset,
        })
    }

    /// Old GNU sparse: the map lives in the header and in extension blocks after it.
    fn old_gnu_sparse(
        &mut self,
        header: &Header,
        path: &[u8],
        header_offset: u64,
    ) -> Result<(u64, SparseMap, u64)> {
        let gnu = header.as_gnu().ok_or_else(|| {
            self.err(
                Some(path),
                header_offset,
                "sparse member without a GNU header",
            )
        })?;
        let real = gnu
            .real_size()
            .map_err(|e| self.err(Some(path), header_offset, format!("bad realsize: {e}")))?;
        let mut map = Vec::new();
        let bad = |this: &Self, e: io::Error| {
            this.err(Some(path), header_offset, format!("bad sparse map: {e}"))
        };
        for s in gnu.sparse.iter().filter(|s| !s.is_empty()) {
            map.push((
                s.offset().map_err(|e| bad(self, e))?,
                s.length().map_err(|e| bad(self, e))?,
            ));
        }
        let mut extended = gnu.is_extended();
        let mut blocks = 0u64;
        while extended {
            let mut ext = GnuExtSparseHeader::new();
            let mut raw = [0u8; 512];
            if !self.read_block(&mut raw)? {
                return Err(self.err(
                    Some(path),
                    header_offset,
                    "archive ends inside a sparse map",
                ));
            }
            blocks += 1;
            if map.len() as u64 > MAX_META_BYTES / 16 {
                return Err(self.err(Some(path), header_offset, "sparse map is too large"));
            }
            ext.as_mut_bytes().copy_from_slice(&raw);
            for s in ext.sparse().iter().filter(|s| !s.is_empty()) {
                map.push((
                    s.offset().map_err(|e| bad(self, e))?,
                    s.length().map_err(|e| bad(self, e))?,
                ));
            }
            extended = ext.is_extended();
        }
        Ok((real, map, blocks))
    }

    /// PAX 1.0 sparse map: decimal numbers, one per line, at the start of the data,
    /// padded to a block. Returns the map and the bytes it occupies.
    fn pax1_sparse_map(
        &mut self,
        path: &[u8],
        header_offset: u64,
        stored: u64,
    ) -> Result<(Vec<(u64, u64)>, u64)> {
        let mut text = Vec::new();
        let mut numbers: Vec<u64> = Vec::new();
        let mut expected: Option<u64> = None;
        let mut consumed = 0u64;
        let mut block = [0u8; 512];
        loop {
            if let Some(n) = expected {
                if numbers.len() as u64 == 1 + 2 * n {
                    break;
                }
            }
            if consumed + BLOCK > stored {
                return Err(self.err(
                    Some(path),
                    header_offset,
                    "PAX 1.0 sparse map runs past the member data",
                ));
            }
            if consumed >= MAX_META_BYTES {
                return Err(self.err(Some(path), header_offset, "PAX 1.0 sparse map is too large"));
            }
            self.stream
                .read_exact(&mut block)
                .map_err(|e| self.stream_error(Some(path), e))?;
            self.pos += BLOCK;
            consumed += BLOCK;
            text.extend_from_slice(&block);
            // Parse all complete lines.
            while let Some(nl) = text.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = text.drain(..=nl).collect();
                let n = parse_u64(&line[..line.len() - 1]).ok_or_else(|| {
                    self.err(
                        Some(path),
                        header_offset,
                        "bad number in PAX 1.0 sparse map",
                    )
                })?;
                numbers.push(n);
                if expected.is_none() {
                    if n > MAX_META_BYTES / 16 {
                        return Err(self.err(
                            Some(path),
                            header_offset,
                            "PAX 1.0 sparse map is too large",
                        ));
                    }
                    expected = Some(n);
                }
                if let Some(e) = expected {
                    if numbers.len() as u64 == 1 + 2 * e {
                        break;
                    }
                }
            }
        }
        let map = numbers[1..].chunks_exact(2).map(|c| (c[0], c[1])).collect();
        Ok((map, consumed))
    }
}

#[derive(Default)]
struct SparseInfo {
    real_size: Option<u64>,
    name: Option<Vec<u8>>,
    major: Option<u64>,
    minor: Option<u64>,
    pending_offset: Option<u64>,
    map: Vec<(u64, u64)>,
    pax0: bool,
}

/// Lays sparse segments out one after another from `start`, checking they fit `stored`.
fn place_segments(
    map: &[(u64, u64)],
    start: u64,
    stored: u64,
) -> std::result::Result<Vec<Segment>, String> {
    let mut out = Vec::with_capacity(map.len());
    let mut used = 0u64;
    for &(logical, len) in map {
        if len == 0 {
            continue;
        }
        let stream = start.checked_add(used).ok_or("sparse offset overflow")?;
        used = used.checked_add(len).ok_or("sparse size overflow")?;
        out.push(Segment {
            logical,
            stream,
            len,
        });
    }
    if used > stored {
        return Err(format!(
            "sparse map describes {used} bytes but the member stores {stored}"
        ));
    }
    Ok(out)
}

/// Segments must be in order, not overlap and end within the file.
fn check_segments(segs: &[Segment], size: u64) -> std::result::Result<(), String> {
    let mut end = 0u64;
    for s in segs {
        if s.logical < end {
            return Err("sparse map segments overlap or are out of order".into());
        }
        end = s.logical.checked_add(s.len).ok_or("sparse map overflow")?;
        if end > size {
            return Err(format!(
                "sparse segment ends at {end}, past the file size {size}"
            ));
        }
    }
    Ok(())
}

fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn round_up(size: u64) -> Option<u64> {
    size.checked_add(padding(size))
}

fn truncate_at_nul(v: &mut Vec<u8>) {
    if let Some(i) = v.iter().position(|&b| b == 0) {
        v.truncate(i);
    }
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// Header checksum: the unsigned (or, for old tars, signed) byte sum with the checksum
/// field read as spaces.
fn verify_checksum(block: &[u8; 512]) -> std::result::Result<(), String> {
    let field = &block[148..156];
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| (b'0'..=b'7').contains(&b))
        .collect();
    let stored = std::str::from_utf8(&text)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 8).ok())
        .ok_or_else(|| "not a tar header (bad checksum field)".to_string())?;
    let mut unsigned = 0u32;
    let mut signed = 0i32;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u32::from(b);
        signed += i32::from(b as i8);
    }
    if stored == unsigned || i64::from(stored) == i64::from(signed) {
        Ok(())
    } else {
        Err(format!(
            "header checksum mismatch (stored {stored}, computed {unsigned})"
        ))
    }
}

/// Parses PAX records (`"<len> <key>=<value>\n"`). Records are length-prefixed, so a
/// value may contain newlines (the `tar` crate's iterator splits on them; GNU tar does not).
fn parse_pax(raw: &[u8]) -> std::result::Result<PaxRecords, String> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let bad = || "malformed PAX record".to_string();
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = &rest[space + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        out.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// PAX time: `[-]seconds[.fraction]`.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = int.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    if neg {
        if nanos == 0 {
            Some((-secs, 0))
        } else {
            Some((-secs - 1, 1_000_000_000 - nanos))
        }
    } else {
        Some((secs, nanos))
    }
}

fn parse_sparse_map_01(v: &[u8]) -> Option<Vec<(u64, u64)>> {
    if v.is_empty() {
        return Some(Vec::new());
    }
    let nums: Option<Vec<u64>> = v.split(|&b| b == b',').map(parse_u64).collect();
    let nums = nums?;
    if nums.len() % 2 != 0 {
        return None;
    }
    Some(nums.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}

fn percent_decode(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' && i + 2 < v.len() {
            let hex = std::str::from_utf8(&v[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(v[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn members(bytes: &[u8]) -> Result<Vec<Member>> {
        let mut r = MemberReader::new(ReadStream(bytes), Path::new("t.tar"));
        let mut out = Vec::new();
        while let Some(m) = r.next_member()? {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn reads_offsets_of_plain_members() {
        let bytes = build(&[("a.txt", b"hello"), ("dir/b", b"world!")]);
        let ms = members(&bytes).unwrap();
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[0].path, b"a.txt");
        assert_eq!(ms[0].data, Data::Contiguous(512));
        assert_eq!(&bytes[512..517], b"hello");
        assert_eq!(ms[1].data, Data::Contiguous(1536));
        assert_eq!(ms[1].size, 6);
        assert_eq!(ms[0].mode, 0o644);
    }

    #[test]
    fn long_names_via_gnu_and_pax() {
        let long = "d/".repeat(150) + "file";
        let bytes = build(&[(&long, b"x")]);
        let ms = members(&bytes).unwrap();
        assert_eq!(ms[0].path, long.as_bytes());
    }

    #[test]
    fn truncated_and_garbage_fail_cleanly() {
        let bytes = build(&[("a", &[7u8; 3000])]);
        for cut in [100, 600, 1500, 3000] {
            let r = members(&bytes[..cut]);
            assert!(r.is_err(), "cut at {cut} should fail");
        }
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        assert!(members(&garbage).is_err());
        assert!(members(&[]).unwrap().is_empty());
        assert!(members(&[0u8; 1024]).unwrap().is_empty());
    }

    #[test]
    fn pax_time_parsing() {
        assert_eq!(
            parse_pax_time(b"1700000000.123456789"),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(parse_pax_time(b"5.5"), Some((5, 500_000_000)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
    }

    #[test]
    fn pax_records_apply() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("path", b"pax/name".as_slice()),
            ("mtime", b"1.25".as_slice()),
            ("atime", b"7.000000003".as_slice()),
            ("ctime", b"-1.5".as_slice()),
            ("SCHILY.xattr.user.k", b"v".as_slice()),
            ("LIBARCHIVE.xattr.user.%41b", b"aGk=".as_slice()),
        ])
        .unwrap();
        let mut h = Header::new_ustar();
        h.set_size(0);
        h.set_mode(0o4755);
        b.append_data(&mut h, "short", &[][..]).unwrap();
        let ms = members(&b.into_inner().unwrap()).unwrap();
        assert_eq!(ms[0].path, b"pax/name");
        assert_eq!((ms[0].mtime, ms[0].mtime_nsec), (1, 250_000_000));
        assert_eq!(ms[0].atime, Some((7, 3)));
        assert_eq!(ms[0].ctime, Some((-2, 500_000_000)));
        assert_eq!(ms[0].mode, 0o4755);
        assert_eq!(ms[0].xattrs[0], (b"user.k".to_vec(), b"v".to_vec()));
        assert_eq!(ms[0].xattrs[1], (b"user.Ab".to_vec(), b"hi".to_vec()));
    }

    /// Found by the bounded fuzz pass: an xattr name with a NUL (or an empty one)
    /// was indexed, so `listxattr` showed names `getxattr` could not find; a name
    /// given twice was listed twice.
    #[test]
    fn fuzz_xattr_names_are_c_strings_and_unique() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("SCHILY.xattr.user.a\0b", b"nul".as_slice()),
            ("SCHILY.xattr.", b"empty".as_slice()),
            ("LIBARCHIVE.xattr.user.%00x", b"bnVs".as_slice()),
            ("SCHILY.xattr.user.k", b"first".as_slice()),
            ("SCHILY.xattr.user.k", b"last".as_slice()),
        ])
        .unwrap();
        let mut h = Header::new_ustar();
        h.set_size(0);
        b.append_data(&mut h, "f", &[][..]).unwrap();
        let ms = members(&b.into_inner().unwrap()).unwrap();
        assert_eq!(ms[0].xattrs, vec![(b"user.k".to_vec(), b"last".to_vec())]);
    }

    #[test]
    fn pax_values_may_contain_newlines() {
        let recs = parse_pax(b"18 comment=a\nb\nc\n\n10 path=x\n").unwrap();
        assert_eq!(recs[0], (b"comment".to_vec(), b"a\nb\nc\n".to_vec()));
        assert_eq!(recs[1], (b"path".to_vec(), b"x".to_vec()));
        assert!(parse_pax(b"99 path=x\n").is_err());
        assert!(parse_pax(b"5 path\n").is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"a%20b%"), b"a b%");
        assert_eq!(percent_decode(b"%4"), b"%4");
    }
}
