//! Checks an embedded index against the tar headers it describes. An index that rides
//! inside a snapshot is part of the archive, but it can still disagree with the tar
//! headers, so that a mount would show what GNU tar extraction of the same file does
//! not (the parser differential used to hide content from image scanners). Before a
//! regular file's bytes are first served, the member whose data the index points at
//! is parsed from the tar stream itself: it must be a regular file, of that size,
//! whose path names this very inode. A mismatch is an error naming archive and entry.
//!
//! Parsing starts where the previous file's data (in stream order) ends: the headers
//! between are those of this member and of data-less members (directories, links).

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::archive::tar::{Data, MemberKind, MemberReader, TarStream};
use crate::archive::StreamReader;
use crate::error::{Error, Result};
use crate::index::build::clean_path;
use crate::index::{Index, InodeRecord, FLAG_SPARSE, ROOT_INO};

/// Tar block size.
const BLOCK: u64 = 512;

/// The per-tree state of the check: which inodes passed, and where files' data lie.
pub struct HeaderCheck {
    /// One bit per inode: checked and found right.
    passed: Box<[AtomicU64]>,
    /// `(data start, data end)` of every regular file, sorted (built on first use).
    extents: OnceLock<Vec<(u64, u64)>>,
}

impl HeaderCheck {
    /// A check for a tree over `index`; nothing is read until a file is.
    pub fn new(index: &Index) -> Self {
        let words = index.inodes.len().div_ceil(64) + 1;
        HeaderCheck {
            passed: (0..words).map(|_| AtomicU64::new(0)).collect(),
            extents: OnceLock::new(),
        }
    }

    fn bit(&self, ino: u64) -> Option<(&AtomicU64, u64)> {
        let i = usize::try_from(ino).ok()?;
        Some((self.passed.get(i / 64)?, 1u64 << (i % 64)))
    }

    /// Ok once regular file `ino` (record `r`) is what the tar headers say it is.
    pub fn ensure(
        &self,
        index: &Index,
        stream: &StreamReader,
        ino: u64,
        r: &InodeRecord,
    ) -> Result<()> {
        let Some((word, mask)) = self.bit(ino) else {
            return Err(Error::Errno(libc::EIO));
        };
        if word.load(Ordering::Acquire) & mask != 0 {
            return Ok(());
        }
        if let Err(why) = self.check(index, stream, ino, r) {
            return Err(Error::archive(
                stream.name(),
                None,
                None,
                format!("the embedded index disagrees with the tar headers: {why}"),
            ));
        }
        word.fetch_or(mask, Ordering::AcqRel);
        Ok(())
    }

    fn extents(&self, index: &Index) -> &[(u64, u64)] {
        self.extents.get_or_init(|| {
            let mut v: Vec<(u64, u64)> = index
                .inodes
                .iter()
                .filter(|r| r.file_type() == libc::S_IFREG)
                .filter_map(|r| data_extent(index, r))
                .collect();
            v.sort_unstable();
            v
        })
    }

    fn check(
        &self,
        index: &Index,
        stream: &StreamReader,
        ino: u64,
        r: &InodeRecord,
    ) -> std::result::Result<(), String> {
        let (start, _) = data_extent(index, r).ok_or("its data lies outside the stream")?;
        let extents = self.extents(index);
        let before = extents.partition_point(|&(s, _)| s < start);
        let from = before
            .checked_sub(1)
            .and_then(|i| extents.get(i))
            .map_or(0, |&(_, end)| end.div_ceil(BLOCK).saturating_mul(BLOCK))
            .min(start);
        let slice = StreamSlice {
            stream,
            pos: from,
            end: index.stream_size,
        };
        let name = stream.name();
        let mut reader = MemberReader::starting_at(slice, name, from);
        loop {
            let m = match reader.next_member() {
                Ok(Some(m)) => m,
                Ok(None) => return Err(format!("no member has data at offset {start}")),
                Err(e) => return Err(format!("parsing from offset {from}: {e}")),
            };
            if m.header_offset >= start {
                return Err(format!("no member header precedes offset {start}"));
            }
            let here = match &m.data {
                Data::Contiguous(off) => *off == start && r.flags & FLAG_SPARSE == 0,
                Data::Sparse(segs) => {
                    r.flags & FLAG_SPARSE != 0
                        && segs.first().map(|s| s.stream) == Some(start)
                        && segs.as_slice() == index.file_segments(r)
                }
            };
            if !here {
                continue;
            }
            let path = String::from_utf8_lossy(&m.path).into_owned();
            if m.kind != MemberKind::File {
                return Err(format!(
                    "the member at offset {start} ({path:?}) is not a file"
                ));
            }
            if m.size != r.size {
                return Err(format!(
                    "the member {path:?} has {} bytes, the index says {}",
                    m.size, r.size
                ));
            }
            return match resolve(index, &m.path) {
                Some(found) if found == ino => Ok(()),
                _ => Err(format!(
                    "the data at offset {start} belongs to {path:?}, which the index does \
                     not show at this file"
                )),
            };
        }
    }
}

/// The stream range a regular file's data occupies, `None` if it is not within it.
fn data_extent(index: &Index, r: &InodeRecord) -> Option<(u64, u64)> {
    if r.flags & FLAG_SPARSE == 0 {
        let end = r.data.checked_add(r.size)?;
        return (end <= index.stream_size).then_some((r.data, end));
    }
    let segs = index.file_segments(r);
    let first = segs.first()?;
    let last = segs.last()?;
    Some((first.stream, last.stream.checked_add(last.len)?))
}

/// The inode a member path names in `index` (cleaned as the indexing pass does).
fn resolve(index: &Index, raw: &[u8]) -> Option<u64> {
    let mut ino = ROOT_INO;
    for comp in clean_path(raw).ok()? {
        let dir = index.inode(ino)?;
        let kids = index.children(dir);
        let i = kids
            .binary_search_by(|d| index.dirent_name(d).cmp(comp))
            .ok()?;
        ino = u64::from(kids.get(i)?.ino);
    }
    Some(ino)
}

/// The tar stream from `pos`, read through the tree's stream reader.
struct StreamSlice<'a> {
    stream: &'a StreamReader,
    pos: u64,
    end: u64,
}

impl Read for StreamSlice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        if n == 0 {
            return Ok(0);
        }
        self.stream
            .read_exact_at(&mut buf[..n], self.pos)
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl TarStream for StreamSlice<'_> {
    fn skip(&mut self, n: u64) -> io::Result<()> {
        match self.pos.checked_add(n).filter(|&p| p <= self.end) {
            Some(p) => {
                self.pos = p;
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stream ends inside member data",
            )),
        }
    }
}
