//! Checks of a mapped index where it is read, so that a warm mount reads the header
//! and the root directory, not the whole file. The index file is untrusted: the
//! first time a body block (4 KiB) is read, its CRC is checked; the first time an
//! inode record is used, its fields are ([`check_record`]: ranges of its data, name,
//! xattrs, entries); the first time a directory's entries are, they are
//! ([`check_entries`]: names in bounds, valid and sorted, inode numbers in range,
//! subdirectories naming it as their parent). Each verdict is kept; a bad one is
//! logged once, naming the index file and the record, and every request that needs
//! that record fails with EIO while the rest of the tree is served. The corrupt file
//! is removed (if it is still the one mapped), so the next mount rebuilds the index.
//!
//! [`crate::index::format::validate`] runs the same record checks over a whole index.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};
use crate::index::format::{DIRENT_BYTES, INODE_BYTES};
use crate::index::{Index, InodeRecord, FLAG_SPARSE, ROOT_INO};

/// Block state: not read yet.
const UNKNOWN: u8 = 0;
/// Block state: its CRC matched.
const GOOD: u8 = 1;
/// Block state: its CRC did not match.
const BAD: u8 = 2;

/// Inode state bits: the record passed or failed [`check_record`].
pub(crate) const RECORD_OK: u8 = 1;
const RECORD_BAD: u8 = 2;
/// Inode state bits: the directory's entries passed or failed [`check_entries`].
pub(crate) const ENTRIES_OK: u8 = 4;
const ENTRIES_BAD: u8 = 8;

/// The check state of one mapped index.
pub struct Lazy {
    /// The index file, for log lines and errors.
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    /// File offset of the body.
    body: usize,
    block_bytes: usize,
    /// The stored CRC of each body block.
    crcs: Box<[u32]>,
    /// `UNKNOWN`, `GOOD` or `BAD` per body block.
    blocks: Box<[AtomicU8]>,
    /// `*_OK` / `*_BAD` bits per inode (index `ino - 1`).
    inodes: Box<[AtomicU8]>,
    /// Body offsets of the dirent and name sections.
    dirents_at: usize,
    names_at: usize,
    /// `(st_dev, st_ino)` of the mapped file, if known: it is removed when found
    /// corrupt (once), unless another file has replaced it since.
    file_id: OnceLock<(u64, u64)>,
    removed: AtomicBool,
}

impl Lazy {
    /// Nothing checked yet of the index `path` mapped as `map`, whose body starts at
    /// file offset `body` and has `inodes` inode records, its dirents and names at
    /// body offsets `sections`.
    pub(crate) fn new(
        path: PathBuf,
        map: Arc<memmap2::Mmap>,
        body: usize,
        block_bytes: usize,
        crcs: Vec<u32>,
        inodes: usize,
        sections: [usize; 2],
    ) -> Self {
        let blocks = (0..crcs.len()).map(|_| AtomicU8::new(UNKNOWN)).collect();
        Lazy {
            path,
            map,
            body,
            block_bytes,
            crcs: crcs.into(),
            blocks,
            inodes: (0..inodes).map(|_| AtomicU8::new(0)).collect(),
            dirents_at: sections[0],
            names_at: sections[1],
            file_id: OnceLock::new(),
            removed: AtomicBool::new(false),
        }
    }

    /// Names the mapped file by `(st_dev, st_ino)`, so that it can be removed when
    /// found corrupt.
    pub(crate) fn set_file_id(&self, dev: u64, ino: u64) {
        let _ = self.file_id.set((dev, ino));
    }

    /// Removes the index file (once) if it is still the mapped one: the mapping stays
    /// valid, and the next mount rebuilds the index instead of meeting the same damage.
    fn remove_file(&self) {
        use std::os::unix::fs::MetadataExt;
        let Some(&(dev, ino)) = self.file_id.get() else {
            return;
        };
        if self.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        let same =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == dev && m.ino() == ino);
        if same {
            match std::fs::remove_file(&self.path) {
                Ok(()) => log::warn!(
                    "removed the corrupt index {}: the next mount rebuilds it",
                    self.path.display()
                ),
                Err(e) => log::warn!(
                    "cannot remove the corrupt index {}: {e}; delete it to have it rebuilt",
                    self.path.display()
                ),
            }
        }
    }

    /// The index file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Ok if body bytes `[at, at + len)` lie in blocks whose CRCs match (checked on
    /// the first call that reads each block).
    pub(crate) fn bytes_ok(&self, at: usize, len: usize) -> Result<(), String> {
        if len == 0 {
            return Ok(());
        }
        let end = at.checked_add(len).ok_or("range overflows")?;
        for b in at / self.block_bytes..=(end - 1) / self.block_bytes {
            let state = self.blocks.get(b).ok_or("range beyond the index body")?;
            match state.load(Ordering::Acquire) {
                GOOD => continue,
                BAD => return Err(block_error(b)),
                _ => {}
            }
            let start = self.body + b * self.block_bytes;
            let stop = (start + self.block_bytes).min(self.map.len());
            let ok = self
                .map
                .get(start..stop)
                .is_some_and(|bytes| crc32fast::hash(bytes) == self.crcs[b]);
            state.store(if ok { GOOD } else { BAD }, Ordering::Release);
            if !ok {
                return Err(block_error(b));
            }
        }
        Ok(())
    }

    /// How many body blocks have been read and checked so far.
    pub fn checked_blocks(&self) -> usize {
        self.blocks
            .iter()
            .filter(|b| b.load(Ordering::Relaxed) != UNKNOWN)
            .count()
    }

    /// Ok if the bytes of inode `ino`'s record pass their block CRC.
    pub(crate) fn record_bytes_ok(&self, ino: u64) -> Result<(), String> {
        let i = usize::try_from(ino.saturating_sub(1)).map_err(|_| "inode out of range")?;
        self.bytes_ok(i.saturating_mul(INODE_BYTES), INODE_BYTES)
    }

    /// Ok if dirents `[first, first + count)` pass their block CRCs.
    fn dirents_ok(&self, first: u32, count: u32) -> Result<(), String> {
        self.bytes_ok(
            self.dirents_at + first as usize * DIRENT_BYTES,
            count as usize * DIRENT_BYTES,
        )
    }

    /// Ok if arena bytes `[off, off + len)` pass their block CRCs.
    pub(crate) fn names_ok(&self, off: u64, len: u64) -> Result<(), String> {
        let off = usize::try_from(off).map_err(|_| "name out of range")?;
        let len = usize::try_from(len).map_err(|_| "name out of range")?;
        self.bytes_ok(self.names_at.saturating_add(off), len)
    }

    /// Runs `check` for inode `ino` once per `ok` bit (the verdict is kept): Ok if it
    /// passes; otherwise an error naming the index and the inode, logged once.
    pub(crate) fn once(
        &self,
        ino: u64,
        ok: u8,
        what: &str,
        check: impl FnOnce() -> Result<(), String>,
    ) -> Result<()> {
        let bad = ok << 1;
        let Some(state) = usize::try_from(ino.wrapping_sub(1))
            .ok()
            .and_then(|i| self.inodes.get(i))
        else {
            return Err(Error::Errno(libc::ENOENT));
        };
        let seen = state.load(Ordering::Acquire);
        if seen & ok != 0 {
            return Ok(());
        }
        let verdict = if seen & bad != 0 {
            Err("found corrupt before".to_string())
        } else {
            let v = check();
            state.fetch_or(if v.is_ok() { ok } else { bad }, Ordering::AcqRel);
            if let Err(why) = &v {
                log::error!(
                    "index {}: inode {ino} {what}: {why}; requests that need it fail with EIO",
                    self.path.display()
                );
                self.remove_file();
            }
            v
        };
        verdict.map_err(|why| Error::Index {
            path: self.path.clone(),
            message: format!("inode {ino} {what}: {why}"),
        })
    }
}

/// The mapped index file, to the gzip seek table whose windows point into it: a
/// window's blocks are checked before it is inflated. A bad one fails that span's
/// reads (EIO, logged once per block, naming the index) and has the file removed, so
/// the next mount rebuilds it.
impl crate::archive::gzip::SharedStore for Lazy {
    fn bytes(&self) -> &[u8] {
        &self.map
    }

    fn check(&self, at: usize, len: usize) -> Result<(), String> {
        let at = at
            .checked_sub(self.body)
            .ok_or("window before the index body")?;
        let first_time =
            (at / self.block_bytes..=(at + len.max(1) - 1) / self.block_bytes).any(|b| {
                self.blocks
                    .get(b)
                    .is_some_and(|s| s.load(Ordering::Acquire) == UNKNOWN)
            });
        self.bytes_ok(at, len).map_err(|why| {
            if first_time {
                log::error!(
                    "index {}: gzip window: {why}; reads of its span fail with EIO",
                    self.path.display()
                );
                self.remove_file();
            }
            format!("index {}: {why}", self.path.display())
        })
    }
}

fn block_error(b: usize) -> String {
    format!("checksum mismatch in index block {b}")
}

// The bit pairs `once` relies on: bad = ok << 1.
const _: () = assert!(RECORD_BAD == RECORD_OK << 1 && ENTRIES_BAD == ENTRIES_OK << 1);

fn range_ok(off: u64, len: u64, limit: usize) -> bool {
    off.checked_add(len).is_some_and(|e| e <= limit as u64)
}

/// Checks the fields of inode `ino`'s record `r` (its bytes already checked): the
/// ranges of its data, target, xattrs and entries lie inside their sections and the
/// stream, the arena bytes it names pass their CRCs, its xattr names are valid and
/// distinct, its type is known.
pub(crate) fn check_record(index: &Index, ino: u64, r: &InodeRecord) -> Result<(), String> {
    let n = index.inodes.len();
    if ino == ROOT_INO && (!r.is_dir() || r.parent != 1) {
        return Err("index root is not a directory".into());
    }
    if !range_ok(
        u64::from(r.xattr_first),
        u64::from(r.xattr_count),
        index.xattrs.len(),
    ) {
        return Err("xattr range out of bounds".into());
    }
    let mut seen = HashSet::new();
    for x in index.inode_xattrs(r) {
        let name = index.arena_checked(u64::from(x.name_off), u64::from(x.name_len))?;
        index.arena_checked(u64::from(x.value_off), u64::from(x.value_len))?;
        if name.is_empty() || name.contains(&0) {
            return Err("xattr name is empty or contains a NUL".into());
        }
        if r.xattr_count > 1 && !seen.insert(name) {
            return Err("xattr name given twice".into());
        }
    }
    match r.file_type() {
        libc::S_IFDIR => {
            if !range_ok(u64::from(r.first), u64::from(r.count), index.dirents.len()) {
                return Err("directory range out of bounds".into());
            }
            if r.parent == 0 || r.parent as usize > n {
                return Err("directory's parent is not an inode".into());
            }
        }
        libc::S_IFREG => {
            if r.flags & FLAG_SPARSE != 0 {
                if !range_ok(u64::from(r.first), u64::from(r.count), index.segments.len()) {
                    return Err("segment range out of bounds".into());
                }
                let mut end = 0u64;
                for s in index.file_segments(r) {
                    if s.logical < end
                        || s.stream
                            .checked_add(s.len)
                            .is_none_or(|e| e > index.stream_size)
                    {
                        return Err("bad sparse segment".into());
                    }
                    end = s.logical.checked_add(s.len).ok_or("segment overflow")?;
                    if end > r.size {
                        return Err("sparse segment past the end of file".into());
                    }
                }
            } else if r
                .data
                .checked_add(r.size)
                .is_none_or(|e| e > index.stream_size)
            {
                return Err("file data outside the archive stream".into());
            }
        }
        libc::S_IFLNK => {
            if !range_ok(r.data, r.size, index.names.len()) {
                return Err("symlink target out of bounds".into());
            }
            index.arena_checked(r.data, r.size)?;
        }
        libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO | libc::S_IFSOCK => {}
        _ => return Err("unknown file type".into()),
    }
    Ok(())
}

/// Checks the entries of directory `ino` (record `r`, already checked): names in
/// bounds, valid and sorted, inode numbers in range, and each subdirectory naming
/// `ino` as its parent and listed once. `referenced` (one byte per inode) carries
/// "listed already" across directories for a whole-index check; without it, only
/// within this one. A subdirectory whose record fails its CRC is left to its own
/// check (its requests fail, the directory's others do not).
pub(crate) fn check_entries(
    index: &Index,
    ino: u64,
    r: &InodeRecord,
    mut referenced: Option<&mut Vec<u8>>,
) -> Result<(), String> {
    let n = index.inodes.len();
    if !range_ok(u64::from(r.first), u64::from(r.count), index.dirents.len()) {
        return Err("directory range out of bounds".into());
    }
    if let Some(l) = &index.lazy {
        l.dirents_ok(r.first, r.count)?;
    }
    let mut local = HashSet::new();
    let mut prev: Option<&[u8]> = None;
    for d in index.children(r) {
        let name = index
            .arena_checked(u64::from(d.name_off), u64::from(d.name_len))
            .map_err(|e| format!("entry name: {e}"))?;
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err("invalid entry name".into());
        }
        if prev.is_some_and(|p| p >= name) {
            return Err("entries not sorted".into());
        }
        prev = Some(name);
        let child = d.ino as usize;
        if child < 2 || child > n {
            return Err("entry refers to an invalid inode".into());
        }
        if let Some(l) = &index.lazy {
            if l.record_bytes_ok(d.ino.into()).is_err() {
                continue;
            }
        }
        let c = &index.inodes[child - 1];
        if c.is_dir() {
            let again = match referenced.as_deref_mut() {
                Some(seen) => std::mem::replace(&mut seen[child - 1], 1) != 0,
                None => !local.insert(child),
            };
            if u64::from(c.parent) != ino || again {
                return Err("directory linked twice or with a wrong parent".into());
            }
        }
    }
    Ok(())
}
