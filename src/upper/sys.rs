//! The system calls of the upper directory, all relative to directory descriptors:
//! `openat` with `O_NOFOLLOW` (directories also `O_DIRECTORY`), `mkdirat`, `mknodat`,
//! `symlinkat`, `renameat2`, `linkat`, `unlinkat`, `fchownat` and `utimensat` with
//! `AT_SYMLINK_NOFOLLOW` or `AT_EMPTY_PATH`, and xattrs on real descriptors or, for
//! `O_PATH` ones, through `/proc/self/fd/N` (which names the inode itself, never a
//! path). No call here takes an absolute path inside the upper directory, so a path
//! is never longer than one name and a symlink planted in the upper directory while
//! the daemon runs is never followed. Most of the upper tree's `unsafe` lives here.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::layout::X_WHITEOUT;
use crate::error::Error;
use crate::index::tree::{Attr, SetTime};

pub(super) fn errno(e: i32) -> Error {
    Error::Errno(e)
}

/// Maps an I/O error to [`Error::io`] naming `p` (the real file involved).
pub(super) fn ioerr<'a>(what: &'static str, p: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |e| Error::io(what, p, e)
}

pub(super) fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn cname(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `r` as a result: `Ok(r)` unless it is negative (then `errno`).
fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(last_err())
    } else {
        Ok(r)
    }
}

fn check_size(r: isize) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| last_err())
}

/// `/proc/self/fd/N` of `fd`: the inode `fd` refers to, for calls that only take paths.
fn proc_path(fd: BorrowedFd<'_>) -> CString {
    // A decimal number never holds a NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

// ---------------------------------------------------------------- stat

/// What `fstatat` says about an entry.
#[derive(Clone, Copy)]
pub(super) struct Stat(libc::stat);

impl Stat {
    pub(super) fn mode(&self) -> u32 {
        self.0.st_mode
    }
    pub(super) fn kind(&self) -> u32 {
        self.0.st_mode & libc::S_IFMT
    }
    pub(super) fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }
    pub(super) fn is_file(&self) -> bool {
        self.kind() == libc::S_IFREG
    }
    pub(super) fn size(&self) -> u64 {
        u64::try_from(self.0.st_size).unwrap_or(0)
    }
    pub(super) fn gid(&self) -> u32 {
        self.0.st_gid
    }
    /// (device, inode): the identity of hard links.
    pub(super) fn key(&self) -> (u64, u64) {
        (self.0.st_dev, self.0.st_ino)
    }
    pub(super) fn ctime(&self) -> (i64, u32) {
        (self.0.st_ctime, nsec(self.0.st_ctime_nsec))
    }
    pub(super) fn atime(&self) -> (i64, u32) {
        (self.0.st_atime, nsec(self.0.st_atime_nsec))
    }
    pub(super) fn mtime(&self) -> (i64, u32) {
        (self.0.st_mtime, nsec(self.0.st_mtime_nsec))
    }
}

fn nsec(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// The view's attributes of an upper entry.
pub(super) fn attr_of(ino: u64, s: &Stat) -> Attr {
    let m = &s.0;
    Attr {
        ino,
        mode: m.st_mode,
        nlink: u32::try_from(m.st_nlink).unwrap_or(u32::MAX),
        uid: m.st_uid,
        gid: m.st_gid,
        size: s.size(),
        blocks: u64::try_from(m.st_blocks).unwrap_or(0),
        mtime: m.st_mtime,
        mtime_nsec: nsec(m.st_mtime_nsec),
        atime: m.st_atime,
        atime_nsec: nsec(m.st_atime_nsec),
        ctime: m.st_ctime,
        ctime_nsec: nsec(m.st_ctime_nsec),
        rdev: u32::try_from(m.st_rdev).unwrap_or(0),
        implicit: false,
    }
}

fn fstatat(dir: BorrowedFd<'_>, name: &CString, flags: i32) -> io::Result<Stat> {
    // SAFETY: an all-zero `stat` is valid; fstatat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, C string and out pointer.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, flags) })?;
    Ok(Stat(st))
}

/// `lstat` of `name` in `dir`; `None` if it does not exist.
pub(super) fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<Stat>> {
    match fstatat(dir, &cname(name)?, libc::AT_SYMLINK_NOFOLLOW) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `fstat` of any descriptor (`O_PATH` ones too).
pub(super) fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    fstatat(fd, &CString::default(), libc::AT_EMPTY_PATH)
}

// ---------------------------------------------------------------- open

fn openat(dir: BorrowedFd<'_>, name: &[u8], flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cname(name)?;
    // SAFETY: valid descriptor and C string; the result is a new descriptor we own.
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode,
        )
    })?;
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the directory `name` of `dir` as an `O_PATH` descriptor (a symlink there is
/// refused with `ENOTDIR`, never followed).
pub(super) fn open_dir(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0)
}

/// Opens entry `name` of `dir` itself as an `O_PATH` descriptor (a symlink is the
/// symlink, not its target).
pub(super) fn open_path(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH, 0)
}

/// Opens directory `path` (given by the user: symlinks in it are followed).
pub(super) fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = cname(path.as_os_str().as_bytes())?;
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: valid C string; the result is a new descriptor we own.
    let fd = check(unsafe { libc::open(c.as_ptr(), flags) })?;
    // SAFETY: just returned by open.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens with `O_NOATIME` (the daemon's reads must not change what the view shows),
/// falling back to a plain open where the kernel refuses it (not the file's owner).
fn open_noatime(dir: BorrowedFd<'_>, name: &[u8], flags: i32, mode: u32) -> io::Result<OwnedFd> {
    match openat(dir, name, flags | libc::O_NOATIME, mode) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => openat(dir, name, flags, mode),
        r => r,
    }
}

/// Opens regular file `name` of `dir` for reading and writing.
pub(super) fn open_file(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    let fd = open_noatime(dir, name, libc::O_RDWR, 0)?;
    let f = File::from(fd);
    if !stat_fd(f.as_fd())?.is_file() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(f)
}

/// Opens regular file `name` of `dir` for reading.
pub(super) fn open_read(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    open_noatime(dir, name, libc::O_RDONLY, 0).map(File::from)
}

/// Creates regular file `name` in `dir` (it must not exist), open for reading and
/// writing.
pub(super) fn create_file(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<File> {
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL;
    open_noatime(dir, name, flags, mode).map(File::from)
}

/// Opens `name` of `dir` for appending, creating it if `create` (and then only if it
/// does not exist yet).
pub(super) fn open_append(dir: BorrowedFd<'_>, name: &[u8], create: bool) -> io::Result<File> {
    let mut flags = libc::O_WRONLY | libc::O_APPEND;
    if create {
        flags |= libc::O_CREAT | libc::O_EXCL;
    }
    openat(dir, name, flags, 0o600).map(File::from)
}

/// A readable descriptor of directory `dir` (for listing and fsync).
fn reopen_dir(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    open_noatime(dir, b".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// The names in directory `dir` (without `.` and `..`).
pub(super) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let fd = reopen_dir(dir)?;
    // SAFETY: fdopendir takes over the descriptor on success.
    let d = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if d.is_null() {
        return Err(last_err());
    }
    std::mem::forget(fd);
    let mut out = Vec::new();
    let r = loop {
        // SAFETY: errno is thread-local; readdir distinguishes end and error by it.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `d` is a valid DIR stream until closedir.
        let e = unsafe { libc::readdir64(d) };
        if e.is_null() {
            let err = last_err();
            break match err.raw_os_error() {
                Some(0) | None => Ok(()),
                _ => Err(err),
            };
        }
        // SAFETY: d_name is a NUL-terminated name inside the entry readdir returned.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
    };
    // SAFETY: closes the stream (and the descriptor it owns).
    unsafe { libc::closedir(d) };
    r.map(|()| out)
}

/// fsync of directory `dir`.
pub(super) fn sync_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    File::from(reopen_dir(dir)?).sync_all()
}

// ---------------------------------------------------------------- make, move, remove

pub(super) fn mkdir_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let c = cname(name)?;
    // SAFETY: valid descriptor and C string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
}

/// `mknodat` with the tar-style device number `rdev` (Linux `new_encode_dev`).
pub(super) fn mknod_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32, rdev: u32) -> io::Result<()> {
    let major = (rdev >> 8) & 0xfff;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    let c = cname(name)?;
    // SAFETY: valid descriptor and C string.
    check(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            c.as_ptr(),
            mode,
            libc::makedev(major, minor),
        )
    })
    .map(drop)
}

pub(super) fn symlink_at(target: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let (t, c) = (cname(target)?, cname(name)?);
    // SAFETY: valid descriptor and C strings.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) }).map(drop)
}

/// `renameat2(2)` (`flags`: `RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
pub(super) fn rename_at(
    from: BorrowedFd<'_>,
    name: &[u8],
    to: BorrowedFd<'_>,
    new_name: &[u8],
    flags: u32,
) -> io::Result<()> {
    let (a, b) = (cname(name)?, cname(new_name)?);
    // SAFETY: valid descriptors and C strings.
    check(unsafe {
        libc::renameat2(
            from.as_raw_fd(),
            a.as_ptr(),
            to.as_raw_fd(),
            b.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// A new hard link `to/new_name` of `from/name` (a symlink is linked itself).
pub(super) fn link_at(
    from: BorrowedFd<'_>,
    name: &[u8],
    to: BorrowedFd<'_>,
    new_name: &[u8],
) -> io::Result<()> {
    let (a, b) = (cname(name)?, cname(new_name)?);
    // SAFETY: valid descriptors and C strings.
    check(unsafe { libc::linkat(from.as_raw_fd(), a.as_ptr(), to.as_raw_fd(), b.as_ptr(), 0) })
        .map(drop)
}

/// Removes `name` from `dir` (a directory if `is_dir`).
pub(super) fn unlink_at(dir: BorrowedFd<'_>, name: &[u8], is_dir: bool) -> io::Result<()> {
    let c = cname(name)?;
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid descriptor and C string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(drop)
}

pub(super) fn read_link_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = cname(name)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: valid descriptor and C string; buf has buf.len() bytes.
    let n = check_size(unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

// ---------------------------------------------------------------- metadata

/// An upper entry to change or read metadata of: an open regular file, or any entry
/// through an `O_PATH` descriptor.
#[derive(Clone, Copy)]
pub(super) enum Obj<'a> {
    File(&'a File),
    Path(BorrowedFd<'a>),
}

impl Obj<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Obj::File(f) => f.as_fd(),
            Obj::Path(fd) => *fd,
        }
    }

    pub(super) fn stat(&self) -> io::Result<Stat> {
        stat_fd(self.fd())
    }

    /// chown; `None` leaves an id alone. A symlink itself is changed.
    pub(super) fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
        let empty = CString::default();
        // SAFETY: valid descriptor and C string.
        check(unsafe {
            libc::fchownat(
                self.fd().as_raw_fd(),
                empty.as_ptr(),
                u,
                g,
                libc::AT_EMPTY_PATH,
            )
        })
        .map(drop)
    }

    /// chmod of the permission bits; a no-op on symlinks (their mode is fixed).
    pub(super) fn chmod(&self, mode: u32) -> io::Result<()> {
        let bits = mode & 0o7777;
        match self {
            // SAFETY: valid descriptor.
            Obj::File(f) => check(unsafe { libc::fchmod(f.as_raw_fd(), bits) }).map(drop),
            Obj::Path(fd) => {
                if stat_fd(*fd)?.kind() == libc::S_IFLNK {
                    return Ok(());
                }
                let p = proc_path(*fd);
                // SAFETY: valid C string (the magic link names the inode itself).
                check(unsafe { libc::chmod(p.as_ptr(), bits) }).map(drop)
            }
        }
    }

    /// Sets atime and mtime (`None` leaves one alone); a symlink itself is changed.
    pub(super) fn set_times(
        &self,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    ) -> io::Result<()> {
        let ts = [timespec(atime), timespec(mtime)];
        let empty = CString::default();
        // SAFETY: ts holds two timespecs; valid descriptor and C string.
        check(unsafe {
            libc::utimensat(
                self.fd().as_raw_fd(),
                empty.as_ptr(),
                ts.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        })
        .map(drop)
    }

    /// The value of xattr `name`, `None` if absent.
    pub(super) fn get(&self, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let n = cname(name)?;
        let p = self.path();
        let call = |buf: *mut libc::c_void, len: usize| -> isize {
            // SAFETY: valid descriptor / C strings; buf is null with len 0 or has len bytes.
            unsafe {
                match (self, &p) {
                    (Obj::File(f), _) => libc::fgetxattr(f.as_raw_fd(), n.as_ptr(), buf, len),
                    (_, Some(p)) => libc::getxattr(p.as_ptr(), n.as_ptr(), buf, len),
                    _ => -1,
                }
            }
        };
        loop {
            let len = match check_size(call(std::ptr::null_mut(), 0)) {
                Ok(len) => len,
                Err(e) if no_xattr(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut buf = vec![0u8; len];
            match check_size(call(buf.as_mut_ptr().cast(), buf.len())) {
                Ok(got) => {
                    buf.truncate(got);
                    return Ok(Some(buf));
                }
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
                Err(e) if no_xattr(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sets xattr `name` (`flags`: `XATTR_CREATE` / `XATTR_REPLACE`).
    pub(super) fn set(&self, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
        let n = cname(name)?;
        let v = value.as_ptr().cast();
        // SAFETY: valid descriptor / C strings and a value buffer of value.len() bytes.
        let r = unsafe {
            match (self, self.path()) {
                (Obj::File(f), _) => {
                    libc::fsetxattr(f.as_raw_fd(), n.as_ptr(), v, value.len(), flags)
                }
                (_, Some(p)) => libc::setxattr(p.as_ptr(), n.as_ptr(), v, value.len(), flags),
                _ => -1,
            }
        };
        check(r).map(drop)
    }

    /// Removes xattr `name`; `false` if it was absent.
    pub(super) fn remove(&self, name: &[u8]) -> io::Result<bool> {
        let n = cname(name)?;
        // SAFETY: valid descriptor / C strings.
        let r = unsafe {
            match (self, self.path()) {
                (Obj::File(f), _) => libc::fremovexattr(f.as_raw_fd(), n.as_ptr()),
                (_, Some(p)) => libc::removexattr(p.as_ptr(), n.as_ptr()),
                _ => -1,
            }
        };
        match check(r) {
            Ok(_) => Ok(true),
            Err(e) if no_xattr(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The names of all xattrs.
    pub(super) fn list(&self) -> io::Result<Vec<Vec<u8>>> {
        let p = self.path();
        let call = |buf: *mut libc::c_char, len: usize| -> isize {
            // SAFETY: valid descriptor / C string; buf is null with len 0 or has len bytes.
            unsafe {
                match (self, &p) {
                    (Obj::File(f), _) => libc::flistxattr(f.as_raw_fd(), buf, len),
                    (_, Some(p)) => libc::listxattr(p.as_ptr(), buf, len),
                    _ => -1,
                }
            }
        };
        loop {
            let len = match check_size(call(std::ptr::null_mut(), 0)) {
                Ok(len) => len,
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let mut buf = vec![0u8; len];
            match check_size(call(buf.as_mut_ptr().cast(), buf.len())) {
                Ok(got) => {
                    buf.truncate(got);
                    return Ok(buf
                        .split(|b| *b == 0)
                        .filter(|n| !n.is_empty())
                        .map(<[u8]>::to_vec)
                        .collect());
                }
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn path(&self) -> Option<CString> {
        match self {
            Obj::File(_) => None,
            Obj::Path(fd) => Some(proc_path(*fd)),
        }
    }
}

/// An xattr that is absent (or cannot exist on this file system).
fn no_xattr(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::ENOTSUP))
}

fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(s, ns)) => libc::timespec {
            tv_sec: s,
            tv_nsec: i64::from(ns.min(999_999_999)),
        },
    }
}

/// What the upper directory has at a name.
pub(super) enum UpperEntry {
    Absent,
    Whiteout,
    /// The entry, opened as an `O_PATH` descriptor, and what `fstat` says of it.
    Present(Stat, OwnedFd),
}

/// Opens and classifies entry `name` of `dir` (never following a symlink).
pub(super) fn classify(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<UpperEntry> {
    let fd = match open_path(dir, name) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(UpperEntry::Absent),
        Err(e) => return Err(e),
    };
    let s = stat_fd(fd.as_fd())?;
    if is_whiteout(&s, fd.as_fd())? {
        return Ok(UpperEntry::Whiteout);
    }
    Ok(UpperEntry::Present(s, fd))
}

/// Whether an entry is a whiteout (an empty regular file with the marker xattr).
pub(super) fn is_whiteout(s: &Stat, fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(s.is_file() && s.size() == 0 && Obj::Path(fd).get(X_WHITEOUT)?.is_some())
}

// ---------------------------------------------------------------- data

pub(super) fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `fallocate(2)`.
pub(super) fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on a descriptor we own.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) }).map(drop)
}

/// `lseek` with `SEEK_DATA` / `SEEK_HOLE`.
pub(super) fn seek(f: &File, offset: u64, whence: i32) -> io::Result<u64> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a descriptor we own.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    u64::try_from(r).map_err(|_| last_err())
}

/// Free space of the file system holding `fd`: (free, available, free inodes), in
/// 4 KiB blocks.
pub(super) fn free_space(fd: BorrowedFd<'_>) -> Option<(u64, u64, u64)> {
    // SAFETY: an all-zero statvfs is valid; fstatvfs fills it.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out pointer.
    if unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut s) } != 0 {
        return None;
    }
    let scale = |b: u64| b.saturating_mul(s.f_frsize) / 4096;
    Some((scale(s.f_bfree), scale(s.f_bavail), s.f_ffree))
}

/// Raises the soft limit of open descriptors to the hard limit (a view holds one per
/// open upper file and a bounded cache of directory descriptors).
pub(super) fn raise_fd_limit() {
    // SAFETY: an all-zero rlimit is valid; getrlimit fills it.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer / in pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Takes an exclusive flock on `f`, retrying for up to `patience`.
pub(super) fn lock_exclusive(f: &File, patience: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + patience;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `dir/name` for messages (the upper directory is never reached through it).
pub(super) fn shown(dir: &Path, name: &[u8]) -> PathBuf {
    dir.join(std::ffi::OsStr::from_bytes(name))
}
