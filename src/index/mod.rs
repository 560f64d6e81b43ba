//! The index of one archive: fixed-size inode and directory-entry records, one name
//! arena, xattrs and sparse segments, plus the seek table of the compressed stream.
//! Built in one pass ([`build`]), persisted ([`format`]), checked where a mapped one is
//! read ([`lazy`]), served as a tree ([`tree`]).

pub mod build;
pub mod format;
pub mod lazy;
pub mod records;
pub mod store;
pub mod tree;
pub mod verify;

use crate::archive::tar::Segment;
use crate::archive::{ArchiveId, SeekTable};
use crate::error::{Error, Result};
use records::Records;

/// Inode number of the root directory (FUSE's root).
pub const ROOT_INO: u64 = 1;

/// `InodeRecord::flags`: the file is sparse (`first`/`count` index `segments`).
pub const FLAG_SPARSE: u32 = 1;
/// `InodeRecord::flags`: a directory created for a deeper member, not listed itself.
pub const FLAG_IMPLICIT: u32 = 2;

/// One inode. Inode number = position in `Index::inodes` + 1.
///
/// The fields are in the index file's order (`format`), so a mapped file's records
/// are read in place ([`records::Record`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InodeRecord {
    /// `S_IFMT` type bits | permission bits.
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds).
    pub mtime: i64,
    /// Modification time (nanoseconds).
    pub mtime_nsec: u32,
    /// Device number (`makedev(major, minor)`) for devices.
    pub rdev: u32,
    /// Apparent size (symlinks: target length).
    pub size: u64,
    /// Regular file: stream offset of the data. Symlink: arena offset of the target.
    pub data: u64,
    /// Directory: first dirent. Sparse file: first segment.
    pub first: u32,
    /// Directory: number of dirents. Sparse file: number of segments.
    pub count: u32,
    /// First xattr record.
    pub xattr_first: u32,
    /// Number of xattr records.
    pub xattr_count: u32,
    /// Directory: the parent's inode number (root: itself).
    pub parent: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Access time (seconds); the mtime when the archive has none.
    pub atime: i64,
    /// Status change time (seconds); the mtime when the archive has none.
    pub ctime: i64,
    /// Access time (nanoseconds).
    pub atime_nsec: u32,
    /// Status change time (nanoseconds).
    pub ctime_nsec: u32,
}

// SAFETY: repr(C), integer fields only, each at its natural alignment with no gaps
// (checked below), in the file's field order.
unsafe impl records::Record for InodeRecord {}
const _: () = assert!(std::mem::size_of::<InodeRecord>() == 96);
const _: () = assert!(std::mem::offset_of!(InodeRecord, flags) == 68);
const _: () = assert!(std::mem::offset_of!(InodeRecord, ctime_nsec) == 92);

impl InodeRecord {
    /// The file type bits.
    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    /// True for directories.
    pub fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }
}

/// One name in a directory; a directory's entries are contiguous and sorted by name.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirentRecord {
    /// Arena offset of the name.
    pub name_off: u32,
    /// Name length.
    pub name_len: u32,
    /// Inode number the name refers to.
    pub ino: u32,
}

// SAFETY: repr(C), three u32 fields, the file's order.
unsafe impl records::Record for DirentRecord {}
const _: () = assert!(std::mem::size_of::<DirentRecord>() == 12);

/// One extended attribute; name and value live in the arena.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XattrRecord {
    /// Arena offset of the name.
    pub name_off: u32,
    /// Name length.
    pub name_len: u32,
    /// Arena offset of the value.
    pub value_off: u32,
    /// Value length.
    pub value_len: u32,
}

/// A whole index.
pub struct Index {
    /// The archive it describes.
    pub id: ArchiveId,
    /// Checkpoint spacing the seek table was built with.
    pub span_bytes: u64,
    /// Size of the uncompressed tar stream.
    pub stream_size: u64,
    /// How to seek in the compressed stream.
    pub table: std::sync::Arc<SeekTable>,
    /// Inodes; `inodes[0]` is the root.
    pub inodes: Records<InodeRecord>,
    /// Directory entries.
    pub dirents: Records<DirentRecord>,
    /// Names, link targets, xattr names and values.
    pub names: Records<u8>,
    /// Extended attributes.
    pub xattrs: Vec<XattrRecord>,
    /// Sparse file segments.
    pub segments: Vec<Segment>,
    /// Members skipped while indexing (with a warning each).
    pub skipped: u64,
    /// The 512-byte blocks of file data `statfs` reports, as the index file's header
    /// says (`None`: not read from a file; [`Index::total_blocks`] sums them).
    pub stat_blocks: Option<u64>,
    /// For an index served in place from its mapped file: what has been checked of it
    /// (`None`: all of it was, or it was built here).
    pub lazy: Option<std::sync::Arc<lazy::Lazy>>,
}

/// Blocks of 512 bytes for `bytes` of data, in whole 4 KiB pages as local disks show.
/// Sizes come from the index (hostile input): sums of these saturate.
pub fn blocks_for(bytes: u64) -> u64 {
    bytes.div_ceil(4096) * 8
}

impl Index {
    /// The record of inode `ino`, if it exists and (in a mapped index) passes its
    /// checks; [`Index::record`] tells the two apart.
    pub fn inode(&self, ino: u64) -> Option<&InodeRecord> {
        self.record(ino).ok()
    }

    /// The record of inode `ino`: ENOENT if there is none; in a mapped index, checked
    /// on first use ([`lazy::check_record`]), an [`Error::Index`] (EIO) if corrupt.
    pub fn record(&self, ino: u64) -> Result<&InodeRecord> {
        let r = usize::try_from(ino.wrapping_sub(1))
            .ok()
            .and_then(|i| self.inodes.get(i))
            .ok_or(Error::Errno(libc::ENOENT))?;
        if let Some(l) = &self.lazy {
            l.once(ino, lazy::RECORD_OK, "record", || {
                l.record_bytes_ok(ino)?;
                lazy::check_record(self, ino, r)
            })?;
        }
        Ok(r)
    }

    /// The entries of directory `ino` (ENOTDIR for another type); in a mapped index,
    /// checked on first use ([`lazy::check_entries`]). Their names are then in bounds
    /// and checked, their inode numbers in range.
    pub fn entries(&self, ino: u64) -> Result<&[DirentRecord]> {
        let r = self.record(ino)?;
        if !r.is_dir() {
            return Err(Error::Errno(libc::ENOTDIR));
        }
        if let Some(l) = &self.lazy {
            l.once(ino, lazy::ENTRIES_OK, "entries", || {
                lazy::check_entries(self, ino, r, None)
            })?;
        }
        Ok(self.children(r))
    }

    /// Arena bytes `[off, off+len)`, or empty if out of range. Only ranges of checked
    /// records ([`Index::record`], [`Index::entries`]) are known to be right.
    pub fn arena(&self, off: u64, len: u64) -> &[u8] {
        self.arena_checked(off, len).unwrap_or(&[])
    }

    /// Arena bytes `[off, off+len)`: an error if out of range or (in a mapped index)
    /// their blocks fail their checksums.
    pub fn arena_checked(&self, off: u64, len: u64) -> std::result::Result<&[u8], String> {
        let range = usize::try_from(off)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(o, l)| Some(o..o.checked_add(l)?));
        let bytes = range
            .and_then(|r| self.names.get(r))
            .ok_or("arena range out of bounds")?;
        if let Some(l) = &self.lazy {
            l.names_ok(off, len)?;
        }
        Ok(bytes)
    }

    /// The name of a directory entry.
    pub fn dirent_name(&self, d: &DirentRecord) -> &[u8] {
        self.arena(u64::from(d.name_off), u64::from(d.name_len))
    }

    /// The entries of directory record `ino` (empty for non-directories), unchecked:
    /// serving uses [`Index::entries`].
    pub fn children(&self, ino: &InodeRecord) -> &[DirentRecord] {
        if !ino.is_dir() {
            return &[];
        }
        let start = ino.first as usize;
        self.dirents
            .get(start..start.saturating_add(ino.count as usize))
            .unwrap_or(&[])
    }

    /// The sparse segments of a file (empty unless sparse).
    pub fn file_segments(&self, ino: &InodeRecord) -> &[Segment] {
        if ino.flags & FLAG_SPARSE == 0 {
            return &[];
        }
        let start = ino.first as usize;
        self.segments
            .get(start..start.saturating_add(ino.count as usize))
            .unwrap_or(&[])
    }

    /// The xattrs of an inode.
    pub fn inode_xattrs(&self, ino: &InodeRecord) -> &[XattrRecord] {
        let start = ino.xattr_first as usize;
        self.xattrs
            .get(start..start.saturating_add(ino.xattr_count as usize))
            .unwrap_or(&[])
    }

    /// Bytes of a regular file that hold data (the sum of its segments if sparse).
    pub fn data_bytes(&self, r: &InodeRecord) -> u64 {
        if r.file_type() != libc::S_IFREG {
            return 0;
        }
        if r.flags & FLAG_SPARSE == 0 {
            return r.size;
        }
        self.file_segments(r)
            .iter()
            .map(|s| s.len)
            .fold(0, u64::saturating_add)
    }

    /// The 512-byte blocks of file data: from the index file's header, or summed.
    pub fn total_blocks(&self) -> u64 {
        self.stat_blocks.unwrap_or_else(|| {
            self.inodes
                .iter()
                .map(|r| blocks_for(self.data_bytes(r)))
                .fold(0, u64::saturating_add)
        })
    }

    /// Bytes of the process's own memory the records and arena take (approximate;
    /// records read in place from the mapped index file count nothing).
    pub fn memory_bytes(&self) -> usize {
        self.inodes.owned_bytes()
            + self.dirents.owned_bytes()
            + self.names.owned_bytes()
            + self.xattrs.len() * std::mem::size_of::<XattrRecord>()
            + self.segments.len() * std::mem::size_of::<Segment>()
    }
}
