//! The on-disk layout of an upper directory: its format, the control xattrs, the byte
//! ranges of partial files and their range records, and the change list that
//! `snapfs commit` reads ([`changes`]).
//!
//! # Layout of the upper directory `DIR`
//!
//! ```text
//! DIR/format      "snapfs-upper 2"; locked (flock) by the daemon serving DIR
//! DIR/work/       scratch: entries are built here, then renamed into tree/
//! DIR/tree/       the changed paths of the view, at their view paths
//! DIR/ranges/     the range records of partial files: ID.log and ID.snap
//! ```
//!
//! Every entry of `tree/` carries the view's type, mode, owner, atime, mtime and
//! (devices) rdev; its ctime is the view's ctime unless `user.snapfs.ctime` says
//! otherwise. Control data lives in `user.snapfs.*` extended attributes, which users
//! of the view can neither see nor set:
//!
//! - **whiteout**: an empty regular file with `user.snapfs.whiteout`: the path is
//!   deleted in the view.
//! - **directory**: merges with the lower directory at the same path, unless it has
//!   `user.snapfs.opaque` (lower hidden) or `user.snapfs.origin=<lower path>` (a
//!   renamed directory: merges with that lower directory instead).
//! - **regular file**: its content is whole, unless it has
//!   `user.snapfs.origin=<lower path>`: then it is a *partial* file whose size is the
//!   view's size; the byte ranges present in the (sparse) upper file are listed by
//!   its range record (below), every other byte comes from the lower file at
//!   `origin`. No record means a metadata-only copy-up (chmod, chown, touch,
//!   setxattr).
//! - **symlink, device, fifo, socket**: whole (copy-up recreates them).
//! - **xattrs of the view**: `user.snapfs.x.<name>` on the upper entry, authoritative
//!   when `user.snapfs.xattrs` is present; otherwise the view shows the lower entry's
//!   xattrs (the origin, or the lower entry at the same path). Symlinks and special
//!   files cannot carry user xattrs on ext4, so their view xattrs cannot change.
//! - **ctime**: `user.snapfs.ctime=SECS.NNNNNNNNN` on a directory or regular file
//!   holds the view's ctime while it differs from the upper entry's own: a copy-up
//!   keeps the lower ctime, and the copy-up of an entry into a directory does not
//!   change the directory in the view. The next change through the view removes it.
//! - **hard links** are real hard links in `tree/` (the xattrs travel with the inode).
//!   Changing a lower file that has several names copies it up once and links every
//!   name of it in the view.
//!
//! Paths in `origin` are relative to the root of the lower tree, without a leading
//! `/`. Parent directories in `tree/` exist for every entry (copied up with the
//! lower directory's metadata).
//!
//! # Range records
//!
//! A partial file's first data change gives it `user.snapfs.rlog=ID` (16 lowercase
//! hex digits; the xattr travels with the file when the upper directory is copied
//! with its xattrs). Its ranges are `ranges/ID.snap` (if present) with the records of
//! `ranges/ID.log` replayed over it in order, clipped at the file's size. All
//! integers are little-endian.
//!
//! ```text
//! ID.snap  "SNAPFSRS" | version u32 (1) | count u32 | count x (start u64, end u64)
//!          | crc32 u32 of all before          sorted, disjoint, half-open ranges
//! ID.log   24-byte records: kind u8 | 3 zero bytes | crc32 u32 of the other 20
//!          bytes | a u64 | b u64              kind 1: bytes [a, b) present;
//!                                             kind 2: nothing present from a on
//! ```
//!
//! A write (or truncate, fallocate) that adds bytes to the record appends one record
//! with a single `write(2)` before it is answered, so a killed daemon never loses an
//! acknowledged change; a write inside bytes already present appends nothing. A log
//! that ends in a short or damaged record ends there (that change was never
//! answered). When the file is closed or fsynced, and when the log has grown long,
//! the log is compacted: `ID.snap.tmp` is written and fsynced, renamed over
//! `ID.snap`, the directory fsynced, and the log truncated. Replaying a record twice
//! changes nothing, so a crash between the rename and the truncation is harmless.
//! fsync of the file also makes its record durable. A record that cannot be saved
//! (disk full) fails the call whose change it describes, and nothing the record
//! already held is lost; a compaction that fails leaves the log in charge and is
//! retried. When the ranges cover the whole file it becomes whole: `origin` goes
//! first, then `rlog`, then the record files.
//!
//! Format 1 (`snapfs-upper 1`) kept the ranges in one `user.snapfs.ranges` xattr
//! (`start-end,...`), which failed with ENOSPC past a few hundred ranges. Such a
//! directory still opens: its format file is rewritten to 2, the xattr is read where
//! there is no record, and the first change of such a file moves its ranges into a
//! record. snapfs versions that only know format 1 refuse a format 2 directory.
//!
//! Durability: every change is a completed syscall in `DIR` before the reply, so it
//! survives a killed daemon. fsync syncs the upper file, its range record and its
//! directory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::sys::{self, classify, ioerr, shown, Obj, UpperEntry};
use crate::error::{Error, Result};

/// Prefix of the control xattrs (refused to users of the view).
pub const CONTROL_PREFIX: &[u8] = b"user.snapfs.";
/// Marks a whiteout.
pub const X_WHITEOUT: &[u8] = b"user.snapfs.whiteout";
/// Marks an opaque directory.
pub const X_OPAQUE: &[u8] = b"user.snapfs.opaque";
/// Lower path a partial file or renamed directory comes from.
pub const X_ORIGIN: &[u8] = b"user.snapfs.origin";
/// Format 1: the ranges present in a partial file (read, never written).
pub const X_RANGES: &[u8] = b"user.snapfs.ranges";
/// The id of a partial file's range record.
pub const X_RLOG: &[u8] = b"user.snapfs.rlog";
/// The view's ctime of an entry, where it differs from the upper entry's.
pub const X_CTIME: &[u8] = b"user.snapfs.ctime";
/// The `user.snapfs.x.*` set is the view's xattrs.
pub const X_OWN: &[u8] = b"user.snapfs.xattrs";
/// Prefix of the view's own xattrs.
pub const X_VIEW: &[u8] = b"user.snapfs.x.";
/// POSIX ACL xattrs: kept as real ACLs on the upper entry.
pub(super) const ACL_PREFIX: &[u8] = b"system.posix_acl_";
/// The format file's content.
pub(super) const FORMAT: &[u8] = b"snapfs-upper 2\n";
/// The format file's content in format 1 (upgraded on open).
pub(super) const FORMAT_1: &[u8] = b"snapfs-upper 1\n";
/// Names inside `DIR`.
pub(super) const FORMAT_FILE: &[u8] = b"format";
pub(super) const WORK: &[u8] = b"work";
pub(super) const TREE: &[u8] = b"tree";
pub(super) const RANGES: &[u8] = b"ranges";

pub(super) fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = dir.to_vec();
    if !v.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

/// `SECS.NNNNNNNNN` (the value of `user.snapfs.ctime`).
pub(super) fn encode_time((s, ns): (i64, u32)) -> Vec<u8> {
    format!("{s}.{ns:09}").into_bytes()
}

/// Parses [`encode_time`]'s form; `None` for anything else.
pub(super) fn decode_time(b: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(b).ok()?;
    let (a, f) = s.split_once('.')?;
    if f.len() != 9 || !f.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((a.parse().ok()?, f.parse().ok()?))
}

// ---------------------------------------------------------------- ranges

/// Sorted, disjoint, non-touching half-open byte ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(pub Vec<(u64, u64)>);

impl Ranges {
    /// Parses the format 1 `user.snapfs.ranges` encoding (`"0-4096,8192-9000"`, or
    /// empty).
    pub fn decode(b: &[u8]) -> Option<Ranges> {
        let s = std::str::from_utf8(b).ok()?;
        let mut r = Ranges::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-')?;
            let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
            if a > b {
                return None;
            }
            r.insert(a, b);
        }
        Some(r)
    }

    /// The format 1 encoding (see [`Ranges::decode`]).
    pub fn encode(&self) -> Vec<u8> {
        let v: Vec<String> = self.0.iter().map(|(a, b)| format!("{a}-{b}")).collect();
        v.join(",").into_bytes()
    }

    /// Adds `[a, b)`, merging with the ranges it overlaps or touches.
    pub fn insert(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        // Ranges before `lo` end before `a`; from `hi` on they start after `b`.
        let lo = self.0.partition_point(|&(_, y)| y < a);
        let hi = self.0.partition_point(|&(x, _)| x <= b);
        let (mut a, mut b) = (a, b);
        if lo < hi {
            a = a.min(self.0[lo].0);
            b = b.max(self.0[hi - 1].1);
        }
        self.0.splice(lo..hi, [(a, b)]);
    }

    /// Drops everything at or past `len`.
    pub fn truncate(&mut self, len: u64) {
        let keep = self.0.partition_point(|&(a, _)| a < len);
        self.0.truncate(keep);
        if let Some(last) = self.0.last_mut() {
            last.1 = last.1.min(len);
        }
    }

    /// Whether `[0, len)` is covered.
    pub fn covers(&self, len: u64) -> bool {
        len == 0 || matches!(self.0.first(), Some(&(0, b)) if b >= len)
    }

    /// Whether `[a, b)` is covered.
    pub fn contains(&self, a: u64, b: u64) -> bool {
        if a >= b {
            return true;
        }
        let i = self.0.partition_point(|&(_, y)| y <= a);
        matches!(self.0.get(i), Some(&(x, y)) if x <= a && b <= y)
    }

    /// From `pos` (before `end`): whether it is present, and where that run ends.
    pub(super) fn segment(&self, pos: u64, end: u64) -> (bool, u64) {
        let i = self.0.partition_point(|&(_, y)| y <= pos);
        match self.0.get(i) {
            Some(&(a, b)) if a <= pos => (true, b.min(end)),
            Some(&(a, _)) => (false, a.min(end)),
            None => (false, end),
        }
    }

    /// Applies one record.
    pub(super) fn apply(&mut self, r: Record) {
        match r {
            Record::Add(a, b) => self.insert(a, b),
            Record::Cut(a) => self.truncate(a),
        }
    }
}

// ---------------------------------------------------------------- records

/// One entry of a range log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Record {
    /// Bytes `[a, b)` are present.
    Add(u64, u64),
    /// Nothing is present from `a` on (a truncation).
    Cut(u64),
}

const RECORD: usize = 24;
const SNAP_MAGIC: &[u8; 8] = b"SNAPFSRS";
const SNAP_VERSION: u32 = 1;

impl Record {
    pub(super) fn encode(self) -> [u8; RECORD] {
        let (kind, a, b) = match self {
            Record::Add(a, b) => (1u8, a, b),
            Record::Cut(a) => (2u8, a, 0),
        };
        let mut out = [0u8; RECORD];
        out[0] = kind;
        out[8..16].copy_from_slice(&a.to_le_bytes());
        out[16..24].copy_from_slice(&b.to_le_bytes());
        let crc = record_crc(&out);
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(b: &[u8]) -> Option<Record> {
        let crc = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?);
        if b.len() != RECORD || b[1..4] != [0, 0, 0] || record_crc(b) != crc {
            return None;
        }
        let a = u64::from_le_bytes(b[8..16].try_into().ok()?);
        let z = u64::from_le_bytes(b[16..24].try_into().ok()?);
        match b[0] {
            1 if a <= z => Some(Record::Add(a, z)),
            2 if z == 0 => Some(Record::Cut(a)),
            _ => None,
        }
    }
}

fn record_crc(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[0..4]);
    h.update(&b[8..RECORD]);
    h.finalize()
}

/// The records of a log, and whether it ended cleanly (no short or damaged record).
pub(super) fn decode_log(b: &[u8]) -> (Vec<Record>, bool) {
    let mut out = Vec::with_capacity(b.len() / RECORD);
    for chunk in b.chunks(RECORD) {
        match Record::decode(chunk) {
            Some(r) => out.push(r),
            None => return (out, false),
        }
    }
    (out, true)
}

/// The `ID.snap` encoding of `r`.
pub(super) fn encode_snapshot(r: &Ranges) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + r.0.len() * 16 + 4);
    out.extend_from_slice(SNAP_MAGIC);
    out.extend_from_slice(&SNAP_VERSION.to_le_bytes());
    let n = u32::try_from(r.0.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_le_bytes());
    for &(a, b) in r.0.iter().take(n as usize) {
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&b.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Parses an `ID.snap` file (untrusted bytes): `None` unless it is exactly one valid
/// snapshot.
pub(super) fn decode_snapshot(b: &[u8]) -> Option<Ranges> {
    if b.len() < 20 || &b[..8] != SNAP_MAGIC {
        return None;
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let version = u32::from_le_bytes(body[8..12].try_into().ok()?);
    let n = u32::from_le_bytes(body[12..16].try_into().ok()?);
    let pairs = &body[16..];
    if version != SNAP_VERSION || pairs.len() != (n as usize).checked_mul(16)? {
        return None;
    }
    let mut r = Ranges::default();
    for p in pairs.chunks_exact(16) {
        let a = u64::from_le_bytes(p[..8].try_into().ok()?);
        let z = u64::from_le_bytes(p[8..].try_into().ok()?);
        if a > z {
            return None;
        }
        r.insert(a, z);
    }
    Some(r)
}

/// The ranges a snapshot and a log describe, clipped at `size`.
pub(super) fn replay(snapshot: Option<Ranges>, log: &[Record], size: u64) -> Ranges {
    let mut r = snapshot.unwrap_or_default();
    for rec in log {
        r.apply(*rec);
    }
    r.truncate(size);
    r
}

// ---------------------------------------------------------------- the record store

/// `DIR/ranges/`: where range records live.
pub(super) struct RangeStore {
    fd: OwnedFd,
    path: PathBuf,
}

/// The appendable log of one partial file.
pub(super) struct RangeLog {
    pub(super) id: u64,
    file: File,
    /// Records appended since the last compaction.
    pub(super) pending: u64,
}

/// Records after which a log is compacted while its file is still open.
const COMPACT_AFTER: u64 = 4096;

fn log_name(id: u64) -> Vec<u8> {
    format!("{id:016x}.log").into_bytes()
}

fn snap_name(id: u64) -> Vec<u8> {
    format!("{id:016x}.snap").into_bytes()
}

fn parse_id(b: &[u8]) -> Option<u64> {
    if b.len() != 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok()
}

impl RangeStore {
    /// Opens `DIR/ranges` (creating it if `create`); `None` if absent and not created.
    pub(super) fn open(dir: BorrowedFd<'_>, dir_path: &Path, create: bool) -> Result<Option<Self>> {
        let path = shown(dir_path, RANGES);
        if create {
            match sys::mkdir_at(dir, RANGES, 0o700) {
                Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                    return Err(Error::io("cannot create", &path, e))
                }
                _ => {}
            }
        }
        match sys::open_dir(dir, RANGES) {
            Ok(fd) => Ok(Some(RangeStore { fd, path })),
            Err(e) if !create && e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(Error::io("cannot open", &path, e)),
        }
    }

    fn shown(&self, name: &[u8]) -> PathBuf {
        shown(&self.path, name)
    }

    fn read(&self, name: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut f = match sys::open_read(self.fd.as_fd(), name) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(Error::io("cannot open", self.shown(name), e)),
        };
        let mut v = Vec::new();
        f.read_to_end(&mut v)
            .map_err(ioerr("cannot read", &self.shown(name)))?;
        Ok(Some(v))
    }

    /// The ranges of record `id` for a file of `size` bytes, and the number of log
    /// records (a measure of how much a compaction would save).
    pub(super) fn load(&self, id: u64, size: u64) -> Result<(Ranges, u64)> {
        let snap = match self.read(&snap_name(id))? {
            Some(b) => Some(decode_snapshot(&b).ok_or_else(|| {
                Error::io(
                    "damaged range snapshot",
                    self.shown(&snap_name(id)),
                    io::Error::from_raw_os_error(libc::EIO),
                )
            })?),
            None => None,
        };
        let log = self.read(&log_name(id))?;
        if snap.is_none() && log.is_none() {
            log::error!(
                "{}: missing (the file's unwritten bytes and those it recorded read from the lower file)",
                self.shown(&log_name(id)).display()
            );
        }
        let (records, clean) = decode_log(log.as_deref().unwrap_or_default());
        if !clean {
            log::warn!(
                "{}: ends in a short or damaged record after {} records; ignoring the rest (a change that was never acknowledged)",
                self.shown(&log_name(id)).display(),
                records.len()
            );
        }
        Ok((replay(snap, &records, size), records.len() as u64))
    }

    /// A new, empty log for the upper file `f` (shown as `what`), holding `initial`
    /// (format 1 ranges) as its snapshot; `f` gets its id.
    pub(super) fn create(&self, f: &File, what: &Path, initial: &Ranges) -> Result<RangeLog> {
        let mut id = seed();
        let file = loop {
            match sys::open_append(self.fd.as_fd(), &log_name(id), true) {
                Ok(file) => break file,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => id = id.wrapping_add(1),
                Err(e) => return Err(Error::io("cannot create", self.shown(&log_name(id)), e)),
            }
        };
        let mut log = RangeLog {
            id,
            file,
            pending: 0,
        };
        let done = (|| {
            if !initial.0.is_empty() {
                log.compact(self, initial)?;
            }
            Obj::File(f)
                .set(X_RLOG, format!("{id:016x}").as_bytes(), 0)
                .map_err(ioerr("cannot record ranges of", what))
        })();
        if let Err(e) = done {
            self.remove(id);
            return Err(e);
        }
        Ok(log)
    }

    /// The log of record `id`, for appending (created again if it went missing).
    pub(super) fn open_log(&self, id: u64, pending: u64) -> Result<RangeLog> {
        let name = log_name(id);
        let file = match sys::open_append(self.fd.as_fd(), &name, false) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                sys::open_append(self.fd.as_fd(), &name, true)
            }
            r => r,
        }
        .map_err(ioerr("cannot open", &self.shown(&name)))?;
        Ok(RangeLog { id, file, pending })
    }

    /// Deletes the files of record `id` (best effort: a leftover is only garbage).
    pub(super) fn remove(&self, id: u64) {
        for name in [log_name(id), snap_name(id)] {
            if let Err(e) = sys::unlink_at(self.fd.as_fd(), &name, false) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    log::warn!("cannot remove {}: {e}", self.shown(&name).display());
                }
            }
        }
    }

    fn sync(&self) -> Result<()> {
        sys::sync_dir(self.fd.as_fd()).map_err(ioerr("cannot sync", &self.path))
    }
}

/// A starting point for new record ids (unique among the files of `ranges/`, which
/// `O_EXCL` guarantees).
fn seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 40) ^ NEXT.fetch_add(1 << 20, Ordering::Relaxed)
}

impl RangeLog {
    /// Appends one record with a single `write(2)`.
    pub(super) fn append(&mut self, store: &RangeStore, r: Record) -> Result<()> {
        let b = r.encode();
        match self.file.write(&b) {
            Ok(n) if n == b.len() => {
                self.pending += 1;
                Ok(())
            }
            Ok(_) => {
                // A short write leaves a damaged record at the end: cut it off, so the
                // next record is not lost behind it.
                let what = store.shown(&log_name(self.id));
                if let Ok(m) = self.file.metadata() {
                    let whole = m.len() - m.len() % RECORD as u64;
                    let _ = self.file.set_len(whole);
                }
                Err(Error::io(
                    "cannot record ranges in",
                    what,
                    io::Error::from_raw_os_error(libc::ENOSPC),
                ))
            }
            Err(e) => Err(Error::io(
                "cannot record ranges in",
                store.shown(&log_name(self.id)),
                e,
            )),
        }
    }

    /// Whether the log is long enough to compact while the file is open.
    pub(super) fn long(&self, ranges: &Ranges) -> bool {
        self.pending >= COMPACT_AFTER.max(2 * ranges.0.len() as u64)
    }

    /// Replaces the snapshot by `ranges` (tmp + fsync + rename + directory fsync) and
    /// empties the log.
    pub(super) fn compact(&mut self, store: &RangeStore, ranges: &Ranges) -> Result<()> {
        let snap = snap_name(self.id);
        let mut tmp = snap.clone();
        tmp.extend_from_slice(b".tmp");
        let shown_tmp = store.shown(&tmp);
        let _ = sys::unlink_at(store.fd.as_fd(), &tmp, false);
        let f = sys::create_file(store.fd.as_fd(), &tmp, 0o600)
            .map_err(ioerr("cannot create", &shown_tmp))?;
        f.write_all_at(&encode_snapshot(ranges), 0)
            .and_then(|()| f.sync_all())
            .map_err(ioerr("cannot write", &shown_tmp))?;
        sys::rename_at(store.fd.as_fd(), &tmp, store.fd.as_fd(), &snap, 0)
            .map_err(ioerr("cannot rename to", &store.shown(&snap)))?;
        store.sync()?;
        self.file
            .set_len(0)
            .map_err(ioerr("cannot truncate", &store.shown(&log_name(self.id))))?;
        self.pending = 0;
        Ok(())
    }

    /// Makes the log durable.
    pub(super) fn sync(&self, store: &RangeStore) -> Result<()> {
        self.file
            .sync_data()
            .map_err(ioerr("cannot sync", &store.shown(&log_name(self.id))))?;
        store.sync()
    }
}

/// The ranges of partial upper file `f` (of `size` bytes): from its range record, or
/// from a format 1 xattr. Also the record id and its log length.
pub(super) fn file_ranges(
    store: Option<&RangeStore>,
    f: Obj<'_>,
    size: u64,
    what: &Path,
) -> Result<(Ranges, Option<(u64, u64)>)> {
    let xa = |n: &[u8]| f.get(n).map_err(ioerr("cannot read xattr of", what));
    if let Some(v) = xa(X_RLOG)? {
        let id = parse_id(&v).ok_or_else(|| {
            Error::io(
                "bad range record id on",
                what,
                io::Error::from_raw_os_error(libc::EIO),
            )
        })?;
        let Some(store) = store else {
            log::error!(
                "{}: its range record {id:016x} has no ranges directory",
                what.display()
            );
            return Ok((Ranges::default(), Some((id, 0))));
        };
        let (r, records) = store.load(id, size)?;
        return Ok((r, Some((id, records))));
    }
    let mut r = match xa(X_RANGES)? {
        Some(v) => Ranges::decode(&v).unwrap_or_default(),
        None => Ranges::default(),
    };
    r.truncate(size);
    Ok((r, None))
}

// ---------------------------------------------------------------- changes

/// One changed path of the view, as an upper directory records it (for `snapfs
/// commit`). Parents come before their children; names are sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Path in the view: relative, `/`-separated, no leading `/`.
    pub path: Vec<u8>,
    /// The entry in `DIR/tree/`, for messages (read the view, not this path: it may
    /// be longer than `PATH_MAX`).
    pub upper: PathBuf,
    /// What changed.
    pub kind: ChangeKind,
    /// The view's xattrs when the upper entry owns them; `None` means those of the
    /// lower entry (the origin, or the lower entry at `path`; none for a new entry).
    pub xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// The kind of a [`Change`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// The path is deleted (an OCI whiteout `.wh.NAME`).
    Deleted,
    /// A directory with the upper entry's metadata. `opaque`: nothing of the lower
    /// directory at this path shows (OCI `.wh..wh..opq`). `origin`: a renamed
    /// directory whose lower entries come from this lower path (an OCI writer
    /// emits them under `path`, and the directory is opaque there). Neither: merges
    /// with the lower directory at `path`.
    Dir {
        /// Lower directory at `path` hidden.
        opaque: bool,
        /// Lower directory merged instead (renames).
        origin: Option<Vec<u8>>,
    },
    /// A regular file whose whole content is the upper file.
    File,
    /// A regular file of the upper file's size: bytes in `ranges` come from the upper
    /// file, all others from the lower file at `origin`. Empty `ranges`: only
    /// metadata changed.
    Partial {
        /// Lower file path.
        origin: Vec<u8>,
        /// Ranges present in the upper file.
        ranges: Ranges,
    },
    /// A symlink, device, fifo or socket, whole.
    Other,
}

/// Lists the changes recorded in upper directory `upper_dir` (see the module doc).
/// The walk goes through directory descriptors, never following a symlink.
pub fn changes(upper_dir: &Path) -> Result<Vec<Change>> {
    let dir = sys::open_dir_path(upper_dir).map_err(ioerr("cannot open", upper_dir))?;
    let root = shown(upper_dir, TREE);
    let mut out = Vec::new();
    let tree = match sys::open_dir(dir.as_fd(), TREE) {
        Ok(fd) => Arc::new(fd),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
        Err(e) => return Err(Error::io("cannot open", &root, e)),
    };
    let store = RangeStore::open(dir.as_fd(), upper_dir, false)?;
    // (view path, descriptor) of directories still to list, depth first.
    let mut stack: Vec<(Vec<u8>, Arc<OwnedFd>)> = vec![(Vec::new(), tree)];
    while let Some((rel, fd)) = stack.pop() {
        let here = shown(&root, &rel);
        let mut names = sys::list_dir(fd.as_fd()).map_err(ioerr("cannot list", &here))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = join(&rel, &name);
            let upper = shown(&root, &path);
            let entry = classify(fd.as_fd(), &name).map_err(ioerr("cannot open", &upper))?;
            let (kind, owns, efd) = match entry {
                UpperEntry::Absent => continue,
                UpperEntry::Whiteout => (ChangeKind::Deleted, false, None),
                UpperEntry::Present(s, efd) => {
                    let x = Obj::Path(efd.as_fd());
                    let xa = |n: &[u8]| x.get(n).map_err(ioerr("cannot read xattr of", &upper));
                    if s.is_dir() {
                        let kind = ChangeKind::Dir {
                            opaque: xa(X_OPAQUE)?.is_some(),
                            origin: xa(X_ORIGIN)?,
                        };
                        (kind, true, Some(efd))
                    } else if s.is_file() {
                        let kind = match xa(X_ORIGIN)? {
                            Some(origin) => {
                                let (ranges, _) = file_ranges(store.as_ref(), x, s.size(), &upper)?;
                                ChangeKind::Partial { origin, ranges }
                            }
                            None => ChangeKind::File,
                        };
                        (kind, true, Some(efd))
                    } else {
                        (ChangeKind::Other, false, None)
                    }
                }
            };
            let xattrs = match &efd {
                Some(efd) if owns => {
                    let x = Obj::Path(efd.as_fd());
                    let xa = |n: &[u8]| x.get(n).map_err(ioerr("cannot read xattr of", &upper));
                    if xa(X_OWN)?.is_some() {
                        let mut v = Vec::new();
                        for n in x.list().map_err(ioerr("cannot list xattrs of", &upper))? {
                            if let Some(name) = n.strip_prefix(X_VIEW) {
                                v.push((name.to_vec(), xa(&n)?.unwrap_or_default()));
                            }
                        }
                        Some(v)
                    } else {
                        None
                    }
                }
                _ => None,
            };
            if let (ChangeKind::Dir { .. }, Some(efd)) = (&kind, efd) {
                subdirs.push((path.clone(), Arc::new(efd)));
            }
            out.push(Change {
                path,
                upper,
                kind,
                xattrs,
            });
        }
        // Depth first, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_truncate_and_cover() {
        let mut r = Ranges::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 25); // touches: merges
        assert_eq!(r.0, vec![(10, 25), (30, 40)]);
        r.insert(5, 35);
        assert_eq!(r.0, vec![(5, 40)]);
        r.insert(7, 7);
        assert_eq!(r.0, vec![(5, 40)]);
        r.insert(0, 5);
        assert!(r.covers(40) && !r.covers(41));
        r.truncate(12);
        assert_eq!(r.0, vec![(0, 12)]);
        assert!(Ranges::default().covers(0));
        r.insert(100, 110);
        r.insert(50, 60);
        assert_eq!(r.0, vec![(0, 12), (50, 60), (100, 110)]);
        r.insert(60, 100);
        assert_eq!(r.0, vec![(0, 12), (50, 110)]);
    }

    #[test]
    fn ranges_contain_and_segment() {
        let r = Ranges(vec![(10, 20), (30, 40)]);
        assert!(r.contains(10, 20) && r.contains(12, 13) && r.contains(5, 5));
        assert!(!r.contains(9, 11) && !r.contains(15, 31) && !r.contains(40, 41));
        assert_eq!(r.segment(0, 100), (false, 10));
        assert_eq!(r.segment(10, 15), (true, 15));
        assert_eq!(r.segment(20, 100), (false, 30));
        assert_eq!(r.segment(35, 100), (true, 40));
        assert_eq!(r.segment(40, 100), (false, 100));
    }

    /// Ranges inserted in any order equal a byte map of the same inserts.
    #[test]
    fn ranges_agree_with_a_byte_map() {
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..200 {
            let mut r = Ranges::default();
            let mut map = [false; 300];
            for _ in 0..30 {
                if next(5) == 0 {
                    let l = next(300);
                    r.truncate(l);
                    map[l as usize..].fill(false);
                } else {
                    let a = next(300);
                    let b = (a + next(40)).min(300);
                    r.insert(a, b);
                    map[a as usize..b as usize].fill(true);
                }
                let mut want = Vec::new();
                let mut i = 0;
                while i < 300 {
                    if map[i] {
                        let s = i;
                        while i < 300 && map[i] {
                            i += 1;
                        }
                        want.push((s as u64, i as u64));
                    }
                    i += 1;
                }
                assert_eq!(r.0, want);
            }
        }
    }

    #[test]
    fn format_1_xattr_encoding_round_trips() {
        let r = Ranges(vec![(0, 4096), (8192, 9000)]);
        assert_eq!(r.encode(), b"0-4096,8192-9000");
        assert_eq!(Ranges::decode(&r.encode()), Some(r));
        assert_eq!(Ranges::decode(b""), Some(Ranges::default()));
        assert_eq!(Ranges::decode(b"5-1"), None);
        assert_eq!(Ranges::decode(b"x"), None);
    }

    #[test]
    fn records_round_trip_and_damage_ends_the_log() {
        let recs = [Record::Add(0, 5), Record::Cut(3), Record::Add(100, 1 << 40)];
        let mut log: Vec<u8> = recs.iter().flat_map(|r| r.encode()).collect();
        assert_eq!(decode_log(&log), (recs.to_vec(), true));
        // A torn last record (the write that was never answered) is dropped.
        log.extend_from_slice(&Record::Add(7, 8).encode()[..10]);
        assert_eq!(decode_log(&log), (recs.to_vec(), false));
        // A flipped bit ends the log there.
        log[24 + 9] ^= 1;
        assert_eq!(decode_log(&log), (recs[..1].to_vec(), false));
        assert_eq!(decode_log(&[]), (Vec::new(), true));
        // Kinds and fields that cannot be valid.
        assert_eq!(Record::decode(&[0u8; 24]), None);
    }

    #[test]
    fn snapshots_round_trip_and_reject_damage() {
        let r = Ranges(vec![(0, 1), (5, 9), (1 << 50, u64::MAX)]);
        let b = encode_snapshot(&r);
        assert_eq!(decode_snapshot(&b), Some(r.clone()));
        assert_eq!(
            decode_snapshot(&encode_snapshot(&Ranges::default())),
            Some(Ranges::default())
        );
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x10;
            assert_eq!(decode_snapshot(&d), None, "byte {i}");
        }
        assert_eq!(decode_snapshot(&b[..b.len() - 1]), None);
        // A count that claims more than the file holds.
        let mut big = b[..16].to_vec();
        big[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32fast::hash(&big);
        big.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_snapshot(&big), None);
    }

    /// Compaction writes the state as a snapshot and empties the log; replaying the
    /// log again over that snapshot (a crash between the rename and the truncation)
    /// gives the same state.
    #[test]
    fn replay_over_a_compacted_snapshot_is_idempotent() {
        let log = [
            Record::Add(0, 10),
            Record::Add(50, 60),
            Record::Cut(55),
            Record::Add(100, 120),
            Record::Cut(0),
            Record::Add(5, 6),
            Record::Add(200, 300),
        ];
        for split in 0..=log.len() {
            let before = replay(None, &log[..split], u64::MAX);
            let state = replay(Some(before.clone()), &log[split..], u64::MAX);
            assert_eq!(state, replay(None, &log, u64::MAX));
            let again = replay(Some(state.clone()), &log[split..], u64::MAX);
            assert_eq!(again, state, "split {split}");
            let snap = decode_snapshot(&encode_snapshot(&state));
            assert_eq!(replay(snap, &log, u64::MAX), state);
        }
        assert_eq!(replay(None, &log, 250).0, vec![(5, 6), (200, 250)]);
    }

    #[test]
    fn a_record_store_survives_compaction_and_reopening() {
        let d = tempfile::tempdir().unwrap();
        let dfd = sys::open_dir_path(d.path()).unwrap();
        let store = RangeStore::open(dfd.as_fd(), d.path(), true)
            .unwrap()
            .unwrap();
        let data = tempfile::tempfile().unwrap();
        let what = d.path().join("f");
        let mut log = store.create(&data, &what, &Ranges(vec![(0, 3)])).unwrap();
        let id = log.id;
        assert_eq!(
            Obj::File(&data).get(X_RLOG).unwrap().unwrap(),
            format!("{id:016x}").into_bytes()
        );
        let mut want = Ranges(vec![(0, 3)]);
        for i in 0..1000u64 {
            let r = Record::Add(i * 10, i * 10 + 1);
            log.append(&store, r).unwrap();
            want.apply(r);
        }
        assert_eq!(store.load(id, u64::MAX).unwrap(), (want.clone(), 1000));
        log.compact(&store, &want).unwrap();
        assert_eq!(store.load(id, u64::MAX).unwrap(), (want.clone(), 0));
        log.append(&store, Record::Cut(5000)).unwrap();
        want.truncate(5000);
        drop(log);
        let (got, n) = store.load(id, u64::MAX).unwrap();
        assert_eq!((got.clone(), n), (want.clone(), 1));
        let (r, rec) = file_ranges(Some(&store), Obj::File(&data), 4000, &what).unwrap();
        let mut clipped = want.clone();
        clipped.truncate(4000);
        assert_eq!((r, rec), (clipped, Some((id, 1))));
        let mut log = store.open_log(id, 1).unwrap();
        log.append(&store, Record::Add(9000, 9001)).unwrap();
        log.sync(&store).unwrap();
        store.remove(id);
        assert!(sys::list_dir(store.fd.as_fd()).unwrap().is_empty());
    }

    #[test]
    fn format_1_ranges_are_read_where_there_is_no_record() {
        let data = tempfile::tempfile().unwrap();
        Obj::File(&data).set(X_RANGES, b"0-10,20-30", 0).unwrap();
        let (r, rec) = file_ranges(None, Obj::File(&data), 25, Path::new("f")).unwrap();
        assert_eq!((r.0, rec), (vec![(0, 10), (20, 25)], None));
    }

    #[test]
    fn ctime_values_round_trip() {
        for t in [(0, 0), (1_700_000_000, 123_456_789), (-5, 999_999_999)] {
            assert_eq!(decode_time(&encode_time(t)), Some(t));
        }
        assert_eq!(decode_time(b"1.5"), None);
        assert_eq!(decode_time(b"x.000000000"), None);
    }
}
