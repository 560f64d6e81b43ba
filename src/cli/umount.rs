//! `snapfs umount`: unmount a snapfs mount, including a stale one whose daemon died.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::Args;

use crate::error::{Error, Result};

/// Arguments of `snapfs umount`.
#[derive(Args, Debug)]
pub struct UmountArgs {
    /// The mountpoint.
    mountpoint: PathBuf,
    /// Detach even if busy (lazy unmount).
    #[arg(short, long)]
    lazy: bool,
}

/// Runs `snapfs umount`.
pub fn run(args: UmountArgs) -> Result<ExitCode> {
    // Do not canonicalize: a dead FUSE mount fails stat with ENOTCONN.
    let path = if args.mountpoint.is_absolute() {
        args.mountpoint.clone()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io("cannot resolve", &args.mountpoint, e))?
            .join(&args.mountpoint)
    };
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Usage(format!("invalid mountpoint {}", path.display())))?;
    let flags = if args.lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EPERM) => fusermount(&path, args.lazy),
        Some(libc::EBUSY) => Err(Error::Usage(format!(
            "{} is busy (files open or a process inside it); close them or use --lazy",
            path.display()
        ))),
        Some(libc::EINVAL) => Err(Error::Usage(format!(
            "{} is not a mountpoint",
            path.display()
        ))),
        _ => Err(Error::io("cannot unmount", &path, err)),
    }
}

/// Unprivileged users unmount through the setuid helper.
fn fusermount(path: &std::path::Path, lazy: bool) -> Result<ExitCode> {
    let flag = if lazy { "-uz" } else { "-u" };
    for helper in ["fusermount3", "fusermount"] {
        match Command::new(helper).arg(flag).arg(path).status() {
            Ok(s) if s.success() => return Ok(ExitCode::SUCCESS),
            Ok(_) => {
                return Err(Error::Usage(format!(
                    "{helper} could not unmount {}",
                    path.display()
                )))
            }
            Err(_) => continue,
        }
    }
    Err(Error::Usage(format!(
        "cannot unmount {}: not root and no fusermount3 found",
        path.display()
    )))
}
