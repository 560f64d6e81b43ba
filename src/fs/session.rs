//! Mounting a tree: [`MountOptions`] (what `-o` and the view ask for, in snapfs's own
//! terms), the mount itself and the [`Session`] that serves it until it is unmounted.
//!
//! As root, snapfs mounts `/dev/fuse` itself and hands the fd to fuser. fuser's own
//! mount unmounts the path again when its session ends (fuser issue #658), which,
//! after an external `umount`, can tear down a *new* mount made meanwhile on the same
//! path. Owning the mount avoids that; unprivileged users go through fuser (and
//! fusermount3) as before.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use fuser::{Config, Filesystem, MountOption, SessionACL};

use crate::error::{Error, Result};
use crate::fs::SnapFs;
use crate::index::tree::{DynTree, Tree};

/// Who besides the mounting user may enter a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Access {
    /// Only the user who mounted it (FUSE's default).
    #[default]
    Owner,
    /// That user and root (`allow_root`).
    RootAndOwner,
    /// Everyone (`allow_other`); the kernel checks modes (`default_permissions`).
    All,
}

/// How a tree is mounted, in snapfs's terms (no fuser types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// The source name mountinfo shows, e.g. `snapfs:/srv/a.tar.gz`.
    pub fsname: String,
    /// Mount read-only (`MS_RDONLY`).
    pub read_only: bool,
    /// Who may enter.
    pub access: Access,
    /// Honour setuid bits (default off: `nosuid`).
    pub suid: bool,
    /// Honour device nodes (default off: `nodev`).
    pub dev: bool,
    /// `noexec`.
    pub noexec: bool,
    /// Let the kernel unmount when the daemon dies (fusermount's `auto_unmount`).
    pub auto_unmount: bool,
    /// Other options passed to the kernel's fuse mount data as they are.
    pub other: Vec<String>,
    /// Worker threads serving requests.
    pub threads: usize,
    /// FUSE passthrough of whole upper files where the kernel allows it (writable
    /// views; `no_passthrough` turns it off).
    pub passthrough: bool,
}

/// FUSE worker threads of a view that does not say: one per core (2 to 8) for a
/// read-only view of local archives, whose requests wait on the cores and a local disk;
/// 8 for a writable view or a remote source (requests wait on fsync or the network).
/// Each sleeping worker is woken by the kernel for a request (on another CPU: an
/// inter-processor wakeup, costly on a VM); no more workers than cores find requests
/// queued: 8 processes reading the 100,000 small files of a tar took 2.4-2.8 s with 2
/// workers on a 2-core VM, 3.5-3.9 s with 8 (native: 2.9-3.1 s). One process: the same
/// for a tar and a tar.gz, the tar.zst walk 6-10% slower (docs/BENCHMARKS.md, issue 15
/// round eleven).
pub fn default_threads(writable: bool, local: bool) -> usize {
    if writable || !local {
        return 8;
    }
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

impl MountOptions {
    /// Options for a view named `fsname` from the comma-separated `-o` strings
    /// (`allow_other`, `allow_root`, `ro`, `rw`, `suid`, `nosuid`, `dev`, `nodev`,
    /// `exec`, `noexec`, `auto_unmount`, `passthrough`, `no_passthrough`, others passed
    /// on). A view is read-only unless
    /// `writable`; `ro` makes a writable view read-only too.
    pub fn parse(fsname: String, options: &[String], writable: bool, threads: usize) -> Self {
        let mut m = MountOptions {
            fsname,
            read_only: !writable,
            access: Access::Owner,
            suid: false,
            dev: false,
            noexec: false,
            auto_unmount: false,
            other: Vec::new(),
            threads: threads.clamp(1, 64),
            passthrough: true,
        };
        for opt in options
            .iter()
            .flat_map(|o| o.split(','))
            .filter(|o| !o.is_empty())
        {
            match opt {
                "allow_other" => m.access = Access::All,
                "allow_root" => m.access = Access::RootAndOwner,
                "default_permissions" => {}
                "ro" => m.read_only = true,
                // mount(8) says rw unless told ro; a view without an upper dir stays
                // read-only.
                "rw" => {}
                "auto_unmount" => m.auto_unmount = true,
                "dev" => m.dev = true,
                "nodev" => m.dev = false,
                "suid" => m.suid = true,
                "nosuid" => m.suid = false,
                "exec" => m.noexec = false,
                "noexec" => m.noexec = true,
                "passthrough" => m.passthrough = true,
                "no_passthrough" | "nopassthrough" => m.passthrough = false,
                other => m.other.push(other.to_string()),
            }
        }
        m
    }

    fn fuser_config(&self) -> Config {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(self.fsname.clone()),
            MountOption::Subtype("snapfs".into()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
            if self.dev {
                MountOption::Dev
            } else {
                MountOption::NoDev
            },
            if self.suid {
                MountOption::Suid
            } else {
                MountOption::NoSuid
            },
        ];
        if self.read_only {
            config.mount_options.insert(0, MountOption::RO);
        }
        if self.noexec {
            config.mount_options.push(MountOption::NoExec);
        }
        if self.auto_unmount {
            config.mount_options.push(MountOption::AutoUnmount);
        }
        for o in &self.other {
            config.mount_options.push(MountOption::CUSTOM(o.clone()));
        }
        config.acl = match self.access {
            Access::Owner => SessionACL::Owner,
            Access::RootAndOwner => SessionACL::RootAndOwner,
            Access::All => SessionACL::All,
        };
        config.n_threads = Some(self.threads);
        config.clone_fd = true;
        config
    }
}

/// A mounted tree, served by [`Session::run`] until it is unmounted.
pub struct Session {
    inner: fuser::Session<SnapFs<DynTree>>,
    mountpoint: PathBuf,
}

/// Unmounts a [`Session`] from another thread (a signal handler thread, a service).
pub struct Unmounter {
    inner: fuser::SessionUnmounter,
    target: CString,
}

impl Unmounter {
    /// Detaches the mount (lazily: open files keep working until closed); the
    /// session's [`Session::run`] then returns.
    pub fn unmount(&mut self) -> Result<()> {
        // Our own mount (as root) is detached directly; fuser's through its unmounter.
        // SAFETY: target is a valid NUL-terminated path.
        if unsafe { libc::umount2(self.target.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(self.target.as_bytes()));
        self.inner
            .unmount()
            .map_err(|e| Error::io("cannot unmount", path, e))
    }
}

impl Unmounter {
    /// Unmounts now unless the mount is busy (files open, a process inside it):
    /// then [`Error::Busy`] and the mount stays. A mount already gone is fine.
    pub fn unmount_unless_busy(&mut self) -> Result<()> {
        // SAFETY: target is a valid NUL-terminated path.
        if unsafe { libc::umount2(self.target.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(self.target.as_bytes()));
        match err.raw_os_error() {
            Some(libc::EBUSY) => Err(Error::Busy { path }),
            Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
            // Not ours to unmount (fusermount mounted it): fuser's unmounter.
            Some(libc::EPERM) => self
                .inner
                .unmount()
                .map_err(|e| Error::io("cannot unmount", path, e)),
            _ => Err(Error::io("cannot unmount", path, err)),
        }
    }
}

/// A session served on a thread of its own, so that one process can serve many
/// (the service's views).
pub struct Served {
    unmounter: Unmounter,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl Served {
    /// Whether the session has ended (its mount went away).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Unmounts: lazily (detached now, open files served until closed), or now
    /// unless busy ([`Error::Busy`], the mount stays).
    pub fn unmount(&mut self, lazy: bool) -> Result<()> {
        if lazy {
            self.unmounter.unmount()
        } else {
            self.unmounter.unmount_unless_busy()
        }
    }

    /// Waits until the session has ended and its tree is dropped; how it ended.
    pub fn join(self) -> Result<()> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("a FUSE session thread panicked".into())))
    }
}

impl Session {
    /// Serves on a new thread named `name`. Once the session has ended (the mount
    /// went away) and its tree is dropped, `on_exit` runs on that thread with the
    /// result.
    pub fn spawn(
        mut self,
        name: String,
        on_exit: impl FnOnce(&Result<()>) + Send + 'static,
    ) -> Result<Served> {
        let unmounter = self.unmounter()?;
        let mut cleanup = self.unmounter()?;
        let mountpoint = self.mountpoint.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let r = self.run();
            on_exit(&r);
            r
        });
        match thread {
            Ok(thread) => Ok(Served { unmounter, thread }),
            Err(e) => {
                let _ = cleanup.unmount();
                Err(Error::io("cannot start a thread to serve", mountpoint, e))
            }
        }
    }

    /// Mounts `tree` on `mountpoint`.
    pub fn mount(tree: Box<dyn Tree>, mountpoint: &Path, options: &MountOptions) -> Result<Self> {
        let fs = SnapFs::new(DynTree(tree)).with_passthrough(options.passthrough);
        let notifier = fs.notifier_slot();
        let inner = mount(fs, mountpoint, &options.fuser_config())?;
        let _ = notifier.set(inner.notifier());
        Ok(Session {
            inner,
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// A handle that unmounts this session from another thread.
    pub fn unmounter(&mut self) -> Result<Unmounter> {
        let target = CString::new(self.mountpoint.as_os_str().as_bytes())
            .map_err(|_| Error::Usage("mountpoint contains a NUL byte".into()))?;
        Ok(Unmounter {
            inner: self.inner.unmount_callable(),
            target,
        })
    }

    /// Serves requests until the mount goes away.
    pub fn run(self) -> Result<()> {
        let mountpoint = self.mountpoint;
        self.inner
            .run()
            .map_err(|e| Error::io("FUSE session failed on", mountpoint, e))
    }
}

/// Mounts `fs` on `mountpoint` with `config` and returns the session.
fn mount<FS: Filesystem>(fs: FS, mountpoint: &Path, config: &Config) -> Result<fuser::Session<FS>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || config.mount_options.contains(&MountOption::AutoUnmount) {
        return fuser::Session::new(fs, mountpoint, config)
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
    fuser::Session::from_fd(fs, fd, config.acl, config.clone()).map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_one_per_core_only_for_read_only_local_views() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert_eq!(default_threads(false, true), cores.clamp(2, 8));
        assert_eq!(default_threads(true, true), 8, "writable");
        assert_eq!(default_threads(false, false), 8, "remote");
        assert_eq!(default_threads(true, false), 8);
        let given = MountOptions::parse("snapfs:x".into(), &[], false, 100);
        assert_eq!(given.threads, 64, "an explicit count is capped");
    }
}
