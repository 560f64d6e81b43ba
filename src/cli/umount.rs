//! `snapfs umount`: unmount a snapfs mount, including a stale one whose daemon died,
//! and wait until the daemon behind it has exited, so that its upper dir is released
//! and `snapfs umount X && snapfs commit ...` never races the exiting daemon.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Args;

use crate::error::{Error, Result};
use crate::service::{client, Request};

/// Arguments of `snapfs umount`.
#[derive(Args, Debug)]
pub struct UmountArgs {
    /// The mountpoint.
    mountpoint: PathBuf,
    /// Detach even if busy (lazy unmount). Does not wait for the daemon, which
    /// serves open files until they are closed.
    #[arg(short, long)]
    lazy: bool,
    /// How long to wait for the daemon to exit after the unmount (seconds).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    wait: u64,
    /// The snapfs service whose view this may be [default: $SNAPFS_SERVICE, and
    /// every running `snapfs serve`]; a service's view is removed through it.
    #[arg(long, value_name = "SOCKET")]
    service: Option<PathBuf>,
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
    if let Some(socket) = service_of(&path, args.service.as_deref()) {
        let remove = Request::Remove {
            key: None,
            mountpoint: Some(path),
            lazy: args.lazy,
        };
        client::call(&socket, &remove)?;
        return Ok(ExitCode::SUCCESS);
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Usage(format!("invalid mountpoint {}", path.display())))?;
    // Taken before the unmount: afterwards the daemon's mount is gone and a reused
    // pid could not be told apart. A pidfd keeps naming the same process.
    let daemons = if args.lazy {
        Vec::new()
    } else {
        daemon_pidfds(&path)
    };
    let flags = if args.lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated path.
    let unmounted = if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(ExitCode::SUCCESS)
    } else {
        unmount_error(&path, args.lazy, std::io::Error::last_os_error())
    };
    if unmounted.is_ok() {
        wait_for_exit(&path, daemons, Duration::from_secs(args.wait));
    }
    unmounted
}

/// The socket of the service that has a view on `path` (as given, or with its parent
/// resolved), if any service found has one.
fn service_of(path: &Path, explicit: Option<&Path>) -> Option<PathBuf> {
    let resolved = match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => p.canonicalize().ok().map(|p| p.join(n)),
        _ => None,
    };
    super::list::service_sockets(explicit)
        .into_iter()
        .find(|socket| {
            client::call(socket, &Request::List {})
                .ok()
                .and_then(|r| r.views)
                .is_some_and(|views| {
                    views.iter().any(|v| {
                        v.config.mountpoint == path
                            || Some(&v.config.mountpoint) == resolved.as_ref()
                    })
                })
        })
}

/// The daemons serving `path`, as pidfds. The daemon's command line carries the
/// canonical mountpoint; `path` is tried as given and with its parent canonicalized
/// (the mountpoint itself is not resolved: that could block on a hung mount).
fn daemon_pidfds(path: &Path) -> Vec<(u32, OwnedFd)> {
    let mut pids = super::list::daemon_pids(path);
    if pids.is_empty() {
        if let (Some(parent), Some(name)) = (path.parent(), path.file_name()) {
            if let Ok(p) = parent.canonicalize() {
                pids = super::list::daemon_pids(&p.join(name));
            }
        }
    }
    pids.into_iter()
        .filter_map(|pid| {
            // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
            // SAFETY: a non-negative return is a fresh fd that nothing else owns.
            (fd >= 0).then(|| (pid, unsafe { OwnedFd::from_raw_fd(fd as i32) }))
        })
        .collect()
}

/// Waits until the daemon of the mount just removed from `path` has exited (a pidfd
/// polls readable then), for at most `limit`; warns if it is still running.
///
/// `daemons` are every daemon whose command line names `path`; the mounts still
/// stacked there (made by other tools, or before snapfs refused stacking) keep theirs.
/// So the wait ends once no more of them are alive than mounts are left at `path`.
fn wait_for_exit(path: &Path, daemons: Vec<(u32, OwnedFd)>, limit: Duration) {
    if daemons.is_empty() {
        return;
    }
    let left_mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| {
            super::list::types_at(&t, path)
                .iter()
                .filter(|t| t.as_str() == "fuse.snapfs")
                .count()
        })
        .unwrap_or(0);
    let deadline = Instant::now() + limit;
    let mut alive: Vec<&(u32, OwnedFd)> = daemons.iter().collect();
    while alive.len() > left_mounted {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut fds: Vec<libc::pollfd> = alive
            .iter()
            .map(|(_, fd)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: fds is a valid array of pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
        let mut still = fds.iter().map(|p| p.revents == 0);
        alive.retain(|_| still.next().unwrap_or(true));
    }
    if alive.len() <= left_mounted {
        return;
    }
    let running: Vec<String> = alive.iter().map(|(pid, _)| pid.to_string()).collect();
    eprintln!(
        "snapfs: {} is unmounted, but its daemon (pid {}) is still running after {} s",
        path.display(),
        running.join(", "),
        limit.as_secs()
    );
}

/// Maps a failed umount2(2) to a readable error, or unmounts through fusermount
/// when the kernel refused because we are not root.
fn unmount_error(path: &Path, lazy: bool, err: std::io::Error) -> Result<ExitCode> {
    let path = path.to_path_buf();
    match err.raw_os_error() {
        Some(libc::EPERM) => fusermount(&path, lazy),
        Some(libc::EBUSY) => Err(Error::Busy { path }),
        Some(libc::EINVAL) => Err(Error::NotA {
            path,
            expected: "mountpoint",
            detail: None,
        }),
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
                return Err(Error::Daemon(format!(
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
