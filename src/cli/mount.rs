//! `snapfs mount`: load or build the index, then serve it over FUSE. Without
//! `--foreground` the command re-executes itself as a detached daemon and returns only
//! once the daemon reports the mount live (or prints the daemon's one-line error).
//! With `--upper DIR` the view is writable: the read-only tree is wrapped in an
//! [`UpperTree`] that records changes in DIR, and the mount is not `ro`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use clap::Args;
use fuser::{Config, MountOption, SessionACL};

use crate::archive::Archive;
use crate::error::{Error, Result};
use crate::fs::SnapFs;
use crate::index::build::BuildOptions;
use crate::index::store;
use crate::index::tree::DynTree;
use crate::upper::UpperTree;

/// Arguments of `snapfs mount`.
#[derive(Args, Debug)]
pub struct MountArgs {
    /// The archive (tar, tar.gz or tar.zst) followed by the mountpoint.
    #[arg(required = true, num_args = 2.., value_name = "ARCHIVE... MOUNTPOINT")]
    paths: Vec<PathBuf>,
    /// Stay in the foreground (logs to stderr; Ctrl-C unmounts).
    #[arg(short, long)]
    foreground: bool,
    /// FUSE mount options, comma separated (allow_other, allow_root, ...).
    #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Cap of the decompressed-span cache.
    #[arg(long, value_parser = super::parse_size, default_value = "256M")]
    cache_size: u64,
    /// Uncompressed bytes between seek points when an index has to be built.
    #[arg(long, value_parser = super::parse_size, default_value = "4M")]
    span: u64,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Make the view writable, recording every change in DIR (created if missing;
    /// mount with the same DIR again to get the same view back).
    #[arg(long, value_name = "DIR")]
    upper: Option<PathBuf>,
    /// Internal: file descriptor on which the daemon reports readiness.
    #[arg(long, hide = true)]
    ready_fd: Option<i32>,
}

/// Runs `snapfs mount`.
pub fn run(args: MountArgs) -> Result<ExitCode> {
    let (archives, mountpoint) = split_paths(&args.paths)?;
    for a in archives {
        super::check_archive(a)?;
    }
    match std::fs::metadata(mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Usage(format!(
                "mountpoint {} is not a directory",
                mountpoint.display()
            )))
        }
        Err(e) => return Err(Error::io("cannot use mountpoint", mountpoint, e)),
    }
    if let Some(u) = &args.upper {
        std::fs::create_dir_all(u).map_err(|e| Error::io("cannot create upper dir", u, e))?;
    }
    if args.foreground || args.ready_fd.is_some() {
        let ready = args.ready_fd.map(|fd| {
            // SAFETY: the parent passed us this fd, open and owned by nobody else here.
            unsafe { File::from(OwnedFd::from_raw_fd(fd)) }
        });
        return serve(&args, archives, mountpoint, ready);
    }
    // Build or refresh the indexes here, where a progress bar and warnings can be seen.
    let opts = BuildOptions {
        span_bytes: args.span.max(64 << 10),
    };
    for path in archives {
        let archive = Archive::open(path)?;
        if store::find_current(&archive).is_some() {
            continue;
        }
        if crate::snapshot::read_embedded(&archive)?.is_some() {
            continue;
        }
        let (index, _) = super::index::obtain(&archive, &opts, None, false)?;
        store::cache_file_for(&archive, &index)?;
    }
    daemonize(&args.paths, &args)
}

fn split_paths(paths: &[PathBuf]) -> Result<(&[PathBuf], &Path)> {
    match paths.split_last() {
        Some((m, a)) if !a.is_empty() => Ok((a, m.as_path())),
        _ => Err(Error::Usage(
            "usage: snapfs mount [OPTIONS] <ARCHIVE>... <MOUNTPOINT>".into(),
        )),
    }
}

/// Starts the daemon and waits for its verdict on a pipe.
fn daemonize(paths: &[PathBuf], args: &MountArgs) -> Result<ExitCode> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io(
            "cannot create pipe for",
            &paths[0],
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both fds were just created and are owned here only.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let exe = std::env::current_exe()
        .map_err(|e| Error::io("cannot find own executable", "snapfs", e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg("--ready-fd")
        .arg(write_end.as_raw_fd().to_string())
        .arg("--cache-size")
        .arg(args.cache_size.to_string())
        .arg("--span")
        .arg(args.span.to_string())
        .arg("--threads")
        .arg(args.threads.to_string());
    for o in &args.options {
        cmd.arg("-o").arg(o);
    }
    if let Some(u) = &args.upper {
        cmd.arg("--upper")
            .arg(std::fs::canonicalize(u).unwrap_or_else(|_| u.clone()));
    }
    cmd.args(
        paths
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.current_dir("/");
    let fd = write_end.as_raw_fd();
    // SAFETY: between fork and exec we only call async-signal-safe functions.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Let the readiness fd survive exec.
            let flags = libc::fcntl(fd, libc::F_GETFD);
            libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io("cannot start daemon for", &paths[0], e))?;
    drop(write_end);
    let mut msg = String::new();
    let _ = File::from(read_end).read_to_string(&mut msg);
    if msg.starts_with("ok") {
        return Ok(ExitCode::SUCCESS);
    }
    let _ = child.wait();
    let msg = msg.trim();
    if msg.is_empty() {
        Err(Error::Usage(format!(
            "snapfs daemon for {} exited before the mount was live",
            paths[0].display()
        )))
    } else {
        Err(Error::Usage(msg.to_string()))
    }
}

fn mount_config(args: &MountArgs, archive: &Path) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("snapfs:{}", archive.display())),
        MountOption::Subtype("snapfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if args.upper.is_none() {
        config.mount_options.insert(0, MountOption::RO);
    }
    for opt in args
        .options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        match opt {
            "allow_other" => config.acl = SessionACL::All,
            "allow_root" => config.acl = SessionACL::RootAndOwner,
            "default_permissions" => {}
            "ro" if args.upper.is_none() => {}
            "ro" => config.mount_options.push(MountOption::RO),
            "auto_unmount" => config.mount_options.push(MountOption::AutoUnmount),
            "dev" => config.mount_options.push(MountOption::Dev),
            "nodev" => config.mount_options.push(MountOption::NoDev),
            "suid" => config.mount_options.push(MountOption::Suid),
            "nosuid" => config.mount_options.push(MountOption::NoSuid),
            "exec" => config.mount_options.push(MountOption::Exec),
            "noexec" => config.mount_options.push(MountOption::NoExec),
            other => config
                .mount_options
                .push(MountOption::CUSTOM(other.to_string())),
        }
    }
    config.n_threads = Some(args.threads.clamp(1, 64));
    config.clone_fd = true;
    config
}

/// Mounts and serves until unmounted or signalled. Reports readiness on `ready`.
fn serve(
    args: &MountArgs,
    archives: &[PathBuf],
    mountpoint: &Path,
    mut ready: Option<File>,
) -> Result<ExitCode> {
    limit_malloc_retention();
    let result = setup(args, archives, mountpoint);
    let session = match result {
        Ok(s) => s,
        Err(e) => {
            if let Some(r) = ready.as_mut() {
                let _ = writeln!(r, "{e}");
            }
            return Err(e);
        }
    };
    let mut session = session;
    let mut unmounter = session.unmount_callable();
    // Signals were blocked in setup(); one thread waits for them and unmounts.
    let target = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(
        mountpoint.as_os_str(),
    ))
    .map_err(|_| Error::Usage("mountpoint contains a NUL byte".into()))?;
    std::thread::spawn(move || {
        wait_for_signal();
        log::info!("signal received, unmounting");
        // Our own mount (as root) is detached directly; fuser's through its unmounter.
        // SAFETY: target is a valid NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            if let Err(e) = unmounter.unmount() {
                log::error!("unmount failed: {e}");
            }
        }
    });
    if let Some(mut r) = ready.take() {
        let _ = r.write_all(b"ok\n");
    }
    session
        .run()
        .map_err(|e| Error::io("FUSE session failed on", mountpoint, e))?;
    Ok(ExitCode::SUCCESS)
}

fn setup(
    args: &MountArgs,
    archives: &[PathBuf],
    mountpoint: &Path,
) -> Result<fuser::Session<SnapFs<DynTree>>> {
    block_signals();
    let opts = BuildOptions {
        span_bytes: args.span.max(64 << 10),
    };
    let tree = super::view::open_stack(archives, &opts, args.cache_size)?;
    let tree = match &args.upper {
        Some(dir) => DynTree(Box::new(UpperTree::new(tree, dir)?)),
        None => DynTree(tree),
    };
    let config = mount_config(args, &archives[archives.len() - 1]);
    super::session::mount(SnapFs::new(tree), mountpoint, &config)
}

/// Keeps the daemon's RSS near what it holds. Span buffers are megabytes, freed as
/// the cache evicts them; glibc's default moves its mmap threshold up after the first
/// such free (up to 32 MiB), so later span buffers come from the heaps of up to 8 arenas
/// per core and their memory is kept after they are freed (under 8 readers: several
/// times the cache cap). A fixed threshold sends every buffer of 1 MiB or more to mmap,
/// given back on free; fewer arenas bound what small allocations keep.
fn limit_malloc_retention() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

const SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the termination signals in this thread and every thread it spawns later.
fn block_signals() {
    let set = signal_set();
    // SAFETY: the set is initialised; a null old-set pointer is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn wait_for_signal() {
    let set = signal_set();
    let mut sig = 0;
    // SAFETY: set is initialised and the signals are blocked in every thread.
    unsafe {
        libc::sigwait(&set, &mut sig);
    }
}
