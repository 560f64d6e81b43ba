//! What is mounted where, for the service: the mount on a path (from
//! `/proc/self/mountinfo`), whether a FUSE mount's daemon is gone (ENOTCONN), and
//! detaching such stale mounts before a view is mounted there again.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let o = &b[i + 1..i + 4];
            if o.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = o.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// The file system type of the topmost mount on `path` in mountinfo `text`.
fn fstype_in(text: &str, path: &Path) -> Option<String> {
    text.lines()
        .rev()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            (unescape(point) == path).then(|| fstype.to_string())
        })
        .next()
}

/// The file system type of the topmost mount on `path`, if something is mounted there.
pub fn mounted_at(path: &Path) -> Result<Option<String>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("cannot read", "/proc/self/mountinfo", e))?;
    Ok(fstype_in(&text, path))
}

/// Whether the FUSE mount on `path` lost its daemon: `statfs` always reaches the
/// daemon and fails with ENOTCONN once it is gone.
pub fn is_stale(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c is a valid NUL-terminated path and st a writable statfs buffer.
    let rc = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st)
    };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

/// Detaches every stale mount stacked on `path` (a service killed with views
/// mounted leaves them); returns how many. A live mount there is left alone.
pub fn clean_stale(path: &Path) -> Result<usize> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Usage(format!("mountpoint {} has a NUL byte", path.display())))?;
    let mut n = 0;
    // Bounded: each round removes one mount (mounts may be stacked).
    while n < 64 && mounted_at(path)?.is_some() && is_stale(path) {
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(Error::io(
                "cannot detach stale mount",
                path,
                std::io::Error::last_os_error(),
            ));
        }
        log::info!("detached the stale mount on {}", path.display());
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_topmost_mount_on_a_path() {
        let text = "\
42 27 0:39 / /tmp/a\\040b ro,nosuid - fuse.snapfs snapfs:/srv/a.tar ro,user_id=0
43 27 0:40 / /mnt/x rw - tmpfs tmpfs rw
44 43 0:41 / /mnt/x rw - fuse.snapfs snapfs:/srv/b.tar rw
";
        assert_eq!(
            fstype_in(text, Path::new("/tmp/a b")).as_deref(),
            Some("fuse.snapfs")
        );
        assert_eq!(
            fstype_in(text, Path::new("/mnt/x")).as_deref(),
            Some("fuse.snapfs")
        );
        assert_eq!(fstype_in(text, Path::new("/mnt")), None);
    }
}
