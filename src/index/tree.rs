//! The [`Tree`] trait (what the FUSE adapter asks of any tree) and [`IndexTree`], the
//! read-only tree over a loaded index and its archive stream.

use std::sync::Arc;

pub use crate::archive::ReadBytes;
use crate::archive::StreamReader;
use crate::error::{Error, Result};
use crate::index::verify::HeaderCheck;
use crate::index::{blocks_for, Index, InodeRecord, ROOT_INO};

/// Attributes of one inode, as `stat` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// `S_IFMT` | permission bits.
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Apparent size.
    pub size: u64,
    /// 512-byte blocks actually holding data.
    pub blocks: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Access time, seconds.
    pub atime: i64,
    /// Access time, nanoseconds.
    pub atime_nsec: u32,
    /// Status change time, seconds.
    pub ctime: i64,
    /// Status change time, nanoseconds.
    pub ctime_nsec: u32,
    /// Device number.
    pub rdev: u32,
    /// A directory the archive does not list itself (created for a deeper member).
    pub implicit: bool,
}

/// Filesystem statistics.
#[derive(Debug, Clone, Copy)]
pub struct FsStats {
    /// Total 512-byte blocks of file data.
    pub blocks: u64,
    /// Number of inodes.
    pub files: u64,
}

/// A directory listing callback: (offset of the next entry, name, inode, mode type
/// bits); returns `true` when the reply buffer is full.
pub type DirSink<'a> = dyn FnMut(u64, &[u8], u64, u32) -> bool + 'a;

/// A listing callback with attributes (readdirplus): (offset of the next entry, name,
/// attributes); returns `true` when the reply buffer is full (the entry was not taken).
pub type DirPlusSink<'a> = dyn FnMut(u64, &[u8], &Attr) -> bool + 'a;

/// What the FUSE adapter needs of a tree. Implemented by the read-only index tree;
/// layered and writable trees implement it too.
pub trait Tree: Send + Sync {
    /// Attributes of `ino`.
    fn attr(&self, ino: u64) -> Result<Attr>;
    /// The inode named `name` in directory `parent`.
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64>;
    /// Lists directory `ino` from `offset` (0 = `.`, 1 = `..`, then entries).
    fn read_dir(&self, ino: u64, offset: u64, sink: &mut DirSink<'_>) -> Result<()>;
    /// Target of symlink `ino`.
    fn read_link(&self, ino: u64) -> Result<Vec<u8>>;
    /// Extended attribute names of `ino`, each followed by a NUL.
    fn xattr_names(&self, ino: u64) -> Result<Vec<u8>>;
    /// Value of extended attribute `name` of `ino` (`ENODATA` if absent).
    fn xattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>>;
    /// Up to `size` bytes of file `ino` from `offset`.
    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<ReadBytes>;
    /// `lseek` with `SEEK_DATA` (`data = true`) or `SEEK_HOLE`.
    fn seek_data(&self, ino: u64, offset: u64, data: bool) -> Result<u64>;
    /// Filesystem statistics.
    fn stats(&self) -> FsStats;

    /// Lists directory `ino` through handle `fh` like [`Tree::read_dir_handle`], with
    /// each entry's attributes (entries whose attributes cannot be read are left out).
    /// Every entry the sink takes, but `.` and `..`, is a reference the kernel holds
    /// (see [`Tree::forget`]).
    fn read_dir_plus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut DirPlusSink<'_>,
    ) -> Result<()> {
        self.read_dir_handle(
            ino,
            fh,
            offset,
            &mut |next, name, child, _| match self.attr(child) {
                Ok(a) => sink(next, name, &a),
                Err(_) => false,
            },
        )
    }
    /// The kernel drops `nlookup` references to `ino`. Each inode returned by
    /// [`Tree::lookup`], [`Tree::create`], [`Tree::mknod`], [`Tree::mkdir`],
    /// [`Tree::symlink`], [`Tree::link`] and [`Tree::read_dir_plus`] is one; a tree
    /// whose inode table changes may drop an inode when none is left (and it is not
    /// open). Immutable trees ignore this.
    fn forget(&self, _ino: u64, _nlookup: u64) {}

    // Writable trees override the methods below; a read-only tree answers every
    // modifying call with EROFS.

    /// Whether the tree accepts changes (the FUSE adapter then uses short cache TTLs).
    fn writable(&self) -> bool {
        false
    }
    /// Free space for `statfs`, if the tree has any.
    fn free_space(&self) -> Option<FreeSpace> {
        None
    }
    /// Opens file `ino` with `open(2)` flags; returns a handle for the calls below.
    fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(erofs());
        }
        self.attr(ino).map(|_| 0)
    }
    /// Creates and opens regular file `name` in `parent`: (inode, handle).
    fn create(
        &self,
        _parent: u64,
        _name: &[u8],
        _mode: u32,
        _flags: i32,
        _owner: Owner,
    ) -> Result<(u64, u64)> {
        Err(erofs())
    }
    /// `close(2)` of one descriptor of an open file.
    fn flush(&self, _ino: u64, _fh: u64) -> Result<()> {
        Ok(())
    }
    /// Last close of handle `fh` of `ino`.
    fn release(&self, _ino: u64, _fh: u64) -> Result<()> {
        Ok(())
    }
    /// Makes the data (and, unless `datasync`, the metadata) of `ino` durable.
    fn fsync(&self, _ino: u64, _datasync: bool) -> Result<()> {
        Ok(())
    }
    /// Opens directory `ino` for listing; the handle goes to [`Tree::read_dir_handle`].
    fn open_dir(&self, ino: u64) -> Result<u64> {
        self.attr(ino).map(|_| 0)
    }
    /// Lists directory `ino` through handle `fh` (a stable listing while it is open).
    fn read_dir_handle(
        &self,
        ino: u64,
        _fh: u64,
        offset: u64,
        sink: &mut DirSink<'_>,
    ) -> Result<()> {
        self.read_dir(ino, offset, sink)
    }
    /// Closes a directory handle.
    fn release_dir(&self, _ino: u64, _fh: u64) -> Result<()> {
        Ok(())
    }
    /// Writes `data` at `offset` of file `ino`; returns the bytes written.
    fn write(&self, _ino: u64, _fh: u64, _offset: u64, _data: &[u8]) -> Result<u32> {
        Err(erofs())
    }
    /// Changes attributes (chmod, chown, truncate, utimens); returns the new ones.
    fn set_attr(&self, _ino: u64, _set: &SetAttr) -> Result<Attr> {
        Err(erofs())
    }
    /// Creates a regular file, device, fifo or socket (`mode` carries the type).
    fn mknod(
        &self,
        _parent: u64,
        _name: &[u8],
        _mode: u32,
        _rdev: u32,
        _owner: Owner,
    ) -> Result<u64> {
        Err(erofs())
    }
    /// Creates a directory.
    fn mkdir(&self, _parent: u64, _name: &[u8], _mode: u32, _owner: Owner) -> Result<u64> {
        Err(erofs())
    }
    /// Creates a symlink to `target`.
    fn symlink(&self, _parent: u64, _name: &[u8], _target: &[u8], _owner: Owner) -> Result<u64> {
        Err(erofs())
    }
    /// Adds the name `name` in `parent` for `ino`.
    fn link(&self, _ino: u64, _parent: u64, _name: &[u8]) -> Result<u64> {
        Err(erofs())
    }
    /// Removes a non-directory name.
    fn unlink(&self, _parent: u64, _name: &[u8]) -> Result<()> {
        Err(erofs())
    }
    /// Removes an empty directory.
    fn rmdir(&self, _parent: u64, _name: &[u8]) -> Result<()> {
        Err(erofs())
    }
    /// `renameat2(2)`; `flags` are `RENAME_*` bits.
    fn rename(
        &self,
        _parent: u64,
        _name: &[u8],
        _new_parent: u64,
        _new_name: &[u8],
        _flags: u32,
    ) -> Result<()> {
        Err(erofs())
    }
    /// Sets extended attribute `name` (`flags`: `XATTR_CREATE`/`XATTR_REPLACE`).
    fn set_xattr(&self, _ino: u64, _name: &[u8], _value: &[u8], _flags: i32) -> Result<()> {
        Err(erofs())
    }
    /// Removes extended attribute `name`.
    fn remove_xattr(&self, _ino: u64, _name: &[u8]) -> Result<()> {
        Err(erofs())
    }
    /// `fallocate(2)` of `length` bytes at `offset` of file `ino` (`mode`:
    /// `FALLOC_FL_*` bits).
    fn fallocate(&self, _ino: u64, _fh: u64, _offset: u64, _length: u64, _mode: i32) -> Result<()> {
        Err(erofs())
    }
    /// The local file that holds every byte of open regular file `ino` at the offset
    /// the view shows it at, and takes its writes (a whole upper file), if there is
    /// one. The FUSE adapter hands it to the kernel (passthrough), whose reads and
    /// writes of `ino` then skip the tree until the last handle is released; so the
    /// tree must keep nothing about it that such writes could make stale.
    fn backing_file(&self, _ino: u64) -> Option<Arc<std::fs::File>> {
        None
    }
}

fn erofs() -> Error {
    Error::Errno(libc::EROFS)
}

/// Who creates a new entry (the caller's fsuid and fsgid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// A timestamp to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    /// The current time.
    Now,
    /// Seconds and nanoseconds since the epoch.
    At(i64, u32),
}

/// The changes of one `setattr` request; `None` leaves a field alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<SetTime>,
    /// New modification time.
    pub mtime: Option<SetTime>,
}

/// Free space of a writable tree, as `statfs` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeSpace {
    /// Free 4 KiB blocks.
    pub blocks_free: u64,
    /// Free 4 KiB blocks for unprivileged users.
    pub blocks_avail: u64,
    /// Free inodes.
    pub files_free: u64,
}

/// A boxed tree that forwards every [`Tree`] method, the writable ones included.
pub struct DynTree(pub Box<dyn Tree>);

impl Tree for DynTree {
    fn attr(&self, ino: u64) -> Result<Attr> {
        (*self.0).attr(ino)
    }
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64> {
        (*self.0).lookup(parent, name)
    }
    fn read_dir(&self, ino: u64, offset: u64, sink: &mut DirSink<'_>) -> Result<()> {
        (*self.0).read_dir(ino, offset, sink)
    }
    fn read_link(&self, ino: u64) -> Result<Vec<u8>> {
        (*self.0).read_link(ino)
    }
    fn xattr_names(&self, ino: u64) -> Result<Vec<u8>> {
        (*self.0).xattr_names(ino)
    }
    fn xattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        (*self.0).xattr(ino, name)
    }
    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<ReadBytes> {
        (*self.0).read(ino, offset, size)
    }
    fn seek_data(&self, ino: u64, offset: u64, data: bool) -> Result<u64> {
        (*self.0).seek_data(ino, offset, data)
    }
    fn stats(&self) -> FsStats {
        (*self.0).stats()
    }
    fn read_dir_plus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut DirPlusSink<'_>,
    ) -> Result<()> {
        (*self.0).read_dir_plus(ino, fh, offset, sink)
    }
    fn forget(&self, ino: u64, nlookup: u64) {
        (*self.0).forget(ino, nlookup)
    }
    fn fallocate(&self, ino: u64, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        (*self.0).fallocate(ino, fh, offset, length, mode)
    }
    fn writable(&self) -> bool {
        (*self.0).writable()
    }
    fn free_space(&self) -> Option<FreeSpace> {
        (*self.0).free_space()
    }
    fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        (*self.0).open(ino, flags)
    }
    fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        owner: Owner,
    ) -> Result<(u64, u64)> {
        (*self.0).create(parent, name, mode, flags, owner)
    }
    fn flush(&self, ino: u64, fh: u64) -> Result<()> {
        (*self.0).flush(ino, fh)
    }
    fn release(&self, ino: u64, fh: u64) -> Result<()> {
        (*self.0).release(ino, fh)
    }
    fn fsync(&self, ino: u64, datasync: bool) -> Result<()> {
        (*self.0).fsync(ino, datasync)
    }
    fn open_dir(&self, ino: u64) -> Result<u64> {
        (*self.0).open_dir(ino)
    }
    fn read_dir_handle(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut DirSink<'_>,
    ) -> Result<()> {
        (*self.0).read_dir_handle(ino, fh, offset, sink)
    }
    fn release_dir(&self, ino: u64, fh: u64) -> Result<()> {
        (*self.0).release_dir(ino, fh)
    }
    fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        (*self.0).write(ino, fh, offset, data)
    }
    fn set_attr(&self, ino: u64, set: &SetAttr) -> Result<Attr> {
        (*self.0).set_attr(ino, set)
    }
    fn mknod(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, owner: Owner) -> Result<u64> {
        (*self.0).mknod(parent, name, mode, rdev, owner)
    }
    fn mkdir(&self, parent: u64, name: &[u8], mode: u32, owner: Owner) -> Result<u64> {
        (*self.0).mkdir(parent, name, mode, owner)
    }
    fn symlink(&self, parent: u64, name: &[u8], target: &[u8], owner: Owner) -> Result<u64> {
        (*self.0).symlink(parent, name, target, owner)
    }
    fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<u64> {
        (*self.0).link(ino, parent, name)
    }
    fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        (*self.0).unlink(parent, name)
    }
    fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        (*self.0).rmdir(parent, name)
    }
    fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        (*self.0).rename(parent, name, new_parent, new_name, flags)
    }
    fn set_xattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        (*self.0).set_xattr(ino, name, value, flags)
    }
    fn remove_xattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        (*self.0).remove_xattr(ino, name)
    }
    fn backing_file(&self, ino: u64) -> Option<Arc<std::fs::File>> {
        (*self.0).backing_file(ino)
    }
}

/// The read-only tree of one archive.
pub struct IndexTree {
    index: Arc<Index>,
    stream: StreamReader,
    stats: FsStats,
    /// Set for an index that came with the archive (see [`crate::index::verify`]).
    check: Option<HeaderCheck>,
}

fn enoent() -> Error {
    Error::Errno(libc::ENOENT)
}

impl IndexTree {
    /// A tree serving `index` with data from `stream`.
    pub fn new(index: Arc<Index>, stream: StreamReader) -> Self {
        // From the index file's header: no pass over the records at mount time.
        let stats = FsStats {
            blocks: index.total_blocks(),
            files: index.inodes.len() as u64,
        };
        IndexTree {
            index,
            stream,
            stats,
            check: None,
        }
    }

    /// Checks every regular file against its tar headers before its bytes are first
    /// served: for an index that is not ours (one embedded in the archive).
    pub fn with_header_check(mut self) -> Self {
        self.check = Some(HeaderCheck::new(&self.index));
        self
    }

    /// The index behind this tree.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Inode `ino`'s record: ENOENT if there is none, EIO if the index has it corrupt.
    fn rec(&self, ino: u64) -> Result<&InodeRecord> {
        self.index.record(ino)
    }

    /// A path of `ino` for messages (its first name if it has several). Scans the
    /// directories once: only used when a read failed.
    fn path_of(&self, ino: u64) -> String {
        let index = &*self.index;
        let name_in = |dir: u64, target: u64| -> Option<&[u8]> {
            let r = index.inode(dir)?;
            let d = index
                .children(r)
                .iter()
                .find(|d| u64::from(d.ino) == target)?;
            Some(index.dirent_name(d))
        };
        // A file's directory is found by a scan; directories know their parent.
        let mut parent = index
            .inode(ino)
            .filter(|r| r.is_dir())
            .map(|r| u64::from(r.parent));
        if parent.is_none() {
            parent = index
                .inodes
                .iter()
                .zip(1u64..)
                .find(|(r, _)| index.children(r).iter().any(|d| u64::from(d.ino) == ino))
                .map(|(_, dir)| dir);
        }
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        while let Some(dir) = parent {
            if cur == ROOT_INO || parts.len() > index.inodes.len() {
                break;
            }
            let Some(name) = name_in(dir, cur) else { break };
            parts.push(name);
            cur = dir;
            parent = index.inode(dir).map(|r| u64::from(r.parent));
        }
        if parts.is_empty() {
            return format!("inode {ino}");
        }
        parts.reverse();
        String::from_utf8_lossy(&parts.join(&b'/')).into_owned()
    }

    /// Names the entry in an archive error that does not name one yet.
    fn with_entry(&self, ino: u64, e: Error) -> Error {
        match e {
            Error::Archive {
                archive,
                entry: None,
                offset,
                message,
            } => Error::Archive {
                archive,
                entry: Some(self.path_of(ino)),
                offset,
                message,
            },
            e => e,
        }
    }

    /// `len` bytes of regular file `r` from `offset` (within its size).
    fn read_data(&self, r: &InodeRecord, offset: u64, len: usize) -> Result<ReadBytes> {
        if r.flags & crate::index::FLAG_SPARSE == 0 {
            return self.stream.read_at(r.data + offset, len);
        }
        let mut buf = vec![0u8; len];
        // Sparse: copy the segments that overlap, holes stay zero.
        let end = offset + len as u64;
        let segs = self.index.file_segments(r);
        let first = segs.partition_point(|s| s.logical + s.len <= offset);
        for s in segs.get(first..).unwrap_or(&[]) {
            if s.logical >= end {
                break;
            }
            let from = s.logical.max(offset);
            let to = (s.logical + s.len).min(end);
            let dst = buf
                .get_mut((from - offset) as usize..(to - offset) as usize)
                .ok_or(Error::Errno(libc::EIO))?;
            self.stream
                .read_exact_at(dst, s.stream + (from - s.logical))?;
        }
        Ok(ReadBytes::Owned(buf))
    }
}

impl Tree for IndexTree {
    fn attr(&self, ino: u64) -> Result<Attr> {
        let r = self.rec(ino)?;
        Ok(Attr {
            ino,
            mode: r.mode,
            nlink: r.nlink,
            uid: r.uid,
            gid: r.gid,
            size: r.size,
            blocks: blocks_for(self.index.data_bytes(r)),
            mtime: r.mtime,
            mtime_nsec: r.mtime_nsec,
            atime: r.atime,
            atime_nsec: r.atime_nsec,
            ctime: r.ctime,
            ctime_nsec: r.ctime_nsec,
            rdev: r.rdev,
            implicit: r.flags & crate::index::FLAG_IMPLICIT != 0,
        })
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64> {
        let kids = self.index.entries(parent)?;
        let i = kids
            .binary_search_by(|d| self.index.dirent_name(d).cmp(name))
            .map_err(|_| enoent())?;
        Ok(u64::from(kids[i].ino))
    }

    fn read_dir(&self, ino: u64, offset: u64, sink: &mut DirSink<'_>) -> Result<()> {
        let dir = self.rec(ino)?;
        if !dir.is_dir() {
            return Err(Error::Errno(libc::ENOTDIR));
        }
        let kids = self.index.entries(ino)?;
        let mut off = offset;
        if off == 0 {
            if sink(1, b".", ino, libc::S_IFDIR) {
                return Ok(());
            }
            off = 1;
        }
        if off == 1 {
            let parent = if ino == ROOT_INO {
                ROOT_INO
            } else {
                u64::from(dir.parent)
            };
            if sink(2, b"..", parent, libc::S_IFDIR) {
                return Ok(());
            }
            off = 2;
        }
        let start = usize::try_from(off - 2).unwrap_or(usize::MAX);
        for (i, d) in kids.iter().enumerate().skip(start) {
            let child = u64::from(d.ino);
            // A corrupt entry (logged once) is left out; the others are listed.
            let Ok(kind) = self.rec(child).map(|r| r.file_type()) else {
                continue;
            };
            if sink(i as u64 + 3, self.index.dirent_name(d), child, kind) {
                break;
            }
        }
        Ok(())
    }

    fn read_link(&self, ino: u64) -> Result<Vec<u8>> {
        let r = self.rec(ino)?;
        if r.file_type() != libc::S_IFLNK {
            return Err(Error::Errno(libc::EINVAL));
        }
        Ok(self.index.arena(r.data, r.size).to_vec())
    }

    fn xattr_names(&self, ino: u64) -> Result<Vec<u8>> {
        let r = self.rec(ino)?;
        let mut out = Vec::new();
        for x in self.index.inode_xattrs(r) {
            out.extend_from_slice(
                self.index
                    .arena(u64::from(x.name_off), u64::from(x.name_len)),
            );
            out.push(0);
        }
        Ok(out)
    }

    fn xattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let r = self.rec(ino)?;
        self.index
            .inode_xattrs(r)
            .iter()
            .rev()
            .find(|x| {
                self.index
                    .arena(u64::from(x.name_off), u64::from(x.name_len))
                    == name
            })
            .map(|x| {
                self.index
                    .arena(u64::from(x.value_off), u64::from(x.value_len))
                    .to_vec()
            })
            .ok_or(Error::Errno(libc::ENODATA))
    }

    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<ReadBytes> {
        let r = self.rec(ino)?;
        match r.file_type() {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(Error::Errno(libc::EISDIR)),
            _ => return Err(Error::Errno(libc::EINVAL)),
        }
        if let Some(check) = &self.check {
            check
                .ensure(&self.index, &self.stream, ino, r)
                .map_err(|e| self.with_entry(ino, e))?;
        }
        if offset >= r.size {
            return Ok(ReadBytes::empty());
        }
        let len = (r.size - offset).min(u64::from(size)) as usize;
        self.read_data(r, offset, len)
            .map_err(|e| self.with_entry(ino, e))
    }

    fn seek_data(&self, ino: u64, offset: u64, data: bool) -> Result<u64> {
        let r = self.rec(ino)?;
        if r.file_type() != libc::S_IFREG {
            return Err(Error::Errno(libc::EINVAL));
        }
        if offset >= r.size {
            return Err(Error::Errno(libc::ENXIO));
        }
        if r.flags & crate::index::FLAG_SPARSE == 0 {
            return Ok(if data { offset } else { r.size });
        }
        let segs = self.index.file_segments(r);
        let mut i = segs.partition_point(|s| s.logical + s.len <= offset);
        if data {
            return match segs.get(i) {
                Some(s) => Ok(s.logical.max(offset)),
                None => Err(Error::Errno(libc::ENXIO)),
            };
        }
        // SEEK_HOLE: in a hole already, or at the end of a run of touching segments.
        match segs.get(i) {
            Some(s) if s.logical <= offset => {
                let mut end = s.logical + s.len;
                i += 1;
                while let Some(n) = segs.get(i) {
                    if n.logical != end {
                        break;
                    }
                    end += n.len;
                    i += 1;
                }
                Ok(end.min(r.size))
            }
            _ => Ok(offset),
        }
    }

    fn stats(&self) -> FsStats {
        self.stats
    }
}

/// A tree over an index the loader accepts: `files` regular files of `u64::MAX` bytes
/// each in a stream of that size (a hostile index; reads of them fail).
#[cfg(test)]
pub(crate) fn huge_files_tree(files: usize) -> IndexTree {
    use crate::archive::{ArchiveId, SeekTable};
    use crate::index::format;

    let mut inodes = vec![InodeRecord {
        mode: libc::S_IFDIR | 0o755,
        nlink: 2,
        parent: 1,
        ..Default::default()
    }];
    let huge = InodeRecord {
        mode: libc::S_IFREG | 0o644,
        nlink: 1,
        size: u64::MAX,
        ..Default::default()
    };
    inodes.extend(std::iter::repeat_n(huge, files));
    let index = Index {
        id: ArchiveId {
            size: 0,
            mtime_ns: 0,
            head_crc: 0,
            tail_crc: 0,
        },
        span_bytes: 0,
        stream_size: u64::MAX,
        table: Arc::new(SeekTable::Plain),
        inodes: inodes.into(),
        dirents: Vec::new().into(),
        names: Vec::new().into(),
        xattrs: Vec::new(),
        segments: Vec::new(),
        skipped: 0,
        stat_blocks: None,
        lazy: None,
    };
    // The loader accepts it, so it must be served without panicking.
    let index = format::decode(&format::encode(&index)).expect("the loader accepts it");
    let file = tempfile::tempfile().expect("tempfile");
    let stream = StreamReader::new(Arc::new(file), index.table.clone(), 1 << 20);
    IndexTree::new(Arc::new(index), stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index that `validate` accepts (a hostile index file, or one embedded in a
    /// hostile snapshot) may declare a huge stream and many files as large as it:
    /// their block counts used to be summed with `+`, which overflowed (a panic with
    /// overflow checks on) when the tree was created, i.e. at mount time.
    #[test]
    fn fs_stats_of_huge_files_saturate_instead_of_overflowing() {
        let tree = huge_files_tree(600);
        assert_eq!(tree.stats().blocks, u64::MAX);
        assert_eq!(tree.stats().files, 601);
        assert_eq!(tree.attr(2).unwrap().blocks, u64::MAX.div_ceil(4096) * 8);
    }
}
