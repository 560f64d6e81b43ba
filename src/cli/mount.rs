//! `snapfs mount`: load or build the index, then serve it over FUSE. Without
//! `--foreground` the command re-executes itself as a detached daemon and returns only
//! once the daemon reports the mount live (or prints the daemon's one-line error).
//! With `--upper DIR` the view is writable: the read-only tree is wrapped in an
//! [`UpperTree`] that records changes in DIR, and the mount is not `ro`.
//! `--uid-map`/`--gid-map`/`--owner` wrap the whole view in a [`MappedTree`].
//! snapfs-specific `-o` options (`upper=DIR`, `uid_map=`, ...) are folded into the
//! flags first, so `mount -t fuse.snapfs` and fstab lines can carry them.
//! An input that is a container image (told from its content) stands for its chosen
//! image's layers (`--image`, `--platform`); `--verify` checks every blob of it here,
//! before the daemon starts.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use clap::Args;

use crate::archive::Archive;
use crate::error::{Error, Result};
use crate::fs::{default_threads, MountOptions, Session};
use crate::idmap::IdMap;
use crate::index::build::BuildOptions;
use crate::index::store;
use crate::service::{client, Request, ViewConfig};
use crate::view::{self, ViewSpec};

/// Arguments of `snapfs mount`.
#[derive(Args, Debug)]
pub struct MountArgs {
    /// The archives (tar, tar.gz, tar.zst, tar.xz, tar.bz2) or images (OCI layout, OCI
    /// archive, docker save; detected from their content), bottom layer first: each one
    /// after the first is stacked on top as OCI layers.
    #[arg(required = true, value_name = "ARCHIVE")]
    archives: Vec<PathBuf>,
    /// Where the view appears (an existing directory).
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: PathBuf,
    #[command(flatten)]
    select: super::ImageArgs,
    /// Before mounting, read every layer blob of an image input and check it against
    /// the manifest's digests and sizes and the config's diff_ids.
    #[arg(long)]
    verify: bool,
    /// Stay in the foreground (logs to stderr; Ctrl-C unmounts).
    #[arg(short, long)]
    foreground: bool,
    /// Mount options, comma separated: allow_other, allow_root, ro, suid, dev, exec,
    /// noexec, no_passthrough, ...; snapfs options upper=DIR, uid_map=C:H:N, gid_map=C:H:N,
    /// owner=UID:GID, cache_size=, span=, threads=, log_file=, pid_file=, image=REF,
    /// platform=OS/ARCH; mount(8)
    /// bookkeeping (defaults, noauto, nofail, _netdev, x-*) is ignored. Mounts are
    /// nosuid,nodev unless suid/dev is given; default_permissions is always on.
    #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Memory for decompressed data: the span cache and the daemon's buffers
    /// [default: 256M].
    #[arg(long, value_parser = super::parse_size)]
    cache_size: Option<u64>,
    /// Uncompressed bytes between seek points when an index has to be built.
    #[arg(long, value_parser = super::parse_size, default_value = "1M")]
    span: u64,
    /// FUSE worker threads [default: one per core (2 to 8) for a read-only view of
    /// local archives, 8 for a writable view or a remote source].
    #[arg(long)]
    threads: Option<usize>,
    /// Make the view writable, recording every change in DIR (created if missing;
    /// mount with the same DIR again to get the same view back).
    #[arg(long, value_name = "DIR")]
    upper: Option<PathBuf>,
    /// Serve every file of a writable view through the daemon. By default the
    /// kernel reads and writes whole upper files itself (FUSE passthrough, where it
    /// can: Linux 6.9+, and root in the initial user namespace).
    #[arg(long)]
    no_passthrough: bool,
    /// Present archive ids through a user-namespace style map, `container:host:count`
    /// (archive id `container` is shown as `host`; repeat or comma-separate ranges).
    /// Unmapped ids show as 65534.
    #[arg(long, value_name = "C:H:N", action = clap::ArgAction::Append)]
    uid_map: Vec<String>,
    /// Group ids, like --uid-map.
    #[arg(long, value_name = "C:H:N", action = clap::ArgAction::Append)]
    gid_map: Vec<String>,
    /// Present every entry as owned by UID:GID (the archive's ids are kept).
    #[arg(long, value_name = "UID:GID")]
    owner: Option<String>,
    /// Append the log to FILE (a detached daemon otherwise drops it); a daemon logs at
    /// info level unless RUST_LOG says otherwise.
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Write the daemon's pid to FILE once the mount is live (removed on clean exit).
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Ask the snapfs service listening on SOCKET (`snapfs serve`) to mount the view
    /// instead of starting a daemon of its own [default: $SNAPFS_SERVICE if set].
    #[arg(long, value_name = "SOCKET")]
    service: Option<PathBuf>,
    /// Internal: file descriptor on which the daemon reports readiness.
    #[arg(long, hide = true)]
    ready_fd: Option<i32>,
}

/// Runs `snapfs mount`.
pub fn run(mut args: MountArgs) -> Result<ExitCode> {
    fold_options(&mut args)?;
    let (archives, mountpoint) = (&args.archives[..], args.mountpoint.as_path());
    IdMap::from_args(&args.uid_map, &args.gid_map, args.owner.as_deref())?;
    for a in archives {
        super::check_input(a)?;
    }
    let select = args.select.select()?;
    match std::fs::metadata(mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::NotA {
                path: mountpoint.to_path_buf(),
                expected: "directory",
                detail: Some("a mountpoint must be one".into()),
            })
        }
        Err(e) => return Err(Error::io("cannot use mountpoint", mountpoint, e)),
    }
    if let Some(u) = &args.upper {
        std::fs::create_dir_all(u).map_err(|e| Error::io("cannot create upper dir", u, e))?;
    }
    // The image step (the daemon repeats it; it reads only small JSON).
    // Remote inputs are opened once, by the daemon, unless --verify needs them here.
    let inputs = if args.ready_fd.is_none() {
        let here: Vec<PathBuf> = archives
            .iter()
            .filter(|p| args.verify || !crate::source::is_remote(p))
            .cloned()
            .collect();
        view::resolve(&here, &select)?
    } else {
        Vec::new()
    };
    if args.verify {
        for input in &inputs {
            if let view::Input::Image(img) = input {
                super::verify::check(img)?;
            }
        }
    }
    if args.ready_fd.is_none() {
        if let Some(socket) = super::service_socket(args.service.as_deref()) {
            // The service chooses an image's default image and platform itself.
            if select.reference.is_some() || select.platform.is_some() {
                return Err(Error::Usage(
                    "--image and --platform are not passed to the service (mount without --service)"
                        .into(),
                ));
            }
            // The service checks the mountpoint itself (and names its own view there).
            return via_service(&args, archives, mountpoint, &socket);
        }
    }
    let canonical = std::fs::canonicalize(mountpoint)
        .map_err(|e| Error::io("cannot use mountpoint", mountpoint, e))?;
    super::list::check_not_fuse_mounted(&canonical)?;
    if let Some(f) = &args.pid_file {
        check_writable_file(f, "cannot create pid file")?;
    }
    if let Some(f) = &args.log_file {
        check_writable_file(f, "cannot create log file")?;
    }
    if args.foreground || args.ready_fd.is_some() {
        drop(inputs);
        if args.foreground && args.ready_fd.is_none() {
            if let Some(f) = &args.log_file {
                log_to(f)?;
            }
        }
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
    let mut todo: Vec<Archive> = Vec::new();
    let mut labels = Vec::new();
    for input in &inputs {
        if let view::Input::Remote(..) = input {
            continue; // the daemon opens it (its error line is relayed)
        }
        for archive in input.archives()? {
            // The daemon reads what it serves of a current index: nothing to do here.
            if store::find_current(&archive).is_some() {
                continue;
            }
            if crate::snapshot::read_embedded(&archive)?.is_some() {
                continue;
            }
            labels.push(archive.path.display().to_string());
            todo.push(archive);
        }
    }
    let refs: Vec<&Archive> = todo.iter().collect();
    super::index::obtain_each(&refs, &labels, &opts, None, false, |i, index, _| {
        store::cache_file_for(&todo[i], index).map(drop)
    })?;
    drop(inputs);
    daemonize(&args)
}

/// Asks the service on `socket` to mount the view; returns once it is live.
fn via_service(
    args: &MountArgs,
    archives: &[PathBuf],
    mountpoint: &Path,
    socket: &Path,
) -> Result<ExitCode> {
    let daemon_only = [
        (args.foreground, "--foreground"),
        (args.log_file.is_some(), "--log-file"),
        (args.pid_file.is_some(), "--pid-file"),
        (args.cache_size.is_some(), "--cache-size"),
    ];
    if let Some((_, flag)) = daemon_only.iter().find(|(given, _)| *given) {
        return Err(Error::Usage(format!(
            "{flag} belongs to the service (snapfs serve), not to a view mounted with --service"
        )));
    }
    // The service runs elsewhere (another cwd): it gets absolute, resolved paths.
    let resolve = |p: &Path, what| std::fs::canonicalize(p).map_err(|e| Error::io(what, p, e));
    let view = ViewConfig {
        mountpoint: resolve(mountpoint, "cannot use mountpoint")?,
        layers: archives
            .iter()
            .map(|a| match crate::source::is_remote(a) {
                true => Ok(a.clone()),
                false => resolve(a, "cannot open archive"),
            })
            .collect::<Result<_>>()?,
        upper: match &args.upper {
            Some(u) => Some(resolve(u, "cannot use upper dir")?),
            None => None,
        },
        uid_map: args.uid_map.clone(),
        gid_map: args.gid_map.clone(),
        owner: args.owner.clone(),
        options: {
            let mut o = args.options.clone();
            if args.no_passthrough {
                o.push("no_passthrough".into());
            }
            o
        },
        threads: args.threads,
        span: Some(args.span),
        ..Default::default()
    };
    client::call(socket, &Request::Add { view })?;
    Ok(ExitCode::SUCCESS)
}

/// Foreground mode with `--log-file`: stderr (where the log goes) is appended to `f`.
fn log_to(f: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(f)
        .map_err(|e| Error::io("cannot open log file", f, e))?;
    // SAFETY: both fds are open; dup2 replaces fd 2 atomically.
    if unsafe { libc::dup2(file.as_raw_fd(), 2) } < 0 {
        return Err(Error::io(
            "cannot redirect the log to",
            f,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Checks that `f` can be created (its directory exists) before the daemon starts.
fn check_writable_file(f: &Path, what: &'static str) -> Result<()> {
    let dir = match f.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Usage(format!(
            "{what} {}: {} is not a directory",
            f.display(),
            dir.display()
        ))),
        Err(e) => Err(Error::io(what, f, e)),
    }
}

/// Options that mount(8) and fstab pass but that mean nothing to a FUSE mount.
fn ignored_option(o: &str) -> bool {
    matches!(
        o,
        "defaults"
            | "auto"
            | "noauto"
            | "user"
            | "nouser"
            | "users"
            | "owner"
            | "group"
            | "_netdev"
            | "nofail"
            | "sync"
            | "async"
            | "atime"
            | "noatime"
            | "relatime"
            | "norelatime"
            | "strictatime"
            | "nodiratime"
    ) || o.starts_with("x-")
        || o.starts_with("comment=")
        || o.starts_with("fsname=")
        || o.starts_with("subtype=")
}

/// Moves snapfs options given with `-o` (`upper=DIR`, `cache_size=`, `span=`,
/// `threads=`, `uid_map=`, `gid_map=`, `owner=`, `log_file=`, `pid_file=`, `image=`,
/// `platform=`) into the
/// flags they stand for, and drops the mount(8) bookkeeping options; the rest stay
/// FUSE/kernel options.
fn fold_options(args: &mut MountArgs) -> Result<()> {
    let mut kept = Vec::new();
    for opt in args
        .options
        .iter()
        .flat_map(|o| o.split(','))
        .map(str::trim)
        .filter(|o| !o.is_empty())
    {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let need = |v: Option<&str>| {
            v.filter(|v| !v.is_empty())
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::Usage(format!("mount option {key} needs a value ({key}=...)"))
                })
        };
        let size = |v: Option<&str>| -> Result<u64> {
            super::parse_size(&need(v)?)
                .map_err(|e| Error::Usage(format!("mount option {key}: {e}")))
        };
        match key.replace('-', "_").as_str() {
            "upper" => args.upper = Some(PathBuf::from(need(value)?)),
            "cache_size" => args.cache_size = Some(size(value)?),
            "span" => args.span = size(value)?,
            "threads" => {
                args.threads = Some(need(value)?.parse().map_err(|_| {
                    Error::Usage(format!("mount option threads: bad number {value:?}"))
                })?)
            }
            "uid_map" => args.uid_map.push(need(value)?),
            "gid_map" => args.gid_map.push(need(value)?),
            "owner" if value.is_some() => args.owner = Some(need(value)?),
            "log_file" => args.log_file = Some(PathBuf::from(need(value)?)),
            "pid_file" => args.pid_file = Some(PathBuf::from(need(value)?)),
            "image" => args.select.reference = Some(need(value)?),
            "platform" => args.select.platform = Some(need(value)?),
            _ if ignored_option(opt) => {}
            _ => kept.push(opt.to_string()),
        }
    }
    args.options = if kept.is_empty() {
        Vec::new()
    } else {
        vec![kept.join(",")]
    };
    Ok(())
}

/// Starts the daemon and waits for its verdict on a pipe.
fn daemonize(args: &MountArgs) -> Result<ExitCode> {
    let paths: Vec<&PathBuf> = args
        .archives
        .iter()
        .chain(std::iter::once(&args.mountpoint))
        .collect();
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io(
            "cannot create pipe for",
            paths[0],
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
        .arg(cache_bytes(args).to_string())
        .arg("--span")
        .arg(args.span.to_string());
    if let Some(n) = args.threads {
        cmd.arg("--threads").arg(n.to_string());
    }
    for o in &args.options {
        cmd.arg("-o").arg(o);
    }
    if args.no_passthrough {
        cmd.arg("--no-passthrough");
    }
    for m in &args.uid_map {
        cmd.arg("--uid-map").arg(m);
    }
    for m in &args.gid_map {
        cmd.arg("--gid-map").arg(m);
    }
    if let Some(o) = &args.owner {
        cmd.arg("--owner").arg(o);
    }
    if let Some(r) = &args.select.reference {
        cmd.arg("--image").arg(r);
    }
    if let Some(p) = &args.select.platform {
        cmd.arg("--platform").arg(p);
    }
    let abs = |p: &Path| -> Result<PathBuf> {
        if p.is_absolute() {
            return Ok(p.to_path_buf());
        }
        Ok(std::env::current_dir()
            .map_err(|e| Error::io("cannot resolve", p, e))?
            .join(p))
    };
    if let Some(f) = &args.pid_file {
        cmd.arg("--pid-file").arg(abs(f)?);
    }
    let log = match &args.log_file {
        Some(f) => {
            let f = abs(f)?;
            cmd.arg("--log-file").arg(&f);
            // A log file is for reading later: say what happens unless told otherwise.
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "warn,snapfs=info");
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&f)
                .map_err(|e| Error::io("cannot open log file", &f, e))?;
            Stdio::from(file)
        }
        None => Stdio::null(),
    };
    if let Some(u) = &args.upper {
        cmd.arg("--upper")
            .arg(std::fs::canonicalize(u).unwrap_or_else(|_| u.clone()));
    }
    cmd.args(
        paths
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())),
    );
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
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
        .map_err(|e| Error::io("cannot start daemon for", paths[0], e))?;
    drop(write_end);
    let mut msg = String::new();
    let _ = File::from(read_end).read_to_string(&mut msg);
    if msg.starts_with("ok") {
        return Ok(ExitCode::SUCCESS);
    }
    let _ = child.wait();
    let msg = msg.trim();
    if msg.is_empty() {
        Err(Error::Daemon(format!(
            "snapfs daemon for {} exited before the mount was live",
            paths[0].display()
        )))
    } else {
        Err(Error::Daemon(msg.to_string()))
    }
}

fn mount_options(args: &MountArgs, inputs: &[view::Input]) -> MountOptions {
    let names: Vec<(&Path, Option<&str>)> = inputs.iter().map(view::Input::name).collect();
    let mut m = MountOptions::parse(
        super::list::source_name(&names),
        &args.options,
        args.upper.is_some(),
        args.threads.unwrap_or_else(|| {
            default_threads(args.upper.is_some(), inputs.iter().all(view::Input::local))
        }),
    );
    m.passthrough &= !args.no_passthrough;
    m
}

/// Mounts and serves until unmounted or signalled. Reports readiness on `ready`.
fn serve(
    args: &MountArgs,
    archives: &[PathBuf],
    mountpoint: &Path,
    mut ready: Option<File>,
) -> Result<ExitCode> {
    crate::cache::return_freed_buffers_to_kernel();
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
    let mut unmounter = session.unmounter()?;
    let mut cleanup = session.unmounter()?;
    // Signals were blocked in setup(); one thread waits for them and unmounts.
    std::thread::spawn(move || {
        wait_for_signal();
        log::info!("signal received, unmounting");
        if let Err(e) = unmounter.unmount() {
            log::error!("unmount failed: {e}");
        }
    });
    let pid_file = match &args.pid_file {
        Some(f) => match std::fs::write(f, format!("{}\n", std::process::id())) {
            Ok(()) => Some(f.clone()),
            Err(e) => {
                let e = Error::io("cannot write pid file", f, e);
                log::error!("{e}");
                let _ = cleanup.unmount();
                if let Some(r) = ready.as_mut() {
                    let _ = writeln!(r, "{e}");
                }
                return Err(e);
            }
        },
        None => None,
    };
    log::info!(
        "serving {} on {} (pid {})",
        archives
            .iter()
            .map(|a| a.display().to_string())
            .collect::<Vec<_>>()
            .join(":"),
        mountpoint.display(),
        std::process::id()
    );
    if let Some(mut r) = ready.take() {
        let _ = r.write_all(b"ok\n");
    }
    crate::cache::trim_heap();
    let result = session.run();
    if let Some(f) = pid_file {
        let _ = std::fs::remove_file(f);
    }
    log::info!("{} unmounted, daemon exits", mountpoint.display());
    if let Some(cache) = crate::source::disk_cache() {
        cache.flush_counts();
    }
    result.map(|()| ExitCode::SUCCESS)
}

fn setup(args: &MountArgs, archives: &[PathBuf], mountpoint: &Path) -> Result<Session> {
    block_signals();
    let spec = ViewSpec {
        layers: archives.to_vec(),
        select: args.select.select()?,
        upper: args.upper.clone(),
        idmap: IdMap::from_args(&args.uid_map, &args.gid_map, args.owner.as_deref())?,
        build: BuildOptions {
            span_bytes: args.span.max(64 << 10),
        },
        cache_bytes: cache_bytes(args),
    };
    let inputs = view::resolve(&spec.layers, &spec.select)?;
    let tree = view::open_with(&spec, &inputs)?;
    Session::mount(tree, mountpoint, &mount_options(args, &inputs))
}

fn cache_bytes(args: &MountArgs) -> u64 {
    default_cache_bytes(args.cache_size)
}

/// The default `--cache-size`: a fixed 256 MiB, not a share of RAM. The kernel's page
/// cache already holds the file data readers asked for; the daemon only keeps what
/// it cannot give (spans being streamed, O_DIRECT readers), so ten views on a host
/// pin at most 2.5 GiB, not ten sixteenths of its memory.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

/// `--cache-size`, or [`DEFAULT_CACHE_BYTES`].
pub(super) fn default_cache_bytes(cache_size: Option<u64>) -> u64 {
    cache_size.unwrap_or(DEFAULT_CACHE_BYTES)
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
pub(super) fn block_signals() {
    let set = signal_set();
    // SAFETY: the set is initialised; a null old-set pointer is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

pub(super) fn wait_for_signal() {
    let set = signal_set();
    let mut sig = 0;
    // SAFETY: set is initialised and the signals are blocked in every thread.
    unsafe {
        libc::sigwait(&set, &mut sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        m: MountArgs,
    }

    fn parse(args: &[&str]) -> MountArgs {
        let mut a = T::try_parse_from(std::iter::once("mount").chain(args.iter().copied()))
            .unwrap()
            .m;
        fold_options(&mut a).unwrap();
        a
    }

    #[test]
    fn snapfs_options_ride_in_dash_o() {
        let a = parse(&[
            "-o",
            "rw,allow_other,upper=/u,uid_map=0:100000:65536,uid_map=70000:5:1",
            "-o",
            "owner,noauto,nofail,_netdev,x-systemd.automount,cache_size=64M,gid_map=0:1:1",
            "-o",
            "suid,threads=3,pid_file=/run/p,log_file=/var/log/l,defaults",
            "a.tar",
            "/mnt",
        ]);
        assert_eq!(a.options, vec!["rw,allow_other,suid".to_string()]);
        assert_eq!(a.upper, Some(PathBuf::from("/u")));
        assert_eq!(a.uid_map, vec!["0:100000:65536", "70000:5:1"]);
        assert_eq!(a.gid_map, vec!["0:1:1"]);
        assert_eq!(a.owner, None);
        assert_eq!(a.cache_size, Some(64 << 20));
        assert_eq!(a.threads, Some(3));
        assert_eq!(a.pid_file, Some(PathBuf::from("/run/p")));
        assert_eq!(a.log_file, Some(PathBuf::from("/var/log/l")));
        let a = parse(&["-o", "image=repo/app:1,platform=linux/arm64", "a", "m"]);
        assert_eq!(a.select.reference.as_deref(), Some("repo/app:1"));
        assert_eq!(a.select.platform.as_deref(), Some("linux/arm64"));
        let a = parse(&["-o", "owner=1000:100", "a", "m"]);
        assert_eq!(a.owner.as_deref(), Some("1000:100"));
        assert!(a.options.is_empty());
        let mut bad = T::try_parse_from(["mount", "-o", "upper=", "a", "m"])
            .unwrap()
            .m;
        assert!(fold_options(&mut bad).is_err());
        let mut bad = T::try_parse_from(["mount", "-o", "cache_size=lots", "a", "m"])
            .unwrap()
            .m;
        assert!(fold_options(&mut bad).is_err());
    }

    #[test]
    fn default_cache_size_is_256m_whatever_the_ram() {
        assert_eq!(default_cache_bytes(None), 256 << 20);
        assert_eq!(default_cache_bytes(Some(1 << 30)), 1 << 30);
        let a = T::try_parse_from(["mount", "a", "m"]).unwrap().m;
        assert_eq!(cache_bytes(&a), 256 << 20);
    }
}
