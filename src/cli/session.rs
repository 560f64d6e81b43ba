//! Mounting glue: as root, snapfs mounts `/dev/fuse` itself and hands the fd to fuser.
//! fuser's own mount unmounts the path again when its session ends (fuser issue #658),
//! which, after an external `umount`, can tear down a *new* mount made meanwhile on the
//! same path. Owning the mount avoids that; unprivileged users go through fuser
//! (and fusermount3) as before.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use fuser::{Config, Filesystem, MountOption, Session, SessionACL};

use crate::error::{Error, Result};

/// Mounts `fs` on `mountpoint` with `config` and returns the session.
pub fn mount<FS: Filesystem>(fs: FS, mountpoint: &Path, config: &Config) -> Result<Session<FS>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || config.mount_options.contains(&MountOption::AutoUnmount) {
        return Session::new(fs, mountpoint, config)
            .map_err(|e| Error::io("cannot mount on", mountpoint, e));
    }
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| Error::io("cannot open", "/dev/fuse", e))?;
    let fd: OwnedFd = dev.into();
    let (flags, data, source) = mount_args(config, fd.as_raw_fd(), mountpoint)?;
    let c = |s: &[u8]| {
        CString::new(s).map_err(|_| Error::Usage("mount option contains a NUL byte".into()))
    };
    let target = c(mountpoint.as_os_str().as_bytes())?;
    let source = c(source.as_bytes())?;
    let fstype = c(b"fuse.snapfs")?;
    let data = c(data.as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(Error::io(
            "cannot mount on",
            mountpoint,
            std::io::Error::last_os_error(),
        ));
    }
    Session::from_fd(fs, fd, config.acl, config.clone()).map_err(|e| {
        // SAFETY: target is a valid path; detach what we just mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        Error::io("FUSE handshake failed on", mountpoint, e)
    })
}

/// Kernel mount flags, the fuse mount data string and the source name.
fn mount_args(
    config: &Config,
    fd: i32,
    mountpoint: &Path,
) -> Result<(libc::c_ulong, String, String)> {
    let mut flags: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!("fd={fd},rootmode=40000,user_id={uid},group_id={gid}");
    let mut source = String::from("snapfs");
    if config.acl != SessionACL::Owner {
        data.push_str(",allow_other");
    }
    for opt in &config.mount_options {
        match opt {
            MountOption::FSName(n) => source = n.replace(',', "_"),
            MountOption::Subtype(_) | MountOption::AutoUnmount | MountOption::Async => {}
            MountOption::DefaultPermissions => data.push_str(",default_permissions"),
            MountOption::Dev => flags &= !libc::MS_NODEV,
            MountOption::NoDev => flags |= libc::MS_NODEV,
            MountOption::Suid => flags &= !libc::MS_NOSUID,
            MountOption::NoSuid => flags |= libc::MS_NOSUID,
            MountOption::RO => flags |= libc::MS_RDONLY,
            MountOption::RW => flags &= !libc::MS_RDONLY,
            MountOption::Exec => flags &= !libc::MS_NOEXEC,
            MountOption::NoExec => flags |= libc::MS_NOEXEC,
            MountOption::Atime => flags &= !libc::MS_NOATIME,
            MountOption::NoAtime => flags |= libc::MS_NOATIME,
            MountOption::DirSync => flags |= libc::MS_DIRSYNC,
            MountOption::Sync => flags |= libc::MS_SYNCHRONOUS,
            MountOption::CUSTOM(s) => {
                if s.contains(',') || s.is_empty() {
                    return Err(Error::Usage(format!(
                        "bad mount option {s:?} for {}",
                        mountpoint.display()
                    )));
                }
                data.push(',');
                data.push_str(s);
            }
        }
    }
    Ok((flags, data, source))
}
