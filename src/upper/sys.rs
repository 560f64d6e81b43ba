//! The system-call wrappers of the upper directory: xattrs, times, owners, modes,
//! device nodes; most of the upper tree's `unsafe` lives here.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::layout::X_WHITEOUT;
use crate::error::Error;
use crate::index::tree::{Attr, SetTime};

pub(super) fn errno(e: i32) -> Error {
    Error::Errno(e)
}

pub(super) fn ioerr<'a>(what: &'static str, p: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |e| Error::io(what, p, e)
}

pub(super) fn last_err() -> io::Error {
    io::Error::last_os_error()
}

pub(super) fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub(super) fn cbytes(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

// ---------------------------------------------------------------- xattrs, syscalls

/// Where an xattr call goes: a path (never followed) or an open file.
#[derive(Clone, Copy)]
pub(super) enum At<'a> {
    Path(&'a Path),
    Fd(&'a File),
}

impl At<'_> {
    pub(super) fn get(&self, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let n = cbytes(name)?;
        let p = match self {
            At::Path(p) => Some(cpath(p)?),
            At::Fd(_) => None,
        };
        let call = |buf: *mut libc::c_void, len: usize| -> isize {
            // SAFETY: valid C strings; buf is null with len 0 or points to len bytes.
            unsafe {
                match (self, &p) {
                    (At::Path(_), Some(p)) => libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf, len),
                    (At::Fd(f), _) => libc::fgetxattr(f.as_raw_fd(), n.as_ptr(), buf, len),
                    _ => -1,
                }
            }
        };
        loop {
            let len = call(std::ptr::null_mut(), 0);
            if len < 0 {
                let e = last_err();
                return match e.raw_os_error() {
                    Some(libc::ENODATA) => Ok(None),
                    _ => Err(e),
                };
            }
            let mut buf = vec![0u8; len as usize];
            let got = call(buf.as_mut_ptr().cast(), buf.len());
            if got < 0 {
                let e = last_err();
                match e.raw_os_error() {
                    Some(libc::ERANGE) => continue,
                    Some(libc::ENODATA) => return Ok(None),
                    _ => return Err(e),
                }
            }
            buf.truncate(got as usize);
            return Ok(Some(buf));
        }
    }

    pub(super) fn set(&self, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
        let n = cbytes(name)?;
        let v = value.as_ptr().cast();
        // SAFETY: valid C strings and a value buffer of value.len() bytes.
        let r = unsafe {
            match self {
                At::Path(p) => {
                    let p = cpath(p)?;
                    libc::lsetxattr(p.as_ptr(), n.as_ptr(), v, value.len(), flags)
                }
                At::Fd(f) => libc::fsetxattr(f.as_raw_fd(), n.as_ptr(), v, value.len(), flags),
            }
        };
        if r < 0 {
            return Err(last_err());
        }
        Ok(())
    }

    /// Removes `name`; `false` if it was absent.
    pub(super) fn remove(&self, name: &[u8]) -> io::Result<bool> {
        let n = cbytes(name)?;
        // SAFETY: valid C strings.
        let r = unsafe {
            match self {
                At::Path(p) => {
                    let p = cpath(p)?;
                    libc::lremovexattr(p.as_ptr(), n.as_ptr())
                }
                At::Fd(f) => libc::fremovexattr(f.as_raw_fd(), n.as_ptr()),
            }
        };
        if r < 0 {
            let e = last_err();
            return match e.raw_os_error() {
                Some(libc::ENODATA) => Ok(false),
                _ => Err(e),
            };
        }
        Ok(true)
    }

    pub(super) fn list(&self) -> io::Result<Vec<Vec<u8>>> {
        let p = match self {
            At::Path(p) => Some(cpath(p)?),
            At::Fd(_) => None,
        };
        let call = |buf: *mut libc::c_char, len: usize| -> isize {
            // SAFETY: valid C string; buf is null with len 0 or points to len bytes.
            unsafe {
                match (self, &p) {
                    (At::Path(_), Some(p)) => libc::llistxattr(p.as_ptr(), buf, len),
                    (At::Fd(f), _) => libc::flistxattr(f.as_raw_fd(), buf, len),
                    _ => -1,
                }
            }
        };
        loop {
            let len = call(std::ptr::null_mut(), 0);
            if len < 0 {
                let e = last_err();
                return match e.raw_os_error() {
                    Some(libc::ENOTSUP) => Ok(Vec::new()),
                    _ => Err(e),
                };
            }
            let mut buf = vec![0u8; len as usize];
            let got = call(buf.as_mut_ptr().cast(), buf.len());
            if got < 0 {
                let e = last_err();
                if e.raw_os_error() == Some(libc::ERANGE) {
                    continue;
                }
                return Err(e);
            }
            buf.truncate(got as usize);
            return Ok(buf
                .split(|b| *b == 0)
                .filter(|n| !n.is_empty())
                .map(<[u8]>::to_vec)
                .collect());
        }
    }
}

pub(super) fn timespec(t: Option<SetTime>) -> libc::timespec {
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
            tv_sec: s as libc::time_t,
            tv_nsec: i64::from(ns) as _,
        },
    }
}

pub(super) fn set_times(
    at: At<'_>,
    atime: Option<SetTime>,
    mtime: Option<SetTime>,
) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: ts holds two timespecs; the path is a valid C string.
    let r = unsafe {
        match at {
            At::Path(p) => {
                let c = cpath(p)?;
                libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    ts.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            }
            At::Fd(f) => libc::futimens(f.as_raw_fd(), ts.as_ptr()),
        }
    };
    if r < 0 {
        return Err(last_err());
    }
    Ok(())
}

pub(super) fn chown(at: At<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
    // SAFETY: plain syscalls on a valid C string or fd.
    let r = unsafe {
        match at {
            At::Path(p) => libc::lchown(cpath(p)?.as_ptr(), u, g),
            At::Fd(f) => libc::fchown(f.as_raw_fd(), u, g),
        }
    };
    if r < 0 {
        return Err(last_err());
    }
    Ok(())
}

/// chmod; a no-op on symlinks (their mode is fixed).
pub(super) fn chmod(at: At<'_>, mode: u32, is_link: bool) -> io::Result<()> {
    if is_link {
        return Ok(());
    }
    // SAFETY: plain syscalls on a valid C string or fd.
    let r = unsafe {
        match at {
            At::Path(p) => libc::chmod(cpath(p)?.as_ptr(), mode & 0o7777),
            At::Fd(f) => libc::fchmod(f.as_raw_fd(), mode & 0o7777),
        }
    };
    if r < 0 {
        return Err(last_err());
    }
    Ok(())
}

pub(super) fn lstat(p: &Path) -> io::Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(p) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) fn open_file(p: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
}

pub(super) fn sync_dir(p: &Path) -> io::Result<()> {
    File::open(p)?.sync_all()
}

/// What the upper layer has at a path.
pub(super) enum UpperEntry {
    Absent,
    Whiteout,
    Present(std::fs::Metadata),
}

pub(super) fn classify(p: &Path) -> io::Result<UpperEntry> {
    Ok(match lstat(p)? {
        None => UpperEntry::Absent,
        Some(m) if m.is_file() && m.len() == 0 && At::Path(p).get(X_WHITEOUT)?.is_some() => {
            UpperEntry::Whiteout
        }
        Some(m) => UpperEntry::Present(m),
    })
}

pub(super) fn attr_of(ino: u64, m: &std::fs::Metadata) -> Attr {
    Attr {
        ino,
        mode: m.mode(),
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        blocks: m.blocks(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec() as u32,
        atime: m.atime(),
        atime_nsec: m.atime_nsec() as u32,
        ctime: m.ctime(),
        ctime_nsec: m.ctime_nsec() as u32,
        rdev: m.rdev() as u32,
        implicit: false,
    }
}

pub(super) fn mknod(p: &Path, mode: u32, rdev: u32) -> io::Result<()> {
    let major = (rdev >> 8) & 0xfff;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    let c = cpath(p)?;
    // SAFETY: valid C string.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) };
    if r < 0 {
        return Err(last_err());
    }
    Ok(())
}

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

/// How long opening an upper dir waits for another holder to let go: a daemon whose
/// view was just unmounted with plain `umount` still holds the lock for a moment
/// while it exits.
pub(super) const UPPER_LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes an exclusive flock on `f`, retrying for up to `patience`.
pub(super) fn lock_exclusive(f: &File, patience: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + patience;
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
