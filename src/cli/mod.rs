//! Command-line glue: clap structs, checked into per-subcommand configs, and dispatch.
//! One file per subcommand.

mod commit;
mod create;
mod helper;
mod index;
mod list;
mod mount;
mod serve;
mod umount;
mod verify;
mod volume;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::{Error, Result};

/// Mount snapshot tarballs (tar, tar.gz, tar.zst, tar.xz, tar.bz2) and container images
/// as lazy FUSE views: read-only, or writable with an upper dir whose changes `commit`
/// cuts into new snapshots.
#[derive(Parser, Debug)]
#[command(name = "snapfs", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// Options of remote sources (`s3://`, `http(s)://`), for every subcommand.
#[derive(clap::Args, Debug, Clone, Default)]
struct RemoteArgs {
    /// Keep blocks fetched from remote objects in DIR (shared by every mount on the
    /// host, kept across remounts) [default: $SNAPFS_DISK_CACHE]
    #[arg(long, global = true, value_name = "DIR")]
    disk_cache: Option<PathBuf>,
    /// Bound of the disk cache (least recently used blocks go first)
    /// [default: $SNAPFS_DISK_CACHE_SIZE, else 10G]
    #[arg(long, global = true, value_parser = parse_size, value_name = "SIZE")]
    disk_cache_size: Option<u64>,
}

/// Environment variables that carry the disk cache options to daemons and helpers.
const DISK_CACHE_ENV: &str = "SNAPFS_DISK_CACHE";
const DISK_CACHE_SIZE_ENV: &str = "SNAPFS_DISK_CACHE_SIZE";

impl RemoteArgs {
    /// Sets up the process's disk cache; the options pass to child processes (the
    /// mount daemon) through the environment.
    fn apply(&self) -> Result<()> {
        if let Some(d) = &self.disk_cache {
            let abs = std::path::absolute(d).map_err(|e| Error::io("cannot use", d, e))?;
            std::env::set_var(DISK_CACHE_ENV, abs);
        }
        if let Some(n) = self.disk_cache_size {
            std::env::set_var(DISK_CACHE_SIZE_ENV, n.to_string());
        }
        let Some(dir) = std::env::var_os(DISK_CACHE_ENV).filter(|v| !v.is_empty()) else {
            return Ok(());
        };
        let size = match std::env::var(DISK_CACHE_SIZE_ENV) {
            Ok(v) => parse_size(&v).map_err(Error::Usage)?,
            Err(_) => 10 << 30,
        };
        crate::source::set_disk_cache(crate::source::DiskCache::open(
            std::path::Path::new(&dir),
            size,
        )?);
        Ok(())
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build (or refresh) the persisted index of an archive and print a summary.
    Index(index::IndexArgs),
    /// Mount archives as a view (read-only, or writable with --upper); returns once the
    /// mount is live.
    Mount(mount::MountArgs),
    /// Unmount a snapfs mount (also cleans up a mount whose daemon died).
    Umount(umount::UmountArgs),
    /// List the snapfs mounts: mountpoint, daemon pid, state (live/stale), archives.
    List(list::ListArgs),
    /// Capture a plain directory into a new seekable, self-indexed snapshot.
    Create(create::CreateArgs),
    /// Serve many views from one process: a control socket to add, list and remove
    /// them, one span cache, views restored after a restart.
    Serve(serve::ServeArgs),
    /// Cut a snapshot (delta layer, or --full) from a writable view's upper dir.
    #[command(
        long_about = "Cut a snapshot from a writable view's upper dir: by default a delta \
layer in OCI form (changed files whole, directories, metadata changes, .wh. whiteouts and \
opaque markers) so that the parent archives plus the delta reproduce the view; with --full \
one flattened standalone snapshot of the whole view, streaming unchanged data from the \
parents.\n\nWhile the view is mounted, its daemon holds the upper dir's lock and commit \
refuses with a clear error: unmount the view first. A cut therefore always captures one \
consistent state and never mixes in writes that happen during the cut."
    )]
    Commit(commit::CommitArgs),
    /// Check an image's blobs against its manifest (digests, sizes) and its layers
    /// against the config's diff_ids; names the failing layer.
    Verify(verify::VerifyArgs),
    /// The Docker volumes of a snapfs service: ls, inspect, snapshot, restore.
    Volume(volume::VolumeArgs),
}

/// How an executable runs the commands of the network half (`serve`, `volume`).
type NetworkCommand = fn(Command) -> Result<ExitCode>;

/// The lean `snapfs` executable: runs every local command itself and hands `serve`,
/// `volume` and any command that names a remote object to `snapfs-net` (an exec, so the
/// pid, arguments and exit code stay the same). Without the gRPC, HTTP, TLS and S3 code
/// it is 4.3 MB instead of 11.1, and a mount with cold caches reads that much less.
pub fn run_lean() -> Result<ExitCode> {
    init_logging();
    let argv: Vec<OsString> = std::env::args_os().collect();
    if argv.iter().skip(1).any(names_remote) {
        return Err(hand_over(&argv));
    }
    run_with(&argv, |_| {
        Err(hand_over(&std::env::args_os().collect::<Vec<_>>()))
    })
}

/// The `snapfs-net` executable: every command, remote objects included.
pub fn run_net() -> Result<ExitCode> {
    init_logging();
    crate::source::enable_network();
    let argv: Vec<OsString> = std::env::args_os().collect();
    run_with(&argv, |command| match command {
        Command::Serve(a) => serve::run(a),
        Command::Volume(a) => volume::run(a),
        other => dispatch_local(other),
    })
}

/// The exit code of a run, after printing its error, if any, as one line.
pub fn exit_code(result: Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("snapfs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
}

/// Whether an argument (or the value of a `--flag=VALUE` one) names a remote object.
fn names_remote(arg: &OsString) -> bool {
    let value = match arg.to_str().and_then(|a| a.split_once('=')) {
        Some((flag, value)) if flag.starts_with('-') => std::path::Path::new(value),
        _ => std::path::Path::new(arg),
    };
    crate::source::is_remote(value)
}

/// Runs the same command line in `snapfs-net` beside this executable; returns only on
/// failure to do so.
fn hand_over(argv: &[OsString]) -> Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(p) => p.with_file_name(crate::source::NET_EXECUTABLE),
        Err(e) => return Error::io("cannot find own executable", "snapfs", e),
    };
    let (argv0, rest) = argv
        .split_first()
        .map_or((OsString::from("snapfs"), &[][..]), |(a, r)| (a.clone(), r));
    let e = std::process::Command::new(&exe)
        .arg0(argv0)
        .args(rest)
        .exec();
    Error::io("serve, volume and remote objects need", &exe, e)
}

/// Parses `argv` and runs the subcommand, `network` those of the network half. Invoked
/// as `mount.fuse.snapfs` (a symlink), the binary acts as mount(8)'s helper instead.
fn run_with(argv: &[OsString], network: NetworkCommand) -> Result<ExitCode> {
    if let Some((argv0, rest)) = argv.split_first() {
        if helper::invoked_as_helper(argv0) {
            return helper::run(rest);
        }
    }
    let cli = Cli::parse_from(argv);
    cli.remote.apply()?;
    match cli.command {
        c @ (Command::Serve(_) | Command::Volume(_)) => network(c),
        c => dispatch_local(c),
    }
}

/// Runs a command of the local half.
fn dispatch_local(command: Command) -> Result<ExitCode> {
    match command {
        Command::Index(a) => index::run(a),
        Command::Mount(a) => mount::run(a),
        Command::Umount(a) => umount::run(a),
        Command::List(a) => list::run(a),
        Command::Create(a) => create::run(a),
        Command::Commit(a) => commit::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Serve(_) | Command::Volume(_) => Err(Error::Internal(
            "a service command reached the local half".into(),
        )),
    }
}

/// Parses sizes like `4M`, `256MiB`, `1G`, `65536`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("invalid size unit in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// The environment variable naming the socket of the snapfs service that `mount`,
/// `umount` and `list` talk to when no `--service` is given.
pub const SERVICE_ENV: &str = "SNAPFS_SERVICE";

/// The service socket a command was pointed at: `--service`, else `$SNAPFS_SERVICE`.
fn service_socket(flag: Option<&std::path::Path>) -> Option<PathBuf> {
    flag.map(PathBuf::from).or_else(|| {
        std::env::var_os(SERVICE_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// Which image of an image input to use (shared by mount, index, verify).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ImageArgs {
    /// For an image input holding several images: the one named REF (an
    /// `org.opencontainers.image.ref.name` / `io.containerd.image.name` annotation, a
    /// docker save RepoTag, or a manifest digest).
    #[arg(long = "image", value_name = "REF")]
    reference: Option<String>,
    /// For an image index: the platform to use, os/arch[/variant] [default: the host's].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
}

impl ImageArgs {
    /// The checked selection.
    pub fn select(&self) -> Result<crate::image::Select> {
        let platform = match &self.platform {
            Some(p) => Some(crate::image::select::parse_platform(p).map_err(Error::Usage)?),
            None => None,
        };
        Ok(crate::image::Select {
            reference: self.reference.clone(),
            platform,
        })
    }
}

/// Checks that an input names a regular file (an archive or image archive) or a
/// directory (an image layout; its content is checked when it is opened).
fn check_input(p: &PathBuf) -> Result<()> {
    if crate::source::is_remote(p) {
        return Ok(()); // checked when it is opened (one HEAD)
    }
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() || m.is_dir() => Ok(()),
        Ok(_) => Err(Error::NotA {
            path: p.clone(),
            expected: "regular file",
            detail: Some("archives are files, image layouts directories".into()),
        }),
        Err(e) => Err(Error::io("cannot open archive", p, e)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("4M"), Ok(4 << 20));
        assert_eq!(super::parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(super::parse_size("10"), Ok(10));
        assert!(super::parse_size("x").is_err());
        assert!(super::parse_size("99999999999999G").is_err());
    }

    #[test]
    fn remote_arguments() {
        let remote = |a: &str| super::names_remote(&a.into());
        assert!(remote("s3://bucket/key.tar"));
        assert!(remote("https://host/x.tar.gz"));
        assert!(remote("--output=s3://bucket/key"));
        assert!(!remote("/srv/s3://x"));
        assert!(!remote("key=s3://x"));
        assert!(!remote("--upper=/srv/u"));
    }
}
